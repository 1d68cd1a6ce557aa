"""Read the tensors of an mmengine training checkpoint without running its pickle.

The published `dw-ll_ucoco_384.pth` is a whole training checkpoint (406 MB for 34 M weights):
beside `state_dict` it holds the optimizer state, mmengine's message hub (its own classes) and
metadata with numpy arrays. `torch.load(weights_only=True)` refuses those classes, and
`weights_only=False` would construct whatever the pickle names. Here the pickle is read with an
unpickler that builds tensors, dicts and lists and nothing else: every other class or function
it names becomes an inert `Placeholder` that is never called. The caller keeps the tensors it
asked for and drops the rest.
"""

from __future__ import annotations

import logging
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# The globals a tensor checkpoint needs; anything else is replaced by a Placeholder.
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
}


class Placeholder:
    """Stands for any object the pickle names that is not a tensor: accepts and keeps nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> Placeholder:
        return Placeholder()

    def __setstate__(self, state: object) -> None:
        pass

    # pickle's BUILD falls back to setattr / dict update; SETITEMS and APPENDS on a
    # placeholder (a custom mapping or list subclass) are absorbed too.
    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


class _TensorsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        return Placeholder


_PICKLE_MODULE = types.SimpleNamespace(
    Unpickler=_TensorsOnly, load=lambda f, **kw: _TensorsOnly(f, **kw).load()
)
_PICKLE_MODULE.__name__ = "tensors_only_pickle"


def read_state_dict(path: Path, key: str = "state_dict") -> Mapping[str, Any]:
    """The checkpoint's `key` entry (or the whole file when it is a bare state dict).

    Tries `torch.load(weights_only=True)` first; a checkpoint holding other objects is read
    again with the tensors-only unpickler. Raises ValueError when neither yields a mapping.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        logger.info(
            "checkpoint holds non-tensor objects; reading tensors only", extra={"path": str(path)}
        )
        try:
            state = torch.load(
                path,
                map_location="cpu",
                weights_only=False,
                pickle_module=_PICKLE_MODULE,  # type: ignore[arg-type]
            )
        except Exception as exc:
            raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    except Exception as exc:  # not a torch file, truncated, ...
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
        state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {path} holds no state dict")
    return state
