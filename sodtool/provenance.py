"""Which images a model was trained on, by image identity, so that `eval` can refuse training images.

An image's identity is a digest of its file's bytes (`image_digest`: SHA-256, the first
DIGEST_CHARS hex digits), not its path or split name: a copy of the train images under another
folder or split name has the same identities.

Records:
- `crop-rois` records the identity of every image it cropped in its ROI store (`sodtool.store`,
  the `images/` group: image id -> digest); stores written before this have none.
- `train detector`, `train sr` and `train mtgan` write `trained_images.json` into their run folder
  (`write_record`): {"format", "count", "sha": [sorted digests], "unrecorded": [what they
  learnt from that records no images]}. The detector records its train split's images (and
  those of the `--weights` it started from); train sr the images of its training stores; train
  mtgan those of its store, plus the records of the `--sr` run (G starts from it) and of the
  `--disc-init` detector (D's trunk starts from it).

`find_overlap` intersects the identities of the images being evaluated with each model's record.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from sodtool import store
from sodtool.artefacts import file_identity, read_json, same_file, write_json
from sodtool.console import warn
from sodtool.errors import InputError

RECORD = "trained_images.json"
RECORD_FORMAT = "sodtool.trained-images/1"
DIGEST_CHARS = 20
ALLOW_OPTION = "--allow-trained-images"


def image_digest(path: str | os.PathLike) -> str:
    """The identity of an image: SHA-256 of its file's bytes, first DIGEST_CHARS hex digits."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise InputError(f"image file missing: {path}") from None
    return h.hexdigest()[:DIGEST_CHARS]


def split_digests(split, image_ids: Optional[Iterable[int]] = None) -> dict[int, str]:
    """{image id: image_digest} of a CocoSplit's images (all of them, or `image_ids`)."""
    ids = split.image_ids if image_ids is None else image_ids
    return {int(i): image_digest(split.image_path(i)) for i in ids}


def record_folder(path: str | os.PathLike) -> Path:
    """Where a model's record lives: its run folder (the folder itself, or a model file's folder)."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def write_record(folder: str | os.PathLike, digests: Iterable[str], unrecorded: Sequence[str] = ()) -> Path:
    """Write `folder/trained_images.json` (atomically): the identities of the images trained on,
    and the inputs (`unrecorded`) that record none, so that the record may be incomplete."""
    sha = sorted(set(digests))
    return write_json(Path(folder) / RECORD, {"format": RECORD_FORMAT, "count": len(sha), "sha": sha,
                                              "unrecorded": sorted(set(str(u) for u in unrecorded))})


def read_record(path: str | os.PathLike) -> Optional[dict]:
    """The record of the model at `path` (a run folder or a file in one); None when it has none."""
    f = record_folder(path) / RECORD
    if not f.is_file():
        return None
    rec = read_json(f, "trained-images record")
    if not isinstance(rec, dict) or not isinstance(rec.get("sha"), list):
        raise InputError(f"{f} is not a trained-images record (no 'sha' list)")
    return {"sha": [str(s) for s in rec["sha"]], "unrecorded": [str(u) for u in rec.get("unrecorded", [])],
            "path": str(f)}


def gather(records: Iterable[tuple[str, Optional[dict]]], store_digests: Iterable[str] = ()) -> tuple[set, list]:
    """Union of what a training stage learnt from: (digests, unrecorded names). `records` are
    (name, record or None) of the runs it started from; `store_digests` its own images'."""
    digests, unrecorded = set(store_digests), []
    for name, rec in records:
        if rec is None:
            unrecorded.append(name)
        else:
            digests.update(rec["sha"])
            unrecorded.extend(rec["unrecorded"])
    return digests, unrecorded


def store_record(path: str | os.PathLike) -> tuple[set, list]:
    """(digests of the images cropped into the ROI store `path`, [path] when it records none)."""
    d = store.image_digests(path)
    return (set(), [str(path)]) if d is None else (set(d.values()), [])


