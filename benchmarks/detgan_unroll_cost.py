"""What Eq. 3's unroll costs: `train detgan`'s joint iterations with and without it, side by side.

Both variants run the same joint iterations (no pretraining phase: the unroll only acts in the
joint one) on the same patches, from the same start, one after the other in this process, `rounds`
times alternating; each prints its seconds per iteration (median over rounds) and the ratio.

    python benchmarks/detgan_unroll_cost.py --detector RUN/real/model.pt --data D [--iterations 20 --rounds 3]

Timings on a shared CPU move by 30% from one run to the next: read the ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sodtool.console import set_quiet  # noqa: E402
from sodtool.stages.train_detgan import TrainDetGANConfig, train_detgan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    set_quiet(True)
    times: dict[str, list[float]] = {"unroll": [], "no_unroll": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in times:
                cfg = TrainDetGANConfig(detector=args.detector, data=args.data, out=Path(tmp) / f"{name}_{r}",
                                        iterations=args.iterations, pretrain_iterations=0, unroll=name == "unroll",
                                        checkpoint_every=10**6, sample_every=10**6, device=args.device)
                t0 = time.perf_counter()
                train_detgan(cfg)
                times[name].append((time.perf_counter() - t0) / args.iterations)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"s_per_iteration": {k: round(v, 3) for k, v in med.items()},
                      "unroll_over_no_unroll": round(med["unroll"] / med["no_unroll"], 3),
                      "iterations": args.iterations, "rounds": args.rounds, "device": args.device}))


if __name__ == "__main__":
    main()
