"""The training engine: what `train detector`, `train sr` and `train mtgan` share.

As torchvision's `references/detection/engine.py` serves its training scripts: plain functions
and small classes that a stage's own loop calls, no trainer class or hooks.

- Presets and option checks (`fill_preset`, `check_positive`).
- Device and DDP set-up (`setup_device`: torchrun's environment, one GPU per process;
  `wrap_ddp`; `use_channels_last`).
- Data position: `BatchStream` (endless batches of a loader with `set_epoch`, resumable at
  (epoch, position)) and `StepBatchSampler` (index batches that are a function of the step
  alone, detectron2's TrainingSampler, for map-style datasets).
- State: `rng_state` / `set_rng_state` (torch CPU and CUDA, numpy, python),
  `save_training_state` (checkpoint.pt through `sodtool.checkpoint`, read back with
  weights_only), `load_resume` (same stage, same configuration but for the fields that only
  steer a run, same inputs) and `resume_position`.
- The loop's bookkeeping: `MetricsLog` (metrics.jsonl, trimmed to the checkpoint on resume),
  `LossWindow` (loss means and crops/s per log line), `due` (every N steps), `all_finite` (the
  non-finite stop, agreed across DDP ranks), `stop_requested` (the tests' kill hook),
  `open_run_dir` (a folder being trained is not finished), `last_record`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from sodtool import checkpoint
from sodtool.artefacts import (Timer, atomic_path, config_dict, read_jsonl, remove_stale_manifest, same_file, swap_into,
                               temp_path)
from sodtool.console import log
from sodtool.device import dist_env, init_distributed, resolve_device
from sodtool.errors import InputError

# Fields that may change between a run and its resumption (they steer the run, not its result).
RUN_CONTROL_FIELDS = frozenset({"out", "hr", "lr", "sr", "iterations", "device", "num_workers", "log_every",
                                "checkpoint_every", "val_every", "sample_every", "stop_after", "resume", "tensorboard"})
# A training run's TensorBoard events, under its run folder (--tensorboard).
TENSORBOARD_DIR = "tensorboard"
# metrics.jsonl keys that index a line rather than measure something.
_INDEX_KEYS = frozenset({"step", "epoch", "split", "phase"})


def fill_preset(cfg, presets: dict[str, dict[str, Any]]):
    """Replace the None fields of a frozen config with its preset's values."""
    if cfg.preset not in presets:
        raise InputError(f"unknown preset '{cfg.preset}' for --preset (choose from {', '.join(presets)})")
    values = {k: v for k, v in presets[cfg.preset].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **values)


def check_positive(cfg, names: Iterable[str], minimum: int = 1) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v is not None and v < minimum:
            raise InputError(f"--{name.replace('_', '-')} must be at least {minimum}, got {v}")


def setup_device(name: str) -> tuple[torch.device, bool, int, int]:
    """(device, ddp, rank, world size) for a training stage.

    Under torchrun (WORLD_SIZE > 1) the process group is initialised (NCCL on CUDA, gloo on
    CPU) and "--device cuda" means this process's GPU (LOCAL_RANK).
    """
    device = resolve_device(name)
    ddp = init_distributed(device)
    rank, world, local_rank = dist_env()
    if device.type == "cuda" and device.index is None:  # "--device cuda": this process's GPU
        device = torch.device("cuda", local_rank if ddp else torch.cuda.current_device())
    return device, ddp, rank, world


def wrap_ddp(model: torch.nn.Module, device: torch.device, ddp: bool) -> torch.nn.Module:
    """`model` in DistributedDataParallel under DDP, else itself."""
    if not ddp:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


