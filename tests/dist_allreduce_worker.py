"""Run under torchrun: every rank all-reduces (rank + 1) and writes what it got to <out>/rank<r>.txt."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat_nb.common import cleanup_distributed, init_distributed

info = init_distributed("cpu")
value = torch.tensor([float(info.rank + 1)])
dist.all_reduce(value)
Path(sys.argv[1], f"rank{info.rank}.txt").write_text(f"{info.world_size} {value.item()}")
cleanup_distributed()
