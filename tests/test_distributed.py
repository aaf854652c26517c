"""Distributed and GPU readiness, tested on CPU: DDP over gloo and the bf16 autocast path.

- `train sr` and `train mtgan` in 2 processes (torch.multiprocessing, gloo, the RANK /
  WORLD_SIZE / LOCAL_RANK / MASTER_* environment torchrun would give): the ranks end with equal
  weights, read disjoint shards of the rows, and only rank 0 writes files.
- `torchrun --nproc_per_node=2 -m sodtool train sr` on CPU: the launch path users type.
- The CUDA mixed-precision path (bf16 autocast, float32 losses) run on CPU through the same
  step functions and stages the trainers use.

How the ranks' weights are compared: the stages return metrics only and build their networks
inside, so each worker process (this module's `_worker`) wraps the constructors the stage
module uses (`Generator`; `generator_from_checkpoint` and `Discriminator`) to keep the instances
it builds, and after the stage returns saves their state_dicts, the rows its loader gave it and
the files it wrote into a per-rank dump file of the TEST's own. Writes are seen by an audit hook
(`sys.addaudithook`: open-for-writing, mkdir, rename/replace, remove) limited to the output
folders, switched on only around the stage call.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from test_train import HR, K, LR_SIZE, write_hr, write_lr  # plain module-level helpers

WORLD = 2
SPAWN_TIMEOUT_S = 240  # a hung collective fails the test instead of hanging CI


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (as tests/test_train.py): tiny convolutions gain nothing from more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    """48-row HR (32 px) / LR (8 px) stores of 12 images: one image (4 rows) held out, 44 training rows, 22 per rank."""
    d = tmp_path_factory.mktemp("dstores")
    hr = write_hr(d / "rois_train.h5")
    return hr, write_lr(hr, d / "rois_train_lr.h5")


@pytest.fixture(scope="module")
def sr_run(stores, tmp_path_factory) -> Path:
    """A finished tiny single-process `train sr` run: the generator `train mtgan` starts from."""
    from sodtool.stages.train_sr import TrainSRConfig, train_sr

    hr, lr = stores
    out = tmp_path_factory.mktemp("druns") / "sr"
    train_sr(TrainSRConfig(hr=hr, lr=lr, out=out, iterations=2, batch_size=4, channels=8, up_channels=8,
                           num_blocks=1, val_every=2, log_every=1, checkpoint_every=2, device="cpu"))
    return out


def _sr_kwargs(hr: Path, lr: Path, out: Path) -> dict:
    return dict(hr=hr, lr=lr, out=out, iterations=4, batch_size=4, channels=8, up_channels=8, num_blocks=1,
                val_every=2, log_every=1, checkpoint_every=2, device="cpu", seed=0)


def _mtgan_kwargs(hr: Path, lr: Path, sr: Path, out: Path) -> dict:
    # One D-only warm-up iteration, then 3 full ones; D's lr drops after 3 (the scheduler runs too).
    return dict(hr=hr, lr=lr, sr=sr, out=out, iterations=4, batch_size=4, disc_arch="resnet18", d_lr=0.01,
                d_lr_step=3, d_warmup=1, log_every=1, checkpoint_every=2, sample_every=2, val_every=2,
                device="cpu", seed=1)


# --------------------------------------------------------------------------------------------
# The per-rank worker (module level: torch.multiprocessing pickles it by name)
# --------------------------------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.symlink", "os.link",
                 "shutil.copyfile", "shutil.rmtree", "shutil.move"}


def _install_write_recorder(watch: list[str]):
    """Record (event, path) of every file-system write under `watch` while `state["on"]`."""
    state = {"on": False, "writes": []}
    roots = [os.path.realpath(w) for w in watch]

    def under(p) -> str | None:
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if not isinstance(p, (str, os.PathLike)):
            return None  # a file descriptor
        rp = os.path.realpath(os.fspath(p))
        return rp if any(rp == r or rp.startswith(r + os.sep) for r in roots) else None

    def hook(event: str, args: tuple) -> None:
        if not state["on"]:
            return
        if event == "open":
            path, _mode, flags = args
            if isinstance(flags, int) and flags & _WRITE_FLAGS and (p := under(path)):
                state["writes"].append(("open", p))
        elif event in _WRITE_EVENTS and args:
            for a in args[:2]:
                if p := under(a):
                    state["writes"].append((event, p))

    sys.addaudithook(hook)
    return state


def _worker(rank: int, world: int, port: int, stage: str, kwargs: dict, dump_dir: str, watch: list[str]) -> None:
    """One DDP rank: run the stage with the torchrun environment, then dump what the test compares."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # containers whose hostname resolves oddly
    torch.set_num_threads(1)
    import torch.distributed as dist

    if stage == "sr":
        import sodtool.stages.train_sr as mod

        run, cfg_cls, ctor_names = mod.train_sr, mod.TrainSRConfig, ("Generator",)
    else:
        import sodtool.stages.train_mtgan as mod

        run, cfg_cls, ctor_names = mod.train_mtgan, mod.TrainMTGANConfig, ("generator_from_checkpoint", "Discriminator")
    built: dict[str, list] = {}
    for name in ctor_names:  # keep the networks the stage builds
        assert hasattr(mod, name), f"{mod.__name__} no longer builds its networks with {name}: update this test"
        real = getattr(mod, name)

        def recording(*a, _real=real, _name=name, **k):
            net = _real(*a, **k)
            built.setdefault(_name, []).append(net)
            return net

        setattr(mod, name, recording)
    rows: list[int] = []
    real_stream = mod.BatchStream

    class RecordingStream(real_stream):  # the rows this rank's loader gives it
        def next(self):
            batch = super().next()
            rows.extend(int(i) for i in batch["index"])
            return batch

    mod.BatchStream = RecordingStream
    recorder = _install_write_recorder(watch)
    recorder["on"] = True
    try:
        metrics = run(cfg_cls(**kwargs))
    finally:
        recorder["on"] = False
    nets = {name: [{k: v.detach().cpu().clone() for k, v in net.state_dict().items()} for net in nets]
            for name, nets in built.items()}
    params = {name: [[n for n, _ in net.named_parameters()] for net in nets_] for name, nets_ in built.items()}
    torch.save({"rank": rank, "states": nets, "param_names": params, "rows": rows, "writes": recorder["writes"],
                "metrics": json.loads(json.dumps(metrics, default=str)), "ddp": dist.is_initialized(),
                "world": dist.get_world_size() if dist.is_initialized() else 1},
               Path(dump_dir) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(stage: str, kwargs: dict, dump_dir: Path, watch: list[Path]) -> list[dict]:
    """Run `_worker` on WORLD ranks; a worker's exception fails the test with its traceback."""
    import torch.multiprocessing as mp

    dump_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), stage, kwargs, str(dump_dir), [str(w) for w in watch]),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{WORLD}-process train {stage} did not finish in {SPAWN_TIMEOUT_S} s (a hung collective?)")
    return [torch.load(dump_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_ranks_agree(dumps: list[dict], name: str) -> None:
    """Every parameter of network `name` is bit-identical on all ranks (DDP kept them in step).

    BatchNorm running statistics are not compared: DDP broadcasts rank 0's buffers at the start
    of each forward, so after the last forward each rank holds its own batch's update (rank 0's
    are the ones saved)."""
    ref = dumps[0]
    assert len(ref["states"][name]) == 1, f"the stage built {len(ref['states'][name])} {name}"
    names = ref["param_names"][name][0]
    assert names
    for other in dumps[1:]:
        assert other["param_names"][name][0] == names
        for k in names:
            a, b = ref["states"][name][0][k], other["states"][name][0][k]
            assert torch.equal(a, b), f"{name}.{k} differs between rank 0 and rank {other['rank']}"


def _assert_disjoint_shards(dumps: list[dict], n_iter: int, batch: int) -> None:
    for d in dumps:
        assert d["ddp"] and d["world"] == WORLD
        assert len(d["rows"]) == n_iter * batch
    # 22 rows per rank per epoch (44 training rows): the first epoch's rows of the ranks do not overlap.
    per_epoch = 44 // WORLD // batch * batch
    firsts = [set(d["rows"][:per_epoch]) for d in dumps]
    assert not firsts[0] & firsts[1], "the ranks read the same rows"


def _assert_only_rank0_wrote(dumps: list[dict], out: Path) -> None:
    assert dumps[0]["writes"], "the write recorder saw nothing on rank 0 (broken hook?)"
    assert all(Path(p).is_relative_to(out.resolve()) for _, p in dumps[0]["writes"])
    for d in dumps[1:]:
        assert d["writes"] == [], f"rank {d['rank']} wrote: {d['writes'][:5]}"


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# DDP, 2 processes, gloo
# --------------------------------------------------------------------------------------------


def test_train_sr_two_ranks_gloo(stores, tmp_path):
    hr, lr = stores
    out = tmp_path / "sr"
    kw = _sr_kwargs(hr, lr, out)
    dumps = _spawn("sr", kw, tmp_path / "dump", watch=[tmp_path / "sr", hr.parent])
    _assert_ranks_agree(dumps, "Generator")
    _assert_disjoint_shards(dumps, kw["iterations"], kw["batch_size"])
    _assert_only_rank0_wrote(dumps, out)
    # What rank 0 wrote: every artefact once, its own final weights, each step logged once.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "generator.pt", "manifest.json", "metrics.jsonl", "trained_images.json"]
    saved = _state(out / "generator.pt")["generator"]
    mine = dumps[0]["states"]["Generator"][0]
    assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in saved)
    assert _state(out / "checkpoint.pt")["step"] == 4
    lines = _lines(out / "metrics.jsonl")
    assert [x["step"] for x in lines if "g_mse" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in lines if x.get("split") == "val"] == [2, 4]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train-sr" and manifest["metrics"]["iterations"] == 4
    assert all(d["metrics"]["iterations"] == 4 for d in dumps)


def test_train_mtgan_two_ranks_gloo(stores, sr_run, tmp_path):
    hr, lr = stores
    out = tmp_path / "mtgan"
    kw = _mtgan_kwargs(hr, lr, sr_run, out)
    dumps = _spawn("mtgan", kw, tmp_path / "dump", watch=[out, sr_run, hr.parent])
    _assert_ranks_agree(dumps, "generator_from_checkpoint")
    _assert_ranks_agree(dumps, "Discriminator")
    _assert_disjoint_shards(dumps, kw["iterations"], kw["batch_size"])
    _assert_only_rank0_wrote(dumps, out)
    # G trained (it is not the MSE-pretrained one any more), and rank 0 saved its final weights.
    g0 = _state(sr_run / "generator.pt")["generator"]
    g = dumps[0]["states"]["generator_from_checkpoint"][0]
    assert any(not torch.equal(g0[k], g[k]) for k in g0 if g0[k].is_floating_point())
    model = _state(out / "model.pt")
    for key, net in (("generator", "generator_from_checkpoint"), ("discriminator", "Discriminator")):
        mine = dumps[0]["states"][net][0]
        assert model[key].keys() == mine.keys() and all(torch.equal(model[key][k], mine[k]) for k in mine), key
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint.pt", "manifest.json", "metrics.jsonl", "model.pt", "samples", "trained_images.json"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["iter_0000002.png", "iter_0000004.png"]
    ck = _state(out / "checkpoint.pt")
    assert ck["step"] == 4 and ck["scheduler_d"]["last_epoch"] == 4
    train = [x for x in _lines(out / "metrics.jsonl") if "d_total" in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4] and ["g_total" in x for x in train] == [False, True, True, True]
    assert [x["lr_d"] for x in train] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train-mtgan" and manifest["metrics"]["iterations"] == 4


def test_torchrun_cli_two_ranks(stores, tmp_path):
    """The launch users type: `torchrun --standalone --nproc_per_node=2 -m sodtool train sr ... --device cpu`."""
    hr, lr = stores
    out = tmp_path / "sr"
    kw = _sr_kwargs(hr, lr, out)
    args = ["train", "sr", "--hr", str(hr), "--lr", str(lr), "--out", str(out), "--device", "cpu"]
    for k in ("iterations", "batch_size", "channels", "up_channels", "num_blocks", "val_every", "log_every",
              "checkpoint_every", "seed"):
        args += ["--" + k.replace("_", "-"), str(kw[k])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                           f"--nproc_per_node={WORLD}", "-m", "sodtool", "--quiet", *args],
                          env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "generator.pt", "manifest.json", "metrics.jsonl", "trained_images.json"]
    lines = _lines(out / "metrics.jsonl")
    assert [x["step"] for x in lines if "g_mse" in x] == [1, 2, 3, 4]  # one writer: no line twice
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["iterations"] == 4


