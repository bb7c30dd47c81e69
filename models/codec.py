"""Encoding of ModelState for the worker's changelog.

River's detectors and rolling metrics have no JSON form, so ModelState is pickled. The
changelog is an internal topic that only driftwarden writes; even so, decoding uses an
allow-list unpickler (driftwarden, river, numpy and plain containers only), so a forged
record cannot run code.

Examples
--------
>>> from models.monitor import ModelState
>>> from models.policy import PolicyBook
>>> loads(dumps(ModelState("m", PolicyBook()))).model
'm'
>>> import pickle, os
>>> try:
...     loads(pickle.dumps(os.system))
... except StateError as exc:
...     print(exc)
state refers to posix.system, which is not allowed
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from models.errors import StateError

__all__ = ["dumps", "loads"]

_ALLOWED_MODULE_PREFIXES = ("models.", "river.", "numpy.", "collections")
_ALLOWED_BUILTINS = frozenset(
    {"object", "dict", "list", "tuple", "set", "frozenset", "float", "int", "str", "bool",
     "bytes", "complex", "slice", "range"}
)
# numpy arrays (a model's own reference profile) name their dtype at numpy's top level.
_ALLOWED_OTHER = frozenset({("copyreg", "_reconstructor"), ("functools", "partial"),
                            ("_codecs", "encode"), ("numpy", "dtype"), ("numpy", "ndarray")})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # A dotted name walks attributes (protocol 4): "pickle.sys.x" would escape the list.
        allowed = "." not in name and (
            module.startswith(_ALLOWED_MODULE_PREFIXES)
            or (module == "builtins" and name in _ALLOWED_BUILTINS)
            or (module, name) in _ALLOWED_OTHER
        )
        if not allowed:
            raise StateError(f"state refers to {module}.{name}, which is not allowed")
        return super().find_class(module, name)


def dumps(obj: Any) -> bytes:
    """Encode a state object."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(raw: bytes) -> Any:
    """Decode a state object written by :func:`dumps`; raises StateError otherwise."""
    try:
        return _Unpickler(io.BytesIO(raw)).load()
    except StateError:
        raise
    except Exception as exc:
        raise StateError(f"state cannot be decoded: {exc}") from exc
