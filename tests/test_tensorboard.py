"""`--tensorboard` on the training commands: events that say what metrics.jsonl says, samples,
resumption without duplicated steps, and a one-line error when the package is missing."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
from test_train import TINY_SR, _mtgan_args, stores  # noqa: F401  (the fixture)

pytest.importorskip("tensorboard", reason="the [tensorboard] extra (in [test]) is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numeric values as TensorBoard stores them: float32, by "<split>/<key>"."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        group = rec.get("split", "train")
        for k, v in rec.items():
            if k not in ("step", "epoch", "split", "phase") and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(f"{group}/{k}", []).append((rec["step"], float(np.float32(v))))
    return out


def test_train_sr_events_equal_metrics_jsonl(cli, stores, tmp_path):  # noqa: F811
    hr, lr = stores
    out = tmp_path / "sr"
    res = cli("train", "sr", "--hr", hr, "--lr", lr, "--out", out, "--tensorboard", *TINY_SR)
    assert res.exit_code == 0, res.stderr
    got, want = _scalars(_events(out)), _expected(out)
    assert "train/g_mse" in got and "val/val_sr_psnr_rgb" in got
    assert got == want


def test_resumed_run_logs_each_step_once(cli, stores, tmp_path):  # noqa: F811
    """Killed (simulated) after step 3 and rerun: the events hold each step once, equal to an
    uninterrupted run's metrics.jsonl."""
    hr, lr = stores
    out = tmp_path / "sr"
    args = ["train", "sr", "--hr", hr, "--lr", lr, "--out", out, "--tensorboard", *TINY_SR]
    res = cli(*args, "--stop-after", "3")
    assert res.exit_code == 0, res.stderr
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    got = _scalars(_events(out))
    assert [s for s, _ in got["train/g_mse"]] == [2, 4, 6]
    assert got == _expected(out)


def test_train_mtgan_writes_sample_images(cli, stores, tmp_path):  # noqa: F811
    hr, lr = stores
    res = cli("train", "sr", "--hr", hr, "--lr", lr, "--out", tmp_path / "sr", *TINY_SR)
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "mtgan"
    res = cli("train", "mtgan", "--hr", hr, "--lr", lr, "--sr", tmp_path / "sr", "--out", out, "--tensorboard",
              *_mtgan_args(4))
    assert res.exit_code == 0, res.stderr
    acc = _events(out)
    assert [e.step for e in acc.Images("samples")] == [3, 4]
    assert _scalars(acc) == _expected(out)


def test_missing_package_is_one_line_naming_the_extra(cli, stores, tmp_path, monkeypatch):  # noqa: F811
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard" or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    hr, lr = stores
    res = cli("train", "sr", "--hr", hr, "--lr", lr, "--out", tmp_path / "sr", "--tensorboard", *TINY_SR)
    assert res.exit_code == 2
    assert res.stderr.strip() == "sodtool: error: --tensorboard needs the tensorboard package: pip install 'sodtool[tensorboard]'"
