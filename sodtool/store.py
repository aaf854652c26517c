"""The HDF5 ROI store (DESIGN.md section 3): crops, per-row labels and provenance, and the loader.

HR file `rois_<split>.h5` (schema "sodtool.rois/2"), N rows in image order:

    hr        uint8   [N, 3, S, S]  the crop, RGB, S = `hr_size` (128 by default)
    label     int64   [N]           0 = background, 1..K = class
    target    float32 [N, 4]        raw deltas (dx, dy, dw, dh) from the ROI's square to gt_box
                                    (boxes.encode_target); zeros for background
    roi       float32 [N, 4]        the ROI, xyxy image pixels
    gt_box    float32 [N, 4]        best-overlapping ground truth, xyxy (zeros when no ground truth overlaps)
    iou       float32 [N]           IoU of roi and gt_box (0 when none)
    image_id  int64   [N]           dataset image id
    score     float32 [N]           baseline detector score (0 for added ground-truth rows)
    det_label int64   [N]           baseline class 1..K (0 for added ground-truth rows)
    window    float32 [N, 4]        the square crop window, xyxy image pixels (may leave the image)
    source    uint8   [N]           0 = detector ROI, 1 = jittered ground truth, 2 = random background box (--gt-only)

File attributes: `schema`, `categories` (JSON of CategoryMap.to_json()), `hr_size`, `context`,
`mode` ("train" | "test"), `split`, `detector` (JSON identity), `annotations` (JSON
file_identity of the annotation file), `image_dir`; sodtool also writes `rows`, `chunk_rows`,
`compression`, `padding`, `content_sha256` (a digest of every dataset's bytes in row order: two
stores with equal content have equal digests, whatever their HDF5 layout) and, for shards,
`shard` ("i/n").

Group `images/` (crop-rois since image identities were recorded; older stores have none):
`image_id` int64 [M] and `sha` bytes [M], the identity (`sodtool.provenance.image_digest`, a
digest of the file's bytes) of every image cropped, rows or not. Like the attributes it is
provenance, not content: `content_sha256` does not cover it.

Digests (`content_digest_version`): version 2 stores record, beside `content_sha256`,
`metadata_sha256`, a digest of the attributes that give the pixels their meaning
(META_ATTRS: schema, categories, crop geometry, mode, split, the sources' identities, rows)
and of the `images/` group; `verify_store` checks both. Stores without the attribute were
written with version 1 (`content_sha256` only) and are verified under it. The two digests are
kept apart so that `content_sha256` still names the content alone: the LR twin's
`source_content_sha256`, merged shards (equal to the unsharded store) and every reader that
compares content digests are unchanged.

LR file `rois_<split>_lr.h5` (schema "sodtool.rois-lr/1", written by `sodtool downsample`):
`lr` uint8 [N, 3, S/4, S/4] in the same row order, same chunk rows, uncompressed by default; attributes `scale`, `source` (JSON
file_identity of the HR file), `source_content_sha256` (the HR file's `content_sha256`, which
the loader checks, so a stale LR twin is refused), `categories` (copied), `content_sha256`.

Writing: the file is built under a hidden temporary name through h5py's file-object driver on
`_GuardedFile`, which never lets HDF5 see a failed write. HDF5 does not survive one (a full
disk left its state broken: every later close failed, and the process ended in a segmentation
fault); instead, the first write error (ENOSPC, EDQUOT, EIO...) is recorded, the bytes HDF5
writes from then on are kept in memory (a few MB: the writer stops at its next step), HDF5
closes cleanly, the temporary file is removed and the error is raised as an OSError naming the
store. No estimate of free space is needed, and a disk filled by another process is handled too.

Layout: image datasets are chunked by CHUNK_ROWS rows and HR crops compressed with LZF.
Decompression, not I/O, bounds reads, so the faster filter wins over the smaller one
(benchmarks/bench_rois.py; docs/design_notes.md); `compression="none"` trades disk for read
speed. 8 rows per chunk (384 KiB at S = 128).

Shuffling is chunk-aware: the order of chunks is shuffled, then rows are shuffled inside windows
of consecutive chunks (`mixing_window`: up to 64 chunks, as many as half of HDF5's chunk cache
holds), so a batch mixes rows of many chunks, i.e. of many images, while the window's chunks
stay in the cache and a shuffled epoch still decompresses every chunk about once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np
import torch

from sodtool.artefacts import atomic_path, sidecar_manifest_path, write_manifest
from sodtool.coco import CategoryMap
# The HR crops' default filter, in the torch-free config module so that `crop-rois --help` reads it.
from sodtool.configs.crop_rois import COMPRESSION
from sodtool.console import warn
from sodtool.errors import InputError

# /2: `target` is relative to the ROI's square (boxes.encode_target), no longer to the ROI itself.
SCHEMA = "sodtool.rois/2"
LR_SCHEMA = "sodtool.rois-lr/1"
CHUNK_ROWS = 8
COMPRESSIONS = ("lzf", "gzip", "none")
# Per-row metadata (labels, boxes) is tiny: large chunks keep it to a few reads per file.
META_CHUNK_ROWS = 4096
# Per-process chunk cache: holds a few batches' worth of decompressed chunks.
CACHE_BYTES = 32 * 1024 * 1024
# Chunks whose rows a shuffled epoch mixes (at most; see `mixing_window`): a batch of 32 then
# holds rows of about 30 chunks, i.e. of as many images, instead of 4 runs of 8 consecutive rows.
MIX_CHUNKS = 64

# The group recording the identity of every image cropped (module docstring).
IMAGES_GROUP = "images"

# Per-row fields of the HR store (the image dataset `hr` is added with its size).
ROW_FIELDS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    "label": (np.dtype(np.int64), ()),
    "target": (np.dtype(np.float32), (4,)),
    "roi": (np.dtype(np.float32), (4,)),
    "gt_box": (np.dtype(np.float32), (4,)),
    "iou": (np.dtype(np.float32), ()),
    "image_id": (np.dtype(np.int64), ()),
    "score": (np.dtype(np.float32), ()),
    "det_label": (np.dtype(np.int64), ()),
    "window": (np.dtype(np.float32), (4,)),
    "source": (np.dtype(np.uint8), ()),
}
# The attributes every HR store carries (the brief's schema); readers may rely on them.
HR_ATTRS = ("schema", "categories", "hr_size", "context", "mode", "split", "detector", "annotations", "image_dir")
LR_ATTRS = ("schema", "scale", "source", "categories")
# The attributes that give a store's pixels their meaning: what `metadata_sha256` (digest
# version 2) covers, each when present (an attribute added or removed changes the digest too).
# Layout (chunk_rows, compression), paths (image_dir) and run options (config) stay outside.
META_ATTRS = ("schema", "categories", "hr_size", "lr_size", "scale", "context", "padding", "crop_method", "method",
              "mode", "split", "detector", "annotations", "source", "source_content_sha256", "rows", "shard")
# 1: content_sha256 (datasets) only; 2: content_sha256 and metadata_sha256.
DIGEST_VERSION = 2


def hr_fields(hr_size: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every dataset of an HR store: name -> (dtype, shape of one row)."""
    return {"hr": (np.dtype(np.uint8), (3, hr_size, hr_size)), **ROW_FIELDS}


