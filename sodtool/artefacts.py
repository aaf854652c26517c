"""Artefact conventions shared by every stage (DESIGN.md section 7).

- Files are written under a temporary name in the same folder and renamed into place
  (`os.replace` is atomic on POSIX), so a killed stage never leaves a file that looks finished.
- An output folder is finished when it holds `manifest.json`; the manifest is written last.
- Inputs are identified by SHA-256 (or size + mtime for very large files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from sodtool import __version__
from sodtool.errors import InputError

MANIFEST = "manifest.json"
# Files above this size are identified by size and mtime: hashing a 20 GB HDF5 store on every
# stage start would cost minutes.
HASH_LIMIT_BYTES = 512 * 1024 * 1024


# Every temporary file or folder this tool writes is named `.NAME.PID.tmp` beside the output
# NAME it becomes, so that a later run can tell its own leftovers (those of a dead PID) from
# anything else.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
OVERWRITE_HINT = "pass --overwrite to replace it once the new one is complete"


def temp_path(final: str | os.PathLike) -> Path:
    """The temporary name of `final` for this process: `.NAME.PID.tmp` in the same folder."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    On any exception the temporary file is removed and `final` (if it existed) is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Build an output folder under its temporary name and swap it onto `out` only at the end.

    Yields the empty temporary folder `.OUT.PID.tmp` beside `out`. If the block succeeds the old
    `out` (if any) is moved aside, the new folder renamed onto `out` and the old one deleted: a
    previous output stays whole until the new one is complete. On an exception, or a kill, the
    temporary folder is what is left (removed here, or by `remove_stale_temporaries` next time).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        swap_into(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def swap_into(new: Path, out: Path) -> None:
    """Put the complete folder `new` in the place of `out` (which may not exist) and delete the old
    `out`. The old one is first renamed `.OUT.old.PID.tmp`: a kill between the two renames leaves
    it there, and `remove_stale_temporaries` puts it back."""
    old = out.with_name(f".{out.name}.old.{os.getpid()}.tmp") if out.exists() else None
    if old is not None:
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover: this process writes one output at a time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def remove_stale_temporaries(out: str | os.PathLike) -> int:
    """Remove the `.OUT.PID.tmp` / `.OUT.old.PID.tmp` leftovers of dead processes beside `out`
    and, when `out` is a folder, the `.NAME.PID.tmp` ones inside it; returns how many were removed.
    A live process's temporaries (another run writing the same output) are left alone."""
    out = Path(out)
    places = [(out.parent, {out.name, f"{out.name}.old"})]
    if out.is_dir():
        places.append((out, None))
    removed = 0
    for folder, names in places:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            m = _TEMP_RE.match(entry.name)
            if m is None or (names is not None and m.group("name") not in names) or _pid_alive(int(m.group("pid"))):
                continue
            if names is not None and m.group("name").endswith(".old") and not (out.exists() or out.is_symlink()):
                # Killed between the two renames of staged_dir: the previous output was moved aside
                # and the new one not yet in place. Put the previous one back.
                os.replace(entry, out)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def check_output(path: str | os.PathLike, kind: str, *, overwrite: bool = False, option: str = "--out",
                 finished: bool | None = None) -> Path:
    """Check an output path before any work starts; an InputError (one line, exit 2) says what is wrong.

    kind: "file" or "folder". Checked: the path is of that kind if it exists; its nearest
    existing ancestor is a folder this process may write in; an output already there (the file,
    or a non-empty folder; `finished` overrides that test, e.g. False for a training run, which
    resumes) is refused unless `overwrite`. Then the stale temporaries of earlier killed
    runs writing the same output are removed.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    p = Path(path)
    if p.exists() or p.is_symlink():
        if kind == "file" and p.is_dir():
            raise InputError(f"{option} {p} is a folder; give the path of the file to write")
        if kind == "folder" and not p.is_dir():
            raise InputError(f"{option} {p} is a file; give a folder")
    # The output is created (or renamed into place) in its nearest existing ancestor, and an
    # existing folder output is also written into.
    probe = p.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot write {p}: {probe} is a file, not a folder")
    for folder in [probe] + ([p] if p.is_dir() else []):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(f"cannot write {p}: no permission to write in {folder}")
    if finished is None:
        finished = p.is_file() if kind == "file" else p.is_dir() and any(
            _TEMP_RE.match(e.name) is None for e in p.iterdir())
    if finished and not overwrite:
        raise InputError(f"{p} already exists ({OVERWRITE_HINT})")
    remove_stale_temporaries(p)
    return p


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write JSON atomically. Keys keep their insertion order, so equal inputs give equal bytes."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, default=_json_default)
            f.write("\n")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or malformed file into one clear `InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text") from e


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return config_dict(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def config_dict(cfg: Any) -> dict:
    """A config dataclass as a JSON-ready dict (paths as strings, tuples as lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = config_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def file_identity(path: str | os.PathLike) -> dict:
    """Identity of an input file (or folder): sha256 when small enough, else size and mtime."""
    p = Path(path)
    if p.is_dir():
        manifest = p / MANIFEST
        if manifest.is_file():
            return {"path": str(p), "kind": "run-folder", "manifest_sha256": _sha256(manifest)}
        return {"path": str(p), "kind": "folder"}
    st = p.stat()
    ident = {"path": str(p), "size": st.st_size}
    if st.st_size <= HASH_LIMIT_BYTES:
        ident["sha256"] = _sha256(p)
    else:
        ident["mtime"] = st.st_mtime
    return ident


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict:
    """Installed versions, read from package metadata: importing torch just to name its
    version would cost data-only stages seconds and a gigabyte."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"sodtool": __version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "pycocotools", "numpy", "h5py"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:  # pragma: no cover - reported, never fatal
            out[dist] = "not installed"
    return out


def sidecar_manifest_path(output_file: str | os.PathLike) -> Path:
    """The manifest of a single-file output beside it: rois_train.h5 -> rois_train.h5.manifest.json,
    detections_minival.json -> detections_minival.manifest.json (RUN/ holds several stages' files)."""
    p = Path(output_file)
    name = p.name[:-5] if p.name.endswith(".json") else p.name
    return p.with_name(name + ".manifest.json")


def write_manifest(
    out_dir: str | os.PathLike,
    stage: str,
    config: Any,
    inputs: dict[str, Any],
    metrics: dict,
    *,
    seed: int | None,
    device: str,
    wall_time_s: float,
    outputs: list[str] | None = None,
    path: str | os.PathLike | None = None,
) -> Path:
    """Write `out_dir/manifest.json` (or `path`, for a single-file output's sidecar manifest):
    the mark that the output is finished. Call it last.

    `inputs` values are paths (identified here: hash, or size + mtime) or identities already
    computed (dicts)."""
    out_dir = Path(out_dir)
    manifest = {
        "stage": stage,
        "config": config_dict(config) if dataclasses.is_dataclass(config) else config,
        "inputs": {k: (v if isinstance(v, dict) else file_identity(v) if v is not None and Path(v).exists() else None)
                   for k, v in inputs.items()},
        "outputs": outputs or sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".") and p.name != MANIFEST),
        "versions": versions(),
        "device": device,
        "host": socket.gethostname(),
        "cwd": os.getcwd(),  # what the relative paths above were relative to (run_input)
        "seed": seed,
        "wall_time_s": round(wall_time_s, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": metrics,
    }
    return write_json(Path(path) if path is not None else out_dir / MANIFEST, manifest)


def read_manifest(run_dir: str | os.PathLike, expected_stage: str | None = None) -> dict:
    """Read a finished stage folder's manifest; an unfinished or foreign folder is an InputError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run folder not found: {run_dir}")
    path = run_dir / MANIFEST
    if not path.is_file():
        raise InputError(f"{run_dir} has no {MANIFEST}: the stage that writes it did not finish")
    manifest = read_json(path, "manifest")
    if expected_stage is not None and manifest.get("stage") != expected_stage:
        raise InputError(f"{run_dir} holds the output of stage '{manifest.get('stage')}', expected '{expected_stage}'")
    return manifest


def run_input(run_dir: str | os.PathLike, manifest: dict, recorded: str | os.PathLike | None) -> Path | None:
    """A path the manifest of `run_dir` records (a config value or an input's "path"), found again
    after the run may have moved; None when it is nowhere.

    As recorded, if it exists (absolute, or relative to the working directory); else at the same
    place relative to the run folder as when the run was written (its config's `out`; relative
    paths made absolute with the manifest's `cwd`, or, in manifests without one, taken as they
    were: both relative to one working directory), so that a run moved or copied as a whole
    folder, with its inputs inside or beside it, keeps finding them.
    """
    if recorded is None or str(recorded) == "":
        return None
    path = Path(recorded)
    if path.exists():
        return path
    out = (manifest.get("config") or {}).get("out")
    if not isinstance(out, str) or not out:
        return None
    cwd = manifest.get("cwd")
    rec, made = str(recorded), out
    if os.path.isabs(rec) != os.path.isabs(made):
        if not isinstance(cwd, str):
            return None  # one absolute, one relative to a working directory not recorded
        rec, made = os.path.join(cwd, rec), os.path.join(cwd, made)
    found = Path(os.path.normpath(Path(run_dir) / os.path.relpath(rec, made)))
    return found if found.exists() else None


class Timer:
    """Wall-clock timer: `t = Timer(); ...; t.elapsed`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def same_file(recorded: Any, actual: dict) -> bool:
    """Whether a recorded `file_identity` names the same bytes as `actual`: by digest where both
    have one, else by size and mtime."""
    if not isinstance(recorded, dict):
        return False
    if "sha256" in recorded and "sha256" in actual:
        return recorded["sha256"] == actual["sha256"]
    return recorded.get("size") == actual.get("size") and recorded.get("mtime") == actual.get("mtime")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSON-lines file such as metrics.jsonl, in order ([] if there is no file).

    Lines that do not parse (one cut by a kill) and values that are not objects are skipped.
    """
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def remove_stale_manifest(out: str | os.PathLike) -> None:
    """A folder being (re)written is not finished: drop the manifest an earlier run left there."""
    m = Path(out) / MANIFEST
    if m.is_file():
        m.unlink()