@pytest.mark.parametrize("argv, code", [(["info"], 0), (["data", "stats", "--data", "no/such/folder"], 2)])
def test_cli_tears_the_process_group_down(argv, code, tmp_path):
    """Every command, done or failed, leaves no process group behind: left to interpreter exit,
    gloo's threads can abort a rank whose work is done (exit -6, about 1 launch in 90 on a loaded
    2-core machine), which the two-rank torchrun test above met once in CI."""
    import torch.distributed as dist
    from typer.testing import CliRunner

    from sodtool.cli import app

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == code, result.output
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# bf16 autocast: the CUDA path, on CPU
# --------------------------------------------------------------------------------------------


def _cuda_autocast_on_cpu(dev, enabled: bool = True):
    """What `sodtool.device.autocast` gives a CUDA device (its dtype and on/off), run on CPU."""
    from sodtool.device import autocast

    with warnings.catch_warnings():  # "CUDA is not available": the context is only inspected
        warnings.simplefilter("ignore")
        ctx = autocast(torch.device("cuda"), enabled)
    if not isinstance(ctx, torch.autocast):
        return ctx
    return torch.autocast(device_type="cpu", dtype=ctx.fast_dtype)


def _params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _moved(before: dict[str, torch.Tensor], m: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in m.named_parameters())


