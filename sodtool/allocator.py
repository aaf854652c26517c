"""The process's C heap: keep large freed blocks for reuse instead of unmapping them.

glibc's malloc serves every block above its mmap threshold (32 MiB at most) with a fresh `mmap`
and gives it back with `munmap` on free. A batch of 128 px crops has activations far above that
(G's [256, 32, 128, 128] float maps are 512 MiB), so every batch of `eval` or `train mtgan` maps
them anew and the kernel zero-fills and faults in every page again. With mmap off for malloc
(`M_MMAP_MAX` = 0) and up to 2 GiB of free heap kept at its top (`M_TRIM_THRESHOLD`), the blocks
are reused and the kernel time goes (docs/design_notes.md). Results do not
change (torch aligns every block to 64 bytes either way; trained weights came out bit for bit the
same); the cost is that the process keeps up to 2 GiB of freed heap, more if it is fragmented,
until it exits.

Torch-free, so that the CLI can call it before any stage allocates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_AT_TOP = 2**31 - 1  # bytes; mallopt takes a C int


def keep_freed_memory() -> bool:
    """On Linux with glibc, make malloc reuse large freed blocks (see the module docstring).
    Returns whether it applied; elsewhere (macOS, Windows, musl) it does nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # present in glibc alone, whose options these are
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_AT_TOP))
