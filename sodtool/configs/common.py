"""Help texts that several commands' configs share, word for word (no torch, as every config module)."""

from __future__ import annotations

RESUME_HELP = ("Continue from OUT/checkpoint.pt when it exists (the default), or start over: a previous run "
               "in OUT stays whole until the new one is complete.")
TENSORBOARD_HELP = ("Also write TensorBoard events to OUT/tensorboard (losses, lr, held-out metrics); needs "
                    "pip install 'sodtool[tensorboard]'. metrics.jsonl stays the record.")
WORKERS_HELP = "Loader worker processes (default: 0 on CPU, 4 on CUDA)."
