"""Torch files as data: written atomically, read with `torch.load(weights_only=True)`.

Every weight file and checkpoint sodtool reads goes through `load`, so a file holding code (a
malicious pickle) is refused everywhere with the same one-line InputError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sodtool.artefacts import atomic_path
from sodtool.errors import InputError


def save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save `obj` atomically (temp file renamed into place)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def load(path: str | os.PathLike, what: str, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True); missing, not a file, or unreadable -> InputError naming `what`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors, truncated zip files, code objects refused by weights_only
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"{what} {path} cannot be read as a weights-only torch file: {msg}") from None


def load_dict(path: str | os.PathLike, device: torch.device | str = "cpu", what: str = "checkpoint") -> dict:
    """`load` a file that must hold a dict (a checkpoint); anything else -> InputError."""
    obj = load(path, what, map_location=device)
    if not isinstance(obj, dict):
        raise InputError(f"{what} {path} does not hold a dict (got {type(obj).__name__})")
    return obj