class BatchStream:
    """Endless batches from a `store.make_loader` loader, counted as (epoch, position).

    `position` is the number of batches already taken in `epoch`. A stream built with a saved
    (epoch, position) gives the same batches the original would have given next: the loader's
    order is a function of (seed, epoch) via `set_epoch`.
    """

    def __init__(self, loader, epoch: int = 0, position: int = 0) -> None:
        self.loader, self.epoch, self.position = loader, epoch, position
        self._it = None

    def _open(self, skip: int) -> None:
        self.loader.set_epoch(self.epoch)
        if skip and hasattr(self.loader, "iter_from"):
            self._it = iter(self.loader.iter_from(skip))
            return
        self._it = iter(self.loader)
        for _ in range(skip):  # re-reads the skipped batches: only on resume, at most one epoch
            next(self._it)

    def next(self) -> dict:
        if self._it is None:
            self._open(self.position)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._open(0)
            try:
                batch = next(self._it)
            except StopIteration:
                raise InputError("the training loader yields no batch (fewer rows than the batch size?)") from None
        self.position += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


class StepBatchSampler:
    """An endless, deterministic stream of batches of (index, augmentation) pairs from `start_step`.

    The augmentation of an item is (hflip: bool, vflip: bool, quarter_turns: int 0..3), each
    drawn only when switched on. Epoch e is a permutation drawn from (seed, e) alone, with the
    augmentations drawn beside it, and batches run across epoch boundaries (like detectron2's
    TrainingSampler). So batch s is the same whether a run got there directly or resumed at
    step s: resumption needs no saved sampler state.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, hflip: bool = True,
                 vflip: bool = False, rot90: bool = False) -> None:
        if n == 0:
            raise InputError("the training split has no images")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90

    def epoch(self, e: int) -> tuple[list[int], list[tuple[bool, bool, int]]]:
        state = np.random.SeedSequence([self.seed, e]).generate_state(2)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        perm = torch.randperm(self.n, generator=g).tolist()
        # Draw order: hflips, vflips, turns; a switch that is off draws nothing, so the other
        # draws (and the runs made before the switch existed) stay as they were.
        hflips = (torch.rand(self.n, generator=g) < 0.5).tolist() if self.hflip else [False] * self.n
        vflips = (torch.rand(self.n, generator=g) < 0.5).tolist() if self.vflip else [False] * self.n
        turns = torch.randint(0, 4, (self.n,), generator=g).tolist() if self.rot90 else [0] * self.n
        return perm, list(zip(hflips, vflips, turns))

    def __iter__(self) -> Iterator[list[tuple[int, tuple[bool, bool, int]]]]:
        e, offset = divmod(self.start_step * self.batch_size, self.n)
        batch: list[tuple[int, tuple[bool, bool, int]]] = []
        while True:
            perm, augs = self.epoch(e)
            for i in range(offset, self.n):
                batch.append((perm[i], augs[i]))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            e, offset = e + 1, 0


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as weights_only-loadable data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pystate, gauss_next = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "state": list(pystate), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def tensorboard_writer(folder: Path, purge_step: Optional[int]):
    """A TensorBoard SummaryWriter on `folder` (events at steps >= purge_step, left by a killed
    run, are dropped); InputError naming the extra when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("--tensorboard needs the tensorboard package: pip install 'sodtool[tensorboard]'") from None
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


class MetricsLog:
    """`metrics.jsonl`, one JSON object per line, appended as training goes (so `tail -f` works).

    Resuming from a checkpoint at step k first drops the lines logged after k by the run that
    was killed (rewritten atomically), so the log of a resumed run equals an uninterrupted one.

    `tensorboard` (a folder, --tensorboard): every numeric value of every line is also a
    TensorBoard scalar, tagged "<split or train>/<key>" at the line's step, and `image` adds
    sample images; metrics.jsonl stays the record.
    """

    def __init__(self, path: Path, resume_step: Optional[int], enabled: bool = True,
                 tensorboard: Optional[Path] = None) -> None:
        self.path, self.enabled = Path(path), enabled
        self._kept: set[str] = set()
        self.tb = None
        if not enabled:
            return
        if tensorboard is not None:
            self.tb = tensorboard_writer(Path(tensorboard), None if resume_step is None else resume_step + 1)
        kept = [rec for rec in read_jsonl(self.path) if resume_step is not None and rec.get("step", 0) <= resume_step]
        # Lines the resumed run may log again at its resume step (the final validation of a
        # finished run that is rerun): they are in the log already.
        self._kept = {_row_key(rec) for rec in kept if rec.get("step") == resume_step}
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(rec) + "\n" for rec in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if not self.enabled or _row_key(record) in self._kept:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            group = record.get("split", "train")
            for key, value in record.items():
                if key not in _INDEX_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{group}/{key}", value, int(record["step"]))
            self.tb.flush()

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A sample image (uint8 [H, W, 3]) for TensorBoard; nothing without --tensorboard."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")
            self.tb.flush()