def test_autocast_contract():
    """CUDA: bf16 autocast; CPU: none (CPU runs stay fp32 and bit-reproducible); disabled: none."""
    from sodtool.device import autocast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cuda = autocast(torch.device("cuda"))
        off = autocast(torch.device("cuda"), enabled=False)
    assert isinstance(cuda, torch.autocast) and cuda.fast_dtype == torch.bfloat16 and cuda.device == "cuda"
    assert not isinstance(off, torch.autocast)
    assert not isinstance(autocast(torch.device("cpu")), torch.autocast)


def test_bf16_autocast_steps_on_cpu(monkeypatch):
    """sr_step and train_step (D warm-up and full) under the CUDA autocast, on CPU: the networks
    run in bf16, the losses and every term are finite float32, both networks' parameters stay
    float32 and move."""
    import sodtool.stages.train_mtgan as tm
    import sodtool.stages.train_sr as ts
    from sodtool.losses import LossWeights
    from sodtool.models.networks import Discriminator, Generator

    monkeypatch.setattr(ts, "autocast", _cuda_autocast_on_cpu)
    monkeypatch.setattr(tm, "autocast", _cuda_autocast_on_cpu)
    dev = torch.device("cpu")
    torch.manual_seed(0)
    b = 4
    x, y = torch.rand(b, 3, LR_SIZE, LR_SIZE), torch.rand(b, 3, HR, HR)
    u = torch.tensor([0, 1, 2, 3])
    v = torch.randn(b, 4) * 0.1
    g = Generator(8, 8, 1).train()
    d = Discriminator(K, "resnet18").train()
    out_dtypes: list[torch.dtype] = []  # of every conv / linear layer of G and D, as they run
    hooks = [m.register_forward_hook(lambda m, i, o: out_dtypes.append(o.dtype))
             for net in (g, d) for m in net.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear))]

    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    before = _params(g)
    loss = ts.sr_step(g, opt, x, y, dev)
    assert out_dtypes and set(out_dtypes) == {torch.bfloat16}, f"sr_step did not run G in bf16: {out_dtypes}"
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert _moved(before, g) and all(p.dtype == torch.float32 for p in g.parameters())

    d_params = [p for p in d.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3)
    opt_d = torch.optim.AdamW(d_params, lr=1e-3)
    sched_d = torch.optim.lr_scheduler.StepLR(opt_d, step_size=10)
    w = LossWeights()
    for g_step in (False, True):
        out_dtypes.clear()
        g_before, d_before = _params(g), _params(d)
        loss_d, loss_g, terms = tm.train_step(g, d, d_params, opt_g, opt_d, sched_d, x, y, u, v, w, dev, g_step=g_step)
        assert out_dtypes and set(out_dtypes) == {torch.bfloat16}, out_dtypes
        assert loss_d.dtype == torch.float32 and torch.isfinite(loss_d)
        assert terms and all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values()), terms
        assert _moved(d_before, d)
        if g_step:
            assert loss_g.dtype == torch.float32 and torch.isfinite(loss_g)
            assert {"g_mse", "g_adv", "g_cls", "g_reg", "g_total"} <= terms.keys()
            assert _moved(g_before, g)
        else:
            assert loss_g is None and not _moved(g_before, g)
        assert all(p.dtype == torch.float32 and p.requires_grad for p in d.parameters())
    for h in hooks:
        h.remove()


