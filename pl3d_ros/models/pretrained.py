"""Reading third-party pretrained weights safely and loading them strictly.

Every importer of an upstream network (``mininet3d``, ``espnetv2``) goes through these two steps:

* ``read_state_dict``: ``torch.load(..., weights_only=True)`` and nothing else. The restricted
  unpickler refuses any class outside torch's tensor/storage allow-list *before* building it, so a
  file that smuggles code (a pickled function, an ``os.system`` reduce) is rejected without running
  anything. The result must then be a flat ``{str: Tensor}`` mapping: a checkpoint that wraps the
  weights (``{"state_dict": ..., "epoch": ...}``), a pickled module, or a list is refused with an
  error that says what was found.
* ``load_strict``: every key of the module's state dict present, no extra key, every shape equal;
  otherwise one ``PretrainedError`` that names all missing, unexpected and mismatched keys (torch's
  own strict load stops at the first shape mismatch and mixes the three lists into one string).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["PretrainedError", "load_strict", "read_state_dict"]

#: At most this many key names per category in an error message (the count is always given).
_MAX_LISTED = 12


class PretrainedError(ValueError):
    """A pretrained weight file is unreadable, not a plain tensor state dict, or does not fit."""


def read_state_dict(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """The tensors of a plain PyTorch state-dict file (zip or legacy format), on the CPU.

    Args:
        path: a file written by ``torch.save(module.state_dict(), path)``.

    Returns:
        An ordered ``{name: tensor}`` dict, in file order.

    Raises:
        PretrainedError: the file is missing or unreadable, holds anything besides tensors (the
            restricted unpickler refuses it without executing it), or is not a flat mapping of
            string keys to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickling_detail(str(exc))
        if "GLOBAL" in detail:
            # the restricted unpickler met a class or function outside the tensor allow-list
            raise PretrainedError(
                f"{path} is not a plain tensor state dict: it holds non-tensor objects, refused "
                f"without running them (weights_only=True): {detail}"
            ) from exc
        raise PretrainedError(f"cannot read {path} as a PyTorch state dict: {detail}") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise PretrainedError(f"cannot read {path} as a PyTorch state dict: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise PretrainedError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
        )
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise PretrainedError(f"{path}: state-dict keys must be strings, got {bad_keys[:_MAX_LISTED]!r}")
    not_tensors = {k: type(v).__name__ for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if not_tensors:
        listed = ", ".join(f"{k} ({t})" for k, t in list(not_tensors.items())[:_MAX_LISTED])
        raise PretrainedError(
            f"{path} is not a flat tensor state dict: {len(not_tensors)} entries are not tensors "
            f"({listed}); save module.state_dict() itself, not a training checkpoint around it"
        )
    return OrderedDict(obj.items())


def _unpickling_detail(message: str) -> str:
    """The informative line of torch's weights_only error (its other lines are boilerplate)."""
    boiler = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(boiler)]
    return " ".join(useful) or (lines[0] if lines else "unpickling failed")


def _listed(keys: list[str]) -> str:
    more = f", ... (+{len(keys) - _MAX_LISTED})" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``state_dict`` into ``module``, requiring an exact match of names and shapes.

    Args:
        module: the network (or sub-network) to fill.
        state_dict: ``{name: tensor}`` as returned by ``read_state_dict``.
        source: what the weights are (a path), for the error message.

    Raises:
        PretrainedError: names missing from ``state_dict``, names the module does not have, or
            tensors whose shape differs; all three lists are given.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_listed(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} with a different shape: {_listed(mismatched)}")
        raise PretrainedError(
            f"{source} does not fit {type(module).__name__} ({len(expected)} tensors expected, "
            f"{len(state_dict)} in the file): " + "; ".join(parts)
        )
    module.load_state_dict(state_dict, strict=True)