def lr_fields(lr_size: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    return {"lr": (np.dtype(np.uint8), (3, lr_size, lr_size))}


# --------------------------------------------------------------------------------------------
# Reading


def open_store(path: str | os.PathLike, expect_schema: str | None = SCHEMA) -> h5py.File:
    """Open a ROI store read-only and check its schema (None: accept either sodtool schema).

    Raises InputError for a missing file, a file that is not HDF5, or another schema.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ROI store not found: {path}")
    try:
        f = h5py.File(path, "r", rdcc_nbytes=CACHE_BYTES, rdcc_nslots=10007)
    except OSError as e:
        raise InputError(f"{path} is not a readable HDF5 file ({e})") from None
    found = f.attrs.get("schema")
    if isinstance(found, bytes):
        found = found.decode("utf-8", "replace")
    accepted = (SCHEMA, LR_SCHEMA) if expect_schema is None else (expect_schema,)
    if found not in accepted:
        f.close()
        expected = " or ".join(repr(s) for s in accepted)
        what = "no schema attribute" if found is None else f"schema {found!r}"
        hint = ""
        if found == LR_SCHEMA and expect_schema == SCHEMA:
            hint = " (this is a low-resolution twin; pass the rois_<split>.h5 it was made from)"
        elif found == SCHEMA and expect_schema == LR_SCHEMA:
            hint = " (this is a high-resolution store; make its twin with `sodtool downsample`)"
        elif found == "sodtool.rois/1":
            hint = (" (an older store, whose box targets are relative to the ROI itself: crop the ROIs again "
                    "with `sodtool crop-rois`)")
        raise InputError(f"{path} has {what}, expected {expected}{hint}")
    image_key = "hr" if found == SCHEMA else "lr"
    needed = [image_key] + (list(ROW_FIELDS) if found == SCHEMA else [])
    missing = [k for k in needed if k not in f]
    if missing:
        f.close()
        raise InputError(f"{path} is damaged: dataset(s) {', '.join(missing)} missing")
    return f


def attr_str(f: h5py.File, key: str) -> str:
    v = f.attrs[key]
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def attr_json(f: h5py.File, key: str) -> Any:
    return json.loads(attr_str(f, key))


def store_categories(path: str | os.PathLike):
    """The CategoryMap recorded in an HR or LR store."""
    with open_store(path, expect_schema=None) as f:
        try:
            return CategoryMap.from_json(attr_json(f, "categories"))
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(f"{path}: unreadable 'categories' attribute ({e})") from None


def store_info(path: str | os.PathLike, expect_schema: str | None = SCHEMA) -> dict:
    """Attributes (JSON ones decoded) and row count of a store, e.g. for manifests and checks."""
    with open_store(path, expect_schema) as f:
        info = {}
        for k in f.attrs:
            v = f.attrs[k]
            if isinstance(v, bytes):
                v = v.decode("utf-8")
            if isinstance(v, np.generic):
                v = v.item()
            if k in ("categories", "detector", "annotations", "source", "config", "sampling") and isinstance(v, str):
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            info[k] = v
        key = "hr" if info["schema"] == SCHEMA else "lr"
        info["num_rows"] = int(f[key].shape[0])
        info["image_size"] = int(f[key].shape[-1])
        return info


def image_digests(path: str | os.PathLike) -> dict[int, str] | None:
    """{image id: identity} of the images cropped into the HR store `path` (its `images/` group);
    None for a store written before they were recorded."""
    with open_store(path, SCHEMA) as f:
        g = f.get(IMAGES_GROUP)
        if not isinstance(g, h5py.Group) or "image_id" not in g or "sha" not in g:
            return None
        ids, sha = g["image_id"][:], g["sha"][:]
    if len(ids) != len(sha):
        raise InputError(f"{path} is damaged: its '{IMAGES_GROUP}' record has {len(ids)} ids and {len(sha)} digests")
    return {int(i): (s.decode("ascii") if isinstance(s, bytes) else str(s)) for i, s in zip(ids.tolist(), sha.tolist())}


def verify_store(path: str | os.PathLike, expect_schema: str | None = None) -> dict:
    """Recompute a store's digests from its bytes and compare them with the recorded ones.

    Every dataset is read in row order, a few chunks at a time, and hashed as StoreWriter
    hashed it (`content_sha256`); a version-2 store's attributes and image record are hashed
    too (`metadata_sha256`, see META_ATTRS). Returns {"rows", "bytes" (uncompressed bytes
    hashed), "content_sha256", "digest_version", "metadata_sha256" (None for version 1)}. A
    store whose digests differ, that records none, whose chunks cannot be decompressed, or
    whose `rows` / `hr_size` attributes contradict its datasets is an InputError naming it.
    """
    path = Path(path)
    with open_store(path, expect_schema) as f:
        if "content_sha256" not in f.attrs:
            raise InputError(f"{path} records no content digest: it cannot be verified (write it again)")
        recorded = attr_str(f, "content_sha256")
        version = _digest_version(f, path)
        digests, hashed, rows = {}, 0, 0
        for name in sorted(k for k in f.keys() if isinstance(f[k], h5py.Dataset)):
            ds = f[name]
            rows = int(ds.shape[0])
            step = max(1, int(ds.chunks[0]) if ds.chunks else CHUNK_ROWS) * 16
            h = hashlib.sha256()
            for start in range(0, rows, step):
                try:
                    block = ds[start:start + step]
                except OSError as e:
                    raise InputError(f"{path} is corrupted: rows {start}-{min(start + step, rows) - 1} of '{name}' "
                                     f"cannot be read ({str(e).splitlines()[0]})") from None
                h.update(np.ascontiguousarray(block))
                hashed += block.nbytes
            digests[name] = h.hexdigest()
        _check_shape_attrs(f, path)
        meta = meta_recorded = None
        if version >= 2:
            if "metadata_sha256" not in f.attrs:
                raise InputError(f"{path} is corrupted: it records digest version {version} but no metadata digest")
            meta_recorded = attr_str(f, "metadata_sha256")
            try:
                meta = metadata_digest(f)
            except OSError as e:
                raise InputError(f"{path} is corrupted: its '{IMAGES_GROUP}' record cannot be read "
                                 f"({str(e).splitlines()[0]})") from None
    actual = combine_digests(digests)
    if actual != recorded:
        raise InputError(f"{path} is corrupted: its content digest is {actual[:12]}..., "
                         f"the one recorded when it was written {recorded[:12]}...")
    if version < 2:
        warn(f"{path} was written before stores recorded a metadata digest (digest version 1): its datasets are "
             "verified, its attributes (categories, crop geometry, sources) cannot be; crop it again to have them covered")
    if meta != meta_recorded:
        raise InputError(f"{path} is corrupted: its attributes (categories, crop geometry, sources, rows...) or its "
                         f"'{IMAGES_GROUP}' record changed since it was written (metadata digest {meta[:12]}..., "
                         f"recorded {meta_recorded[:12]}...)")
    return {"rows": rows, "bytes": hashed, "content_sha256": actual, "digest_version": version,
            "metadata_sha256": meta}


def _digest_version(f: h5py.File, path: Path) -> int:
    v = f.attrs.get("content_digest_version", 1)
    try:
        v = int(v)
    except (TypeError, ValueError):
        raise InputError(f"{path} is corrupted: unreadable 'content_digest_version' attribute ({v!r})") from None
    if not 1 <= v <= DIGEST_VERSION:
        raise InputError(f"{path} records digest version {v}, which this sodtool does not know (it knows 1 to "
                         f"{DIGEST_VERSION}): verify it with the sodtool that wrote it")
    return v


def _check_shape_attrs(f: h5py.File, path: Path) -> None:
    """`rows` and the crop size recorded in the attributes must be what the datasets hold."""
    key = "hr" if "hr" in f else "lr"
    n, size = int(f[key].shape[0]), int(f[key].shape[-1])
    checks = [("rows", n)] + [(k, size) for k in (("hr_size",) if key == "hr" else ("lr_size",))]
    for k, held in checks:
        if k not in f.attrs:
            continue
        v = f.attrs[k]
        try:
            same = int(v) == held and float(v) == held
        except (TypeError, ValueError):
            same = False
        if not same:
            raise InputError(f"{path} is corrupted: its '{k}' attribute says {_plain(v)!r}, its '{key}' dataset holds "
                             f"{held} {'rows' if k == 'rows' else 'px crops'}")


def _plain(v: Any) -> Any:
    """An attribute value as plain Python (str, int, float, bool, lists)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.dtype.kind in "SO" else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def metadata_digest(f: h5py.File) -> str:
    """Digest (version 2) of the attributes that give a store's pixels their meaning (META_ATTRS,
    each as stored, or marked absent) and of its `images/` group (every dataset's bytes)."""
    h = hashlib.sha256(b"sodtool.store-metadata/2\n")
    for k in META_ATTRS:
        if k in f.attrs:
            h.update(f"{k}={json.dumps(_plain(f.attrs[k]), sort_keys=True, default=str)}\n".encode())
        else:
            h.update(f"{k} absent\n".encode())
    g = f.get(IMAGES_GROUP)
    if isinstance(g, h5py.Group):
        for name in sorted(g.keys()):
            ds = g[name]
            if isinstance(ds, h5py.Dataset):
                h.update(f"{IMAGES_GROUP}/{name} {ds.dtype.str} {ds.shape}\n".encode())
                h.update(np.ascontiguousarray(ds[()]).tobytes())
            else:
                h.update(f"{IMAGES_GROUP}/{name} group\n".encode())
    else:
        h.update(f"{IMAGES_GROUP} absent\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing


class StoreWriter:
    """Append rows to a new store; the file appears at `path` only when the `with` block succeeds.

        with StoreWriter(out, schema=SCHEMA, fields=hr_fields(128), attrs={...}) as w:
            w.append(hr=crops, label=labels, ...)   # any batch size, every field each time

    Rows are buffered and written in whole chunks (a partial chunk would be compressed twice).
    The file is built under a hidden temporary name beside `path` and renamed at the end; an
    exception removes it and leaves any existing `path` untouched; a killed process leaves only
    the hidden `.NAME.PID.tmp`, never a file with the final name. A failed write (a full disk)
    is an OSError naming `path`, raised at the next `append` or at the end, with the temporary
    removed (see `_GuardedFile`).
    """

    def __init__(self, path: str | os.PathLike, *, schema: str, fields: dict[str, tuple[np.dtype, tuple[int, ...]]],
                 attrs: dict[str, Any], chunk_rows: int = CHUNK_ROWS, compression: str = COMPRESSION):
        if compression not in COMPRESSIONS:
            raise InputError(f"unknown compression '{compression}' (use {', '.join(COMPRESSIONS)})")
        if chunk_rows < 1:
            raise InputError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.path = Path(path)
        self.schema = schema
        self.fields = fields
        self.attrs = attrs
        self.chunk_rows = chunk_rows
        self.compression = None if compression == "none" else compression
        self.compression_name = compression
        self.rows = 0
        self._buf: dict[str, list[np.ndarray]] = {k: [] for k in fields}
        self._buffered = 0
        self._hash = {k: hashlib.sha256() for k in fields}
        self._images: dict[int, str] | None = None
        self._ctx = None
        self._io: _GuardedFile | None = None
        self._file: h5py.File | None = None

    def __enter__(self) -> "StoreWriter":
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        try:
            self._io = _GuardedFile(tmp)
            self._file = h5py.File(self._io, "w")
            for name, (dtype, shape) in self.fields.items():
                image = len(shape) == 3
                rows = self.chunk_rows if image else META_CHUNK_ROWS
                self._file.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                          chunks=(rows, *shape), compression=self.compression)
            self._check_io()
        except BaseException:
            self._abort()
            raise
        return self

    def _check_io(self) -> None:
        """Raise the first write error of the file (a full disk) as an OSError naming the store."""
        e = self._io.error if self._io is not None else None
        if e is not None:
            code = e.errno or errno.EIO
            raise OSError(code, e.strerror or os.strerror(code), str(self.path))

    def append(self, **arrays: np.ndarray | torch.Tensor) -> None:
        """Append a batch: every field, each [B, ...] with the field's dtype-compatible values."""
        if set(arrays) != set(self.fields):
            missing = sorted(set(self.fields) - set(arrays))
            extra = sorted(set(arrays) - set(self.fields))
            raise ValueError(f"append needs exactly the fields {sorted(self.fields)} (missing {missing}, extra {extra})")
        n = None
        ready = {}
        for name, a in arrays.items():  # check everything before buffering anything
            dtype, shape = self.fields[name]
            a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            if a.shape[1:] != shape:
                raise ValueError(f"field {name}: rows of shape {a.shape[1:]}, expected {shape}")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"field {name}: {a.shape[0]} rows, other fields have {n}")
            ready[name] = np.ascontiguousarray(a, dtype=dtype)
        for name, a in ready.items():
            self._buf[name].append(a)
        self._buffered += n or 0
        if self._buffered >= 4 * self.chunk_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        n = self._buffered if final else (self._buffered // self.chunk_rows) * self.chunk_rows
        if n == 0:
            return
        f = self._file
        for name in self.fields:
            data = np.concatenate(self._buf[name]) if len(self._buf[name]) > 1 else self._buf[name][0]
            head, rest = data[:n], data[n:]
            ds = f[name]
            ds.resize(self.rows + n, axis=0)
            ds[self.rows:self.rows + n] = head
            self._hash[name].update(np.ascontiguousarray(head))  # buffer protocol: no copy
            self._buf[name] = [rest] if len(rest) else []
        self.rows += n
        self._buffered -= n
        self._check_io()

    def content_sha256(self) -> str:
        return combine_digests({k: h.hexdigest() for k, h in self._hash.items()})

    def record_images(self, digests: dict[int, str]) -> None:
        """Record the identities of the images cropped ({image id: digest}; the `images/` group),
        written with the file at the end of the `with` block."""
        self._images = {int(k): str(v) for k, v in digests.items()}

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._abort(exc_type, exc, tb)
            return False
        try:
            self._flush(final=True)
            f = self._file
            for k, v in self.attrs.items():
                f.attrs[k] = _attr_value(v)
            f.attrs["schema"] = self.schema
            f.attrs["rows"] = self.rows
            f.attrs["chunk_rows"] = self.chunk_rows
            f.attrs["compression"] = self.compression_name
            f.attrs["content_sha256"] = self.content_sha256()
            if self._images is not None:
                ids = sorted(self._images)
                g = f.create_group(IMAGES_GROUP)
                g.create_dataset("image_id", data=np.asarray(ids, dtype=np.int64))
                g.create_dataset("sha", data=np.asarray([self._images[i].encode("ascii") for i in ids], dtype="S"))
            f.attrs["content_digest_version"] = DIGEST_VERSION
            f.attrs["metadata_sha256"] = metadata_digest(f)  # from the attributes as stored
            f.close()
            self._file = None
            self._io.close()
            self._check_io()  # the close wrote the last chunks and the metadata
            self._io = None
        except BaseException as e:
            self._abort(type(e), e, e.__traceback__)
            raise
        self._ctx.__exit__(None, None, None)  # renames onto the final path
        return False

    def _abort(self, *exc_info) -> None:
        if self._file is not None:
            try:
                self._file.close()  # safe: HDF5 never saw a failed write (_GuardedFile)
            except Exception:
                pass
            self._file = None
        if self._io is not None:
            self._io.close()
            self._io = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            try:
                ctx.__exit__(*(exc_info or (RuntimeError, RuntimeError("aborted"), None)))
            except BaseException:
                pass  # atomic_path re-raises the exception we are already handling


class _GuardedFile:
    """A file for h5py's file-object driver ("fileobj") that never lets HDF5 see a failed write.

    HDF5 does not recover from a write error: after ENOSPC, closing the file fails, h5py's
    handles fail as they are freed, and the process ends in a segmentation fault. Here the
    first error is recorded in `error` and the write reported as done; from then on every write
    is kept in memory (`_kept`, applied over the disk's bytes when HDF5 reads back), so that
    HDF5 stays consistent and closes cleanly. The writer checks `error` after each step, stops
    and removes the file: what is kept is what HDF5 writes meanwhile, its chunk cache and
    metadata (a few MB). Reads past the end give zeros, as HDF5's POSIX driver does.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "w+b", buffering=0)  # raw: every write reaches the disk here
        self._pos = 0
        self._size = 0
        self.error: OSError | None = None
        self._kept: list[tuple[int, bytes]] = []

    # The calls h5py's driver makes: seek, tell, read, write, truncate, flush.
    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        pos = self._pos
        size = max(0, self._size - pos) if size is None or size < 0 else size
        buf = bytearray(size)
        done = 0
        try:
            self._f.seek(pos)
            while done < size:
                got = self._f.readinto(memoryview(buf)[done:])
                if not got:
                    break
                done += got
        except OSError as e:  # an unreadable disk: HDF5 reads zeros, and the store is refused
            self._fail(e)
        for at, data in self._kept:  # in write order: later writes win
            lo, hi = max(at, pos), min(at + len(data), pos + size)
            if lo < hi:
                buf[lo - pos:hi - pos] = data[lo - at:hi - at]
        self._pos = pos + size
        return bytes(buf)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self.error is None:
            done = 0
            try:
                self._f.seek(self._pos)
                while done < n:
                    done += self._f.write(view[done:])
            except OSError as e:
                self._fail(e)
        if self.error is not None:
            self._kept.append((self._pos, bytes(view)))
        self._pos += n
        self._size = max(self._size, self._pos)
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                self._f.truncate(size)
            except OSError as e:
                self._fail(e)
        self._size = size
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            self._f.close()  # (a network file system may report a failed write only here)
        except OSError as e:
            self._fail(e)
        self._kept = []

    def _fail(self, e: OSError) -> None:
        if self.error is None:
            self.error = e


def combine_digests(digests: dict[str, str]) -> str:
    h = hashlib.sha256()
    for k in sorted(digests):
        h.update(f"{k}:{digests[k]};".encode())
    return h.hexdigest()


def _attr_value(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    if isinstance(v, Path):
        return str(v)
    if v is None:
        return "null"
    return v


# --------------------------------------------------------------------------------------------
# The dataset and the loader


class RoiPairs(torch.utils.data.Dataset):
    """HR/LR crop pairs of a store, as a torch Dataset over row indices.

    `ds[i]` -> dict of one row: `hr` uint8 [3, S, S], `lr` uint8 [3, s, s] (absent without an
    LR file), `label` int64 [], `target` float32 [4], `index` int64 []. `ds[list_of_rows]`
    returns the same keys batched ([B, ...]), reading whole chunks. With a plain DataLoader,
    `__getitems__` hands default_collate one dict per row.

    The HDF5 files are opened lazily in the process that reads them (each DataLoader worker
    opens its own handles; a handle never crosses a fork) and are reopened after one.
    """

    def __init__(self, hr_path: str | os.PathLike, lr_path: str | os.PathLike | None = None):
        self.hr_path = Path(hr_path)
        self.lr_path = Path(lr_path) if lr_path is not None else None
        with open_store(self.hr_path, SCHEMA) as f:
            self.num_rows = int(f["hr"].shape[0])
            self.hr_size = int(f["hr"].shape[-1])
            self.chunk_rows = int(f["hr"].chunks[0]) if f["hr"].chunks else CHUNK_ROWS
            hr_digest = attr_str(f, "content_sha256") if "content_sha256" in f.attrs else None
            hr_cats = attr_str(f, "categories")
        self.lr_size = None
        if self.lr_path is not None:
            with open_store(self.lr_path, LR_SCHEMA) as g:
                lr_rows = int(g["lr"].shape[0])
                self.lr_size = int(g["lr"].shape[-1])
                src_digest = attr_str(g, "source_content_sha256") if "source_content_sha256" in g.attrs else None
                lr_cats = attr_str(g, "categories")
            if lr_rows != self.num_rows or (src_digest is not None and src_digest != hr_digest):
                raise InputError(
                    f"{self.lr_path} was not made from {self.hr_path} ({lr_rows} vs {self.num_rows} rows"
                    f"{'' if src_digest == hr_digest else ', content digest differs'}): "
                    f"run `sodtool downsample {self.hr_path}` again")
            if json.loads(lr_cats) != json.loads(hr_cats):
                raise InputError(f"{self.lr_path}: categories disagree with {self.hr_path}")
        self._pid: int | None = None
        self._hr: h5py.File | None = None
        self._lr: h5py.File | None = None
        self._label: np.ndarray | None = None
        self._target: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_rows

    # Handles are per process: never pickled, reopened after a fork.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=None, _hr=None, _lr=None, _label=None, _target=None)
        return state

    def _open(self) -> None:
        if self._pid == os.getpid() and self._hr is not None:
            return
        # Inherited handles (after fork) belong to the parent's HDF5 state: drop, don't use.
        self._hr = self._lr = None
        self._hr = open_store(self.hr_path, SCHEMA)
        if self.lr_path is not None:
            self._lr = open_store(self.lr_path, LR_SCHEMA)
        self._label = self._hr["label"][:]
        self._target = self._hr["target"][:]
        self._pid = os.getpid()

    def close(self) -> None:
        """Close this process's handles (the loader does this before starting workers)."""
        if self._pid == os.getpid():
            for f in (self._hr, self._lr):
                if f is not None:
                    try:
                        f.close()
                    except Exception:
                        pass
        self._hr = self._lr = None
        self._label = self._target = None
        self._pid = None

    def __getitem__(self, idx):
        if isinstance(idx, list) and idx and isinstance(idx[0], np.ndarray):
            return self.read_batches(idx)
        if isinstance(idx, (int, np.integer)):
            i = int(idx)
            if i < 0:
                i += self.num_rows
            if not 0 <= i < self.num_rows:
                raise IndexError(f"row {idx} out of range for {self.num_rows} rows")
            batch = self.read_batch(np.array([i], dtype=np.int64))
            return {k: v[0] for k, v in batch.items()}
        return self.read_batch(np.asarray(idx, dtype=np.int64))

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        batch = self.read_batch(np.asarray(indices, dtype=np.int64))
        return [{k: v[j] for k, v in batch.items()} for j in range(len(indices))]

    def read_batches(self, batches: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """Several batches (row arrays) read at once, each touched chunk decompressed once: the
        loader reads a shuffled window's batches together, then hands them out one by one."""
        sizes = [len(b) for b in batches]
        whole = self.read_batch(np.concatenate(batches))
        bounds = np.cumsum([0] + sizes)
        return [{k: v[lo:hi] for k, v in whole.items()} for lo, hi in zip(bounds[:-1], bounds[1:])]

    def read_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows `rows` (any order, no duplicates needed) as a batch dict, in that order."""
        self._open()
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"rows outside 0..{self.num_rows - 1}")
        out = {"hr": torch.from_numpy(_read_rows(self._hr["hr"], rows, self.chunk_rows))}
        if self._lr is not None:
            out["lr"] = torch.from_numpy(_read_rows(self._lr["lr"], rows, self.chunk_rows))
        out["label"] = torch.from_numpy(self._label[rows])
        out["target"] = torch.from_numpy(self._target[rows])
        out["index"] = torch.from_numpy(rows.copy())
        return out


def _read_rows(ds: h5py.Dataset, rows: np.ndarray, chunk_rows: int) -> np.ndarray:
    """ds[rows] for arbitrary rows, reading each touched chunk as one contiguous slice."""
    out = np.empty((len(rows), *ds.shape[1:]), dtype=ds.dtype)
    if len(rows) == 0:
        return out
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    chunk = srt // chunk_rows
    starts = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1]])
    ends = np.r_[starts[1:], len(srt)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        lo, hi = int(srt[s]), int(srt[e - 1]) + 1
        block = ds[lo:hi]
        out[order[s:e]] = block[srt[s:e] - lo]
    return out


class ChunkShuffleSampler(torch.utils.data.Sampler):
    """Yields batches (lists of row numbers) in a chunk-aware shuffled order; see the module docstring.

    Deterministic for (seed, epoch): call `set_epoch(e)` before each epoch. With world_size > 1
    the epoch's order is cut into world_size contiguous, disjoint pieces (contiguous keeps each
    rank's reads chunk-local); every rank gets the same number of rows: the shortfall is padded
    with rows from the start of the order (as torch's DistributedSampler), or the tail dropped
    with drop_last.
    """

    def __init__(self, rows: np.ndarray, *, chunk_rows: int, batch_size: int, shuffle: bool, seed: int,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, window_chunks: int | None = None):
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.chunk_rows = chunk_rows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.window_chunks = window_chunks or max(1, math.ceil(batch_size / chunk_rows))
        self.epoch = 0
        self.skip = 0  # batches to leave out at the start of the next iteration (resumption)
        n = len(self.rows)
        if world_size > 1:
            self.rank_rows = n // world_size if drop_last else math.ceil(n / world_size)
        else:
            self.rank_rows = n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_order(self) -> np.ndarray:
        """This rank's rows for the current epoch, in reading order."""
        rows = self.rows
        if self.shuffle and len(rows):
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.seed >> 32 & 0xFFFFFFFF, self.epoch])
            chunk = rows // self.chunk_rows
            uniq, inv = np.unique(chunk, return_inverse=True)
            pos = rng.permutation(len(uniq))[inv]  # each row's chunk's place in the shuffled chunk order
            window = pos // self.window_chunks
            rows = rows[np.lexsort((rng.random(len(rows)), window))]
        if self.world_size > 1:
            total = self.rank_rows * self.world_size
            if total > len(rows):
                rows = np.concatenate([rows, np.resize(rows, total - len(rows))]) if len(rows) else rows
            rows = rows[self.rank * self.rank_rows:(self.rank + 1) * self.rank_rows]
        return rows

    def __len__(self) -> int:
        if self.drop_last:
            return self.rank_rows // self.batch_size
        return math.ceil(self.rank_rows / self.batch_size)

    def reads(self) -> Iterator[list[np.ndarray]]:
        """This epoch's batches (from `skip` on) in groups read together: about one shuffle
        window's rows per group, so a window's chunks are decompressed once for all its batches."""
        order = self.epoch_order()
        skip, self.skip = self.skip, 0
        per_read = max(1, (self.window_chunks * self.chunk_rows) // self.batch_size)
        n = len(self)
        for b0 in range(skip, n, per_read):
            yield [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(b0, min(b0 + per_read, n))]

    def __iter__(self) -> Iterator[np.ndarray]:
        for group in self.reads():
            yield from group


class _Reads(torch.utils.data.Sampler):
    """The read groups of a ChunkShuffleSampler, as the samples of a DataLoader."""

    def __init__(self, sampler: ChunkShuffleSampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        return self.sampler.reads()

    def __len__(self) -> int:
        per_read = max(1, (self.sampler.window_chunks * self.sampler.chunk_rows) // self.sampler.batch_size)
        return math.ceil(len(self.sampler) / per_read)


def _as_is(batch):
    return batch


class RoiLoader:
    """What `make_loader` returns: iterate for batches, `set_epoch(e)` between epochs, `len()` batches."""

    def __init__(self, dataset: RoiPairs, sampler: ChunkShuffleSampler, *, num_workers: int, pin_memory: bool,
                 persistent_workers: bool, prefetch_factor: int | None):
        self.dataset = dataset
        self.sampler = sampler
        self.num_workers = num_workers
        self._kw = dict(num_workers=num_workers, pin_memory=pin_memory, collate_fn=_as_is,
                        persistent_workers=persistent_workers and num_workers > 0)
        if num_workers > 0 and prefetch_factor is not None:
            self._kw["prefetch_factor"] = prefetch_factor
        self._loader: torch.utils.data.DataLoader | None = None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def iter_from(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """This epoch's batches from batch `start` on (resuming mid-epoch without reading the skipped ones)."""
        self.sampler.skip = max(0, int(start))
        return iter(self)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.num_workers > 0:
            self.dataset.close()  # workers fork now: no open HDF5 handle may cross
        if self._loader is None:
            # batch_size=None: each of the sampler's read groups goes to dataset[group] whole
            # (one read of its chunks, in a worker when there are workers), which returns its batches.
            self._loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, sampler=_Reads(self.sampler),
                                                       **self._kw)
        return (batch for group in self._loader for batch in group)


def mixing_window(chunk_rows: int, hr_size: int, batch_size: int) -> int:
    """Chunks whose rows are shuffled together: MIX_CHUNKS, or as many as half of HDF5's chunk
    cache holds at this crop size, rounded down to whole batches, and at least one batch's worth.
    The loader reads each window's batches at once, so each chunk is still decompressed about
    once per epoch.

    Rows are stored image by image (detector ROIs, then jittered ground truth), so a window of
    one batch's chunks would make each batch a few runs of consecutive rows from 4-8 images,
    with a skewed label mix.
    """
    chunk_bytes = chunk_rows * 3 * hr_size * hr_size
    # Whole batches per window (a multiple of lcm(batch, chunk) rows): the loader reads a
    # window's batches together, and a batch that straddled two windows would read both.
    unit = math.lcm(batch_size, chunk_rows) // chunk_rows
    fit = min(MIX_CHUNKS, (CACHE_BYTES // 2) // max(chunk_bytes, 1))
    return max(unit, fit // unit * unit)


def make_loader(hr_path: str | os.PathLike, lr_path: str | os.PathLike | None, *, batch_size: int, shuffle: bool,
                seed: int, num_workers: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                indices: Sequence[int] | np.ndarray | None = None, pin_memory: bool = False,
                persistent_workers: bool = True, prefetch_factor: int | None = None,
                window_chunks: int | None = None) -> RoiLoader:
    """A loader over the HR/LR pairs of a store.

    Yields dicts: `lr` uint8 [B, 3, s, s] (when lr_path is given), `hr` uint8 [B, 3, S, S],
    `label` int64 [B], `target` float32 [B, 4] (raw deltas), `index` int64 [B] (row numbers).
    `indices` restricts it to those rows. Shuffling is chunk-aware and deterministic for
    (seed, epoch); `loader.set_epoch(e)` reshuffles. With world_size > 1 each rank gets a
    disjoint, equally long share of every epoch (padded by up to world_size - 1 repeated rows
    unless drop_last). `window_chunks` (default: `mixing_window`) is how many chunks' rows are
    shuffled together.
    """
    ds = RoiPairs(hr_path, lr_path)
    if indices is None:
        rows = np.arange(ds.num_rows, dtype=np.int64)
    else:
        rows = np.unique(np.asarray(indices, dtype=np.int64))
        if rows.size and (rows[0] < 0 or rows[-1] >= ds.num_rows):
            raise InputError(f"indices outside 0..{ds.num_rows - 1} for {hr_path}")
    if window_chunks is None:
        window_chunks = mixing_window(ds.chunk_rows, ds.hr_size, batch_size)
    sampler = ChunkShuffleSampler(rows, chunk_rows=ds.chunk_rows, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                  rank=rank, world_size=world_size, drop_last=drop_last, window_chunks=window_chunks)
    return RoiLoader(ds, sampler, num_workers=num_workers, pin_memory=pin_memory,
                     persistent_workers=persistent_workers, prefetch_factor=prefetch_factor)


def manifest_path(store_path: str | os.PathLike) -> Path:
    """rois_train.h5 -> rois_train.h5.manifest.json (the store's sidecar manifest)."""
    return sidecar_manifest_path(store_path)


def write_store_manifest(store_path: str | os.PathLike, stage: str, config: Any, inputs: dict, metrics: dict, *,
                         seed: int | None, device: str, wall_time_s: float) -> Path:
    """The sidecar `<store>.manifest.json` (artefacts.write_manifest for one file): the RUN/ folder
    holds several stages' files, so a folder-level manifest.json would claim the whole folder."""
    store_path = Path(store_path)
    return write_manifest(store_path.parent, stage, config, inputs, metrics, seed=seed, device=device,
                          wall_time_s=wall_time_s, outputs=[store_path.name], path=manifest_path(store_path))