def _row_key(record: dict) -> str:
    """What makes a metrics.jsonl row the same row: its step, split and keys (not its values,
    which hold timings)."""
    return json.dumps([record.get("step"), record.get("split"), sorted(record)])


def load_resume(path: Path, cfg, inputs: dict[str, dict], stage: str,
                free: frozenset[str] = RUN_CONTROL_FIELDS, restart: str = "use another --out") -> Optional[dict]:
    """The checkpoint at `path` if there is one made by the same configuration, else None.

    A checkpoint of another configuration (fields outside `free`) or of other input
    files is refused with an InputError: the user should pick another --out or delete it.
    """
    if not path.is_file():
        return None
    ckpt = checkpoint.load_dict(path, "cpu", "training checkpoint")
    saved = ckpt.get("config")
    if not isinstance(saved, dict) or "step" not in ckpt or ckpt.get("stage") != stage:
        raise InputError(f"{path} is not a checkpoint of `sodtool {stage.replace('-', ' ')}` "
                         f"(stage {ckpt.get('stage')!r}); delete it or use another --out")
    now = config_dict(cfg)
    diff = [k for k in sorted(set(saved) | set(now)) if k not in free and saved.get(k) != now.get(k)]
    if diff:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:4])
        raise InputError(f"{path} was made with another configuration ({shown}); "
                         f"rerun with the same options to resume, or {restart}")
    for name, ident in inputs.items():
        old = ckpt.get("inputs", {}).get(name)
        if old is not None and not same_file(old, ident):
            raise InputError(f"{path} was trained on another {name} file than {ident.get('path')}; "
                             f"use another --out to train on it")
    return ckpt


def resume_position(ckpt: Optional[dict], path: Path, iterations: int, announce: bool) -> tuple[int, dict, float]:
    """(step, loader stream state, elapsed seconds) to continue a run from: zeros without a
    checkpoint; else the checkpoint's, with its RNG states restored (the caller loads the weights)."""
    if ckpt is None:
        return 0, {"epoch": 0, "position": 0}, 0.0
    set_rng_state(ckpt["rng"])
    step = int(ckpt["step"])
    if announce:
        log(f"resuming from {path} at iteration {step}/{iterations}")
    # A step-indexed sampler (StepBatchSampler) keeps no stream state: its position is the step.
    return step, ckpt.get("stream", {"epoch": 0, "position": 0}), float(ckpt.get("elapsed_s", 0.0))


