# driftwarden worker image: `docker compose up` builds it (see docker-compose.yml).
#   docker build -t driftwarden .
#   docker run --rm -e DRIFTWARDEN_BROKER=kafka://broker:9092 driftwarden
# Every dependency ships manylinux wheels for CPython 3.11, so no compiler is needed.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# `pip install .` reads pyproject.toml (which names README.md as the long description)
# and installs models/ and streams/ into site-packages; the source tree is then removed
# so `python -m streams` imports the installed packages, not a copy in the working dir.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY streams ./streams
RUN pip install . \
 && cd / && rm -rf /src
WORKDIR /app

# Non-root. It owns /data (so a named volume mounted there is writable) and its home /app.
RUN groupadd --system --gid 10001 driftwarden \
 && useradd --system --uid 10001 --gid driftwarden --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin driftwarden \
 && mkdir -p /data \
 && chown driftwarden:driftwarden /data /app
USER driftwarden

# Inside a container the metrics endpoint must listen on every interface (DESIGN.md §6).
ENV DRIFTWARDEN_METRICS_HOST=0.0.0.0 \
    DRIFTWARDEN_METRICS_PORT=9102 \
    DRIFTWARDEN_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 9102 6066

CMD ["python", "-m", "streams", "worker", "-l", "info"]
