"""dist_optim_worker's optimizer steps on CUDA, over NCCL under torchrun (tests/test_gpu.py compares them):

    python tests/dist_nccl_worker.py OUT                                          # one GPU: the reference
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_nccl_worker.py OUT

Rank 0 writes OUT/params_world{W}.pt.
"""
import sys
from pathlib import Path

import torch

from dist_optim_worker import new_optimizer, real_batches, tiny_gpt, train
from nanochat_nb.common import cleanup_distributed, init_distributed

if __name__ == "__main__":
    info = init_distributed("cuda")
    model = tiny_gpt().to(info.device)
    batches = [(inputs.to(info.device), targets.to(info.device)) for inputs, targets in real_batches()]
    train(model, new_optimizer(model), batches, info.rank, info.world_size)
    if info.is_main:
        state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
        torch.save(state, Path(sys.argv[1]) / f"params_world{info.world_size}.pt")
    cleanup_distributed()