def to_float(x: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [0, 1] on `device`."""
    x = x.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def all_finite(values: list[torch.Tensor], ddp: bool) -> bool:
    """Whether every loss is finite, on every rank (one scalar all_reduce under DDP)."""
    ok = torch.stack([v.detach().float() for v in values]).isfinite().all().float()
    if ddp:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


class Accumulator:
    """Running means of detached scalar terms, on device (no host sync until `means`). Each term
    is averaged over the steps that reported it (MTGAN's D warm-up steps have no G terms)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k].to(v.device) + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        out = {k: float(v.item()) / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out

    def state(self) -> dict:
        """The running sums (float32, exactly) and counts as weights_only-loadable data."""
        return {"sums": {k: v.detach().float().cpu() for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def load_state(self, state: Optional[dict]) -> None:
        """Continue from `state()`: the next means are those an uninterrupted run would give."""
        state = state or {}
        self.sums = {k: v.clone() for k, v in state.get("sums", {}).items()}
        self.counts = {k: int(n) for k, n in state.get("counts", {}).items()}


class LossWindow:
    """The loss terms of the steps since the last log line (`Accumulator` means) and the crops/s
    they ran at, for a metrics line and the progress bar.

    A checkpoint taken between two log lines holds the window so far (`state`, saved beside the
    weights); a run resumed from it continues that window (`load_state`), so the line that closes
    it is the uninterrupted run's, not the mean of the steps after the resume alone. Crops/s
    covers the steps run since the resume: it is a timing."""

    def __init__(self, state: Optional[dict] = None) -> None:
        self.acc, self.crops, self.timer = Accumulator(), 0, Timer()
        self.acc.load_state(state)

    def state(self) -> dict:
        return self.acc.state()

    def add(self, terms: dict[str, torch.Tensor], crops: int) -> None:
        self.acc.add(terms)
        self.crops += crops

    def flush(self) -> tuple[dict[str, float], float]:
        """(mean of each term, crops per second) since the last flush; starts a new window."""
        terms, rate = self.acc.means(), self.crops / max(self.timer.elapsed, 1e-9)
        self.crops, self.timer = 0, Timer()
        return terms, rate


def due(step: int, every: int, last: Optional[int] = None) -> bool:
    """Whether something done every `every` steps (and at step `last`) is done after `step`."""
    return step % every == 0 or step == last


def stop_requested(cfg, step: int) -> bool:
    """The tests' kill hook: `cfg.stop_after` reached before the end (checkpointed, then returned)."""
    return cfg.stop_after is not None and cfg.stop_after <= step < cfg.iterations


def use_channels_last(device: torch.device, *modules: torch.nn.Module) -> bool:
    """Put `modules` in channels_last (on CUDA, also let cuDNN autotune: the crop sizes are
    fixed); returns whether channels_last is on (inputs must then follow).

    On the CPU too: oneDNN's convolutions run faster in it, and nowhere slower
    (`benchmarks/bench_train.py` with and without --nchw; figures in docs/results.md). The layout
    changes the order of floating-point sums, so a run does not repeat the figures of a run made
    in the standard layout.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif device.type != "cpu":
        return False
    for m in modules:
        m.to(memory_format=torch.channels_last)
    return True


def open_run_dir(out: Path, main: bool, fresh: bool = False) -> Path:
    """The folder a training run writes into, created (rank 0); returns it.

    Resuming (`fresh` False), or with nothing in `out` to keep: `out` itself, its manifest (from an
    earlier run) dropped, since a folder being trained is not finished. Starting over
    (`--no-resume`) when `out` holds a previous run: the temporary folder `.OUT.PID.tmp` beside
    it, so that the previous run stays whole until `close_run_dir` swaps the new one in.
    """
    out = Path(out)
    keep = fresh and out.is_dir() and any(out.iterdir())
    run = temp_path(out) if keep else out
    if main:
        if keep and run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        remove_stale_manifest(run)
    return run


def close_run_dir(run: Path, out: Path, main: bool) -> None:
    """After the run's model and manifest are written: a run built beside `out` replaces it."""
    if main and Path(run) != Path(out):
        swap_into(Path(run), Path(out))


def fmt_terms(terms: dict[str, float]) -> str:
    """Loss terms for the progress bar: every term, by name."""
    return " ".join(f"{k}={v:.3g}" for k, v in terms.items())


def save_training_state(path: Path, state: dict, *, step: int, cfg, inputs: dict, stage: str, elapsed_s: float,
                        stream: Optional[dict] = None) -> Path:
    """checkpoint.pt: the stage's `state` (weights, optimisers, schedulers) plus what resuming needs:
    step, data position, every RNG state, resolved config, input identities, stage, time spent."""
    full = {**state, "step": step, "rng": rng_state(), "config": config_dict(cfg), "inputs": inputs,
            "elapsed_s": elapsed_s, "stage": stage}
    if stream is not None:
        full["stream"] = stream
    return checkpoint.save(full, path)


def last_record(path: Path, key: str) -> dict:
    """The last record of a metrics.jsonl that has `key` ({} when none: a resumed, finished run logs nothing new)."""
    return next((rec for rec in reversed(read_jsonl(path)) if key in rec), {})
