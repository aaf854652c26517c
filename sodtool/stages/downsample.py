"""`sodtool downsample`: the bicubic low-resolution twin of an HR ROI store.

Every HR crop uint8 [3, S, S] becomes `round(clamp(F.interpolate(hr.float(), scale_factor=1/scale,
mode="bicubic", antialias=True, align_corners=False), 0, 255))` uint8 [3, S/scale, S/scale]
(torch.round: halves to even), in the same row order, on the CPU (the output is then
bit-identical on every machine). The LR file records the HR file's identity (`source`: its
file_identity, and `source_content_sha256`: the content digest of the bytes read, which the
loader checks) and a copy of its categories. The HR store is verified first: every dataset is
read and hashed against the digest recorded when it was written (`sodtool.store.verify_store`),
so a damaged store is refused before anything is written; the HR file is opened read-only
and never modified. LR crops are stored in the HR file's chunking (8 rows, so the loader reads
matching chunks) and uncompressed by default (they do not compress). The LR file is built
under a temporary name and renamed into place; its sidecar `<lr>.manifest.json` follows.

Reading and decompressing the HR crops costs about twice the bicubic step, and h5py holds the
GIL while it reads, so `workers` processes (default: one per CPU core, at most 4) each read and
downsample slabs of `batch` rows with one torch thread; the main process writes them in order.
The output does not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch

from sodtool import store as S
from sodtool.artefacts import Timer, check_output, file_identity
from sodtool.configs.downsample import DownsampleConfig
from sodtool.console import log, summary_table, track
from sodtool.errors import InputError
from sodtool.resample import bicubic_down
from sodtool.store import write_store_manifest


def default_out(src: Path) -> Path:
    """`RUN/rois_train.h5` -> `RUN/rois_train_lr.h5`."""
    src = Path(src)
    stem = src.name[: -len(src.suffix)] if src.suffix else src.name
    return src.with_name(f"{stem}_lr{src.suffix or '.h5'}")


def default_workers() -> int:
    """One per CPU core this process may use, at most 4 (beyond that the HDF5 writer is the limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class _SlabReader:
    """Reads HR rows [start, stop) of one store and returns their LR twins (uint8 numpy)."""

    def __init__(self, src: Path, scale: int, batch: int) -> None:
        self.src, self.scale, self.batch = src, scale, batch
        self.fh = None
        self.buf = None

    def __call__(self, span: tuple[int, int]) -> np.ndarray:
        import h5py

        if self.fh is None:  # opened lazily: in the worker process, never inherited through fork
            self.fh = h5py.File(self.src, "r")
            self.buf = np.empty((self.batch, *self.fh["hr"].shape[1:]), dtype=np.uint8)  # reused: page faults
        start, stop = span
        k = stop - start
        self.fh["hr"].read_direct(self.buf, np.s_[start:stop], np.s_[0:k])
        return bicubic_down(torch.from_numpy(self.buf[:k]), self.scale).numpy()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


_worker_reader: _SlabReader | None = None


def _worker_init(src: Path, scale: int, batch: int) -> None:
    global _worker_reader
    torch.set_num_threads(1)  # the parallelism is across processes
    _worker_reader = _SlabReader(src, scale, batch)


def _worker_slab(span: tuple[int, int]) -> np.ndarray:
    return _worker_reader(span)


def downsample(cfg: DownsampleConfig) -> dict:
    """Write the LR twin of `cfg.src`; returns metrics (rows, sizes, crops/s)."""
    timer = Timer()
    src = Path(cfg.src)
    out = Path(cfg.out) if cfg.out is not None else default_out(src)
    if cfg.scale < 1:
        raise InputError(f"--scale must be >= 1, got {cfg.scale}")
    if cfg.batch < 1:
        raise InputError(f"--batch must be >= 1, got {cfg.batch}")
    if cfg.workers is not None and cfg.workers < 0:
        raise InputError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.compression not in S.COMPRESSIONS:
        raise InputError(f"--compression must be one of {', '.join(S.COMPRESSIONS)}, got '{cfg.compression}'")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise InputError(f"the output {out} is the source store itself")
    check_output(out, "file", overwrite=cfg.overwrite)
    with S.open_store(src, S.SCHEMA) as f:
        ds = f["hr"]
        n, hr_size = int(ds.shape[0]), int(ds.shape[-1])
        if hr_size % cfg.scale:
            raise InputError(f"{src}: HR size {hr_size} is not divisible by the scale {cfg.scale}")
        lr_size = hr_size // cfg.scale
        chunk_rows = int(ds.chunks[0]) if ds.chunks else S.CHUNK_ROWS
        attrs = {
            "scale": cfg.scale,
            "source": file_identity(src),
            "source_content_sha256": None,  # set below, from what was read
            "categories": S.attr_json(f, "categories"),
            "hr_size": hr_size,
            "lr_size": lr_size,
            "method": "torch.nn.functional.interpolate bicubic antialias=True align_corners=False, round half to even, clamp",
        }
        for k in ("split", "mode"):
            if k in f.attrs:
                attrs[k] = S.attr_str(f, k)
        batch = max(chunk_rows, (cfg.batch // chunk_rows) * chunk_rows)
    # Every HR byte is read and hashed against the digest recorded when the store was written, so
    # a damaged store is refused and the twin records the digest of what was actually read.
    verify_timer = Timer()
    attrs["source_content_sha256"] = S.verify_store(src, S.SCHEMA)["content_sha256"]
    verify_s = verify_timer.elapsed
    workers = default_workers() if cfg.workers is None else cfg.workers
    spans = [(start, min(start + batch, n)) for start in range(0, n, batch)]
    workers = min(workers, len(spans))
    log(f"downsample: {n} crops {hr_size} -> {lr_size} px ({src} -> {out}), "
        f"{workers if workers > 1 else 'no'} worker processes")
    pool = reader = None
    if workers > 1:
        # fork where there is one: the workers start at once (no re-import of torch) and open the
        # HR file themselves.
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=(src, cfg.scale, batch))
        slabs = pool.imap(_worker_slab, spans)
    else:
        reader = _SlabReader(src, cfg.scale, batch)
        slabs = map(reader, spans)
    try:
        with S.StoreWriter(out, schema=S.LR_SCHEMA, fields=S.lr_fields(lr_size), attrs=attrs,
                           chunk_rows=chunk_rows, compression=cfg.compression) as w:
            for lr in track(slabs, "downsample", total=len(spans)):
                w.append(lr=lr)
            digest = w.content_sha256()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if reader is not None:
            reader.close()
    # The new twin is in place: a sidecar left beside it describes the old one (should writing the
    # new sidecar fail, on a full disk, the twin stands alone: it records its source and digests).
    S.manifest_path(out).unlink(missing_ok=True)
    metrics = {"rows": n, "hr_size": hr_size, "lr_size": lr_size, "scale": cfg.scale,
               "crops_per_s": n / timer.elapsed if timer.elapsed > 0 else None,
               "workers": workers, "store_bytes": out.stat().st_size, "verify_s": round(verify_s, 3),
               "content_sha256": digest, "wall_time_s": round(timer.elapsed, 3)}
    cfg_out = dataclasses.replace(cfg, src=src, out=out)
    write_store_manifest(out, "downsample", cfg_out, {"src": attrs["source"]}, metrics, seed=None, device="cpu",
                         wall_time_s=timer.elapsed)
    summary_table(f"downsample -> {out}", {k: v for k, v in metrics.items() if k != "content_sha256"})
    return metrics

