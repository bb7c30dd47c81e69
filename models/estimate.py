"""Label-free estimate of accuracy from the model's own confidence.

For a calibrated classifier the probability it gives its top class is the chance it is
right, so the mean top-class probability estimates accuracy before any label arrives
(confidence-based performance estimation). It cannot see concept drift that leaves the
model confident, which is why the realised accuracy is kept beside it.

Examples
--------
>>> import random
>>> rng = random.Random(3)
>>> est, right = ConfidenceEstimate(window=1000), 0
>>> for _ in range(50_000):
...     confidence = rng.uniform(0.6, 1.0)
...     right += rng.random() < confidence
...     _ = est.update(confidence)
>>> round(est.get(), 4), round(right / 50_000, 4)
(0.7991, 0.7998)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

from river import stats, utils

__all__ = ["ConfidenceEstimate"]


class ConfidenceEstimate:
    """Cumulative and rolling mean of top-class probabilities.

    The rolling mean is read far less often than a prediction arrives (when a policy
    fires, when metrics are exported), so the window keeps the values and sums them on
    read (``math.fsum``: correctly rounded), rather than river's ``utils.Rolling``
    updating and reverting a running mean per prediction (~0.7 us each).

    Parameters
    ----------
    window
        Predictions in the rolling window.
    """

    def __init__(self, window: int = 1000) -> None:
        if window < 1:
            raise ValueError("window must be a positive integer")
        self._all = stats.Mean()
        self._window: deque[float] = deque(maxlen=window)

    def __setstate__(self, state: dict[str, Any]) -> None:
        rolling = state.pop("_rolling", None)
        if isinstance(rolling, utils.Rolling):  # stored before the window kept the values
            state["_window"] = deque((args[0] for args, _ in rolling.window),
                                     maxlen=rolling.window_size)
        self.__dict__.update(state)

    def update(self, confidence: float) -> ConfidenceEstimate:
        """Absorb the top-class probability of one prediction."""
        self._all.update(confidence)
        self._window.append(confidence)
        return self

    def update_many(self, confidences: Iterable[float]) -> ConfidenceEstimate:
        """:meth:`update` with each confidence in turn."""
        confidences = list(confidences)
        update = self._all.update
        for confidence in confidences:
            update(confidence)
        self._window.extend(confidences)
        return self

    @property
    def n(self) -> int:
        """Predictions with scores absorbed."""
        return int(self._all.n)

    def get(self) -> float:
        """Estimated accuracy over every prediction absorbed."""
        return float(self._all.get())

    def rolling(self) -> float:
        """Estimated accuracy over the last ``window`` predictions."""
        return math.fsum(self._window) / len(self._window) if self._window else 0.0
