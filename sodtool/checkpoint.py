"""Torch files as data: written atomically, read with `torch.load(weights_only=True)`.

Every weight file and checkpoint sodtool reads goes through `load`, so a file holding code (a
malicious pickle) is refused everywhere with the same one-line InputError.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch

from sodtool.artefacts import atomic_path
from sodtool.errors import InputError


class _WriteRecorder:
    """What torch.save writes to: a raw file, each write finished, the first OSError kept.

    torch's zip writer turns a failed write (ENOSPC) into a RuntimeError from C++
    (inline_container.cc, "unexpected pos"); `save` raises the recorded OSError instead.
    """

    def __init__(self, raw) -> None:
        self.raw = raw
        self.error: OSError | None = None

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        done = 0
        try:
            while done < len(view):  # a raw write may be short (a disk nearly full): finish it or fail
                done += self.raw.write(view[done:])
        except OSError as e:
            self.error = self.error or e
            raise
        return done

    def flush(self) -> None:
        pass  # unbuffered


def save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save `obj` atomically (temp file renamed into place).

    A failed write (a full disk) is an OSError naming `path`, with the temporary removed and
    any previous file at `path` untouched.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        out = _WriteRecorder(open(tmp, "wb", buffering=0))
        try:
            try:
                torch.save(obj, out)
            finally:
                try:
                    out.raw.close()  # (a network file system may report a failed write only here)
                except OSError as e:
                    out.error = out.error or e
            if out.error is not None:
                raise out.error
        except BaseException:
            e = out.error
            if e is None:
                raise
            code = e.errno or errno.EIO
            raise OSError(code, e.strerror or os.strerror(code), str(path)) from None
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