def test_bf16_autocast_stages_on_cpu(stores, sr_run, tmp_path, monkeypatch):
    """The whole `train sr` and `train mtgan` loops (validation, samples, checkpoints) with the CUDA
    autocast on CPU: they finish with finite losses and loadable float32 weights."""
    import sodtool.stages.train_mtgan as tm
    import sodtool.stages.train_sr as ts

    calls = []

    def counting(dev, enabled=True):
        calls.append(dev.type)
        return _cuda_autocast_on_cpu(dev, enabled)

    monkeypatch.setattr(ts, "autocast", counting)
    monkeypatch.setattr(tm, "autocast", counting)
    hr, lr = stores
    m = ts.train_sr(ts.TrainSRConfig(**{**_sr_kwargs(hr, lr, tmp_path / "sr"), "iterations": 2}))
    assert calls and m["final_g_mse"] is not None and torch.isfinite(torch.tensor(m["final_g_mse"]))
    calls.clear()
    m = tm.train_mtgan(tm.TrainMTGANConfig(**{**_mtgan_kwargs(hr, lr, sr_run, tmp_path / "mtgan"), "iterations": 3}))
    assert calls
    finals = {k: v for k, v in m.items() if k.startswith("final_")}
    assert {"final_g_total", "final_d_total"} <= finals.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in finals.values()), finals
    model = _state(tmp_path / "mtgan" / "model.pt")
    for key in ("generator", "discriminator"):
        assert all(t.dtype in (torch.float32, torch.int64) for t in model[key].values())