def store_detector(path: str | os.PathLike) -> tuple[Optional[Path], str]:
    """The detector weights file that made the ROI store `path`, as recorded in its `detector`
    attribute: (file, "") when it is still there, unchanged; (None, why not) otherwise."""
    det = store.store_info(path).get("detector")
    if not isinstance(det, dict) or det.get("kind") != "checkpoint":
        kind = det.get("kind") if isinstance(det, dict) else None
        return None, (f"its ROIs come from {kind or 'an unrecorded source'}, not a detector checkpoint "
                      "sodtool can look up")
    ident = det.get("file") or {}
    f = Path(str(ident.get("path", "")))
    if not f.is_file():
        return None, f"the detector that made it ({f}) is no longer there"
    if not same_file(ident, file_identity(f)):
        return None, f"the detector file that made it ({f}) has changed since"
    return f, ""


def find_overlap(evaluated: dict[int, str], models: Sequence[tuple[str, str, Optional[dict]]], split_name: str,
                 allow: bool) -> Optional[dict]:
    """Refuse models trained on images being evaluated.

    evaluated: {image id: digest} of the images evaluated; models: (name, what, record or None),
    `what` naming the model for a reader ("MTGAN runs/quick/mtgan"). A model without a record
    is warned about (it cannot be checked), never refused. An overlap is an InputError naming
    the model and the count, unless `allow`: then a warning, and the overlap is returned as
    {"images": overlapping images, "of": images evaluated, "models": [names]}. None: no overlap.
    """
    eval_sha = set(evaluated.values())
    hits = []
    for name, what, rec in models:
        if rec is None:
            warn(f"{what} records no training images ({RECORD}): whether it was trained on the images "
                 "evaluated cannot be checked")
            continue
        if rec["unrecorded"]:
            warn(f"{what} started from {', '.join(rec['unrecorded'])}, which record(s) no training images: "
                 "its check covers only the rest")
        common = eval_sha & set(rec["sha"])
        if common:
            hits.append((name, what, sum(1 for s in evaluated.values() if s in common), common))
    if not hits:
        return None
    n_all = len(evaluated)
    shared = set().union(*(c for *_, c in hits))
    n_images = sum(1 for s in evaluated.values() if s in shared)
    name, what, n, _ = hits[0]
    also = "; also " + ", ".join(f"{w} ({k})" for _, w, k, _ in hits[1:]) if hits[1:] else ""
    head = (f"{what} was trained on {n} of the {n_all} images of split '{split_name}' being evaluated "
            f"(image file digests match{also})")
    if not allow:
        raise InputError(f"{head}: evaluate another split, or pass {ALLOW_OPTION} to debug")
    warn(f"{head}; {ALLOW_OPTION}: evaluating anyway, the figures include {n_images} training images")
    return {"images": n_images, "of": n_all, "models": [h[0] for h in hits]}


def evaluated_digests(split, rois: Optional[str | os.PathLike] = None) -> Optional[dict[int, str]]:
    """{image id: digest} of the images of `split` being evaluated: from the ROI store's record
    (`rois`), else (and for images it does not record) from the image files; None, with a
    warning, when neither is at hand."""
    recorded = store.image_digests(rois) if rois is not None else None
    out: dict[int, str] = {}
    for i in split.image_ids:
        if recorded is not None and int(i) in recorded:
            out[int(i)] = recorded[int(i)]
        elif split.image_path(i).is_file():
            out[int(i)] = image_digest(split.image_path(i))
    if not out:
        warn(f"{rois} records no image identities and the images of {split.ann_path} are not at hand (give --images): "
             "whether the models were trained on them cannot be checked")
        return None
    return out


def check_evaluation(split, split_name: str, models: Sequence[tuple[str, str, str | os.PathLike]], *,
                     detector: Optional[str | os.PathLike] = None, rois: Optional[str | os.PathLike] = None,
                     allow: bool = False) -> Optional[dict]:
    """`eval`'s check: the models (name, what, model file or run folder) and the detector (the
    `detector` file, or the one that made the `rois` store) against the images of `split` being
    evaluated (`find_overlap`). Returns the overlap that `allow` let pass, or None."""
    evaluated = evaluated_digests(split, rois)
    if evaluated is None:
        return None
    checked = [(name, what, read_record(path)) for name, what, path in models]
    if detector is not None:
        checked.append(("detector", f"detector {detector}", read_record(detector)))
    elif rois is not None:
        det, why = store_detector(rois)
        if det is None:
            warn(f"{rois}: {why}: whether that detector was trained on the images evaluated cannot be checked")
        else:
            checked.append(("detector", f"detector {det} (which made {rois})", read_record(det)))
    return find_overlap(evaluated, checked, split_name, allow)
