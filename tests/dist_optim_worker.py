"""Train a tiny GPT for a few optimizer steps on real text, on one process or under torchrun (gloo, CPU).

    python tests/dist_optim_worker.py OUT                       # one process: the reference
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_optim_worker.py OUT

Each step's total batch is split in micro-batches: each rank takes its share of them (one process takes
them all and accumulates the gradients, as the training loop does). Rank 0 writes OUT/params_world{W}.pt after STEPS
steps. Then the run is checked for resumption: each rank saves its optimizer shard after SAVE_AT steps, a
fresh model and optimizer load the checkpoint and take the remaining steps, and rank 0 writes
OUT/resumed_world{W}.pt (which must equal params_world{W}.pt).
"""
import sys
from pathlib import Path

import torch

from nanochat_nb.common import cleanup_distributed, data_dir, init_distributed
from nanochat_nb.gpt import GPT, GPTConfig
from nanochat_nb.optim import setup_optimizer

STEPS, SAVE_AT = 4, 2
WEIGHT_DECAY = 0.1
ROWS, PARTS, SEQ_LEN, VOCAB = 8, 2, 64, 256  # total batch: 8 rows of 64 byte-tokens, in 2 micro-batches


def tiny_gpt(seed: int = 0):
    "A depth-2 GPT (width 128, 4 heads of 32) over byte tokens, initialised from `seed`."
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=SEQ_LEN, head_dim=32))
    model.init_weights()
    # nanochat zero-initialises the output projections and the smear scalar; give them values so that every
    # parameter gets a gradient from the first step
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model


def new_optimizer(model: GPT):
    "The optimizer of these tests: the course's groups at half the reference learning rates."
    return setup_optimizer(model.param_groups(), model.config.n_embd, lr_scale=0.5, weight_decay=WEIGHT_DECAY)


def real_batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    "`steps` total batches (inputs, targets) of UTF-8 bytes of real text from the first training shard."
    import pyarrow.parquet as pq
    texts = pq.read_table(data_dir("pretrain") / "shard_00000.parquet", columns=["text"]).column("text")
    data = torch.tensor(list("\n".join(texts.slice(0, 100).to_pylist()).encode()[:steps * ROWS * (SEQ_LEN + 1)]))
    rows = data.view(steps, ROWS, SEQ_LEN + 1)
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def train(model, optimizer, batches, rank: int, world: int, first_step: int = 0):
    """One optimizer step per total batch, split in PARTS micro-batches: rank r takes parts r, r + world, ...
    and accumulates their gradients (so one process takes all of them, as the training loop would)."""
    rows, mine = ROWS // PARTS, range(rank, PARTS, world)
    for step, (inputs, targets) in enumerate(batches, start=first_step):
        for group in optimizer.param_groups:  # what the training loop does each step
            group["lr"] = group["initial_lr"] * (1.0 - 0.1 * step)
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.01 * step
                group["weight_decay"] = WEIGHT_DECAY * (1.0 - 0.2 * step)
        for part in mine:
            loss = model(inputs[part * rows:(part + 1) * rows], targets[part * rows:(part + 1) * rows])
            (loss / len(mine)).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)


def main(out: Path):
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    batches = real_batches()
    model = tiny_gpt()
    optimizer = new_optimizer(model)
    train(model, optimizer, batches, rank, world)
    if rank == 0:
        torch.save(model.state_dict(), out / f"params_world{world}.pt")

    model = tiny_gpt()
    optimizer = new_optimizer(model)
    train(model, optimizer, batches[:SAVE_AT], rank, world)
    torch.save(optimizer.state_dict(), out / f"optim_world{world}_rank{rank}.pt")
    torch.save(model.state_dict(), out / f"model_world{world}_rank{rank}.pt")
    del model, optimizer

    model = tiny_gpt(seed=1)  # different weights: everything must come from the checkpoint
    model.load_state_dict(torch.load(out / f"model_world{world}_rank{rank}.pt"))
    optimizer = new_optimizer(model)
    optimizer.load_state_dict(torch.load(out / f"optim_world{world}_rank{rank}.pt"))
    train(model, optimizer, batches[SAVE_AT:], rank, world, first_step=SAVE_AT)
    if rank == 0:
        torch.save(model.state_dict(), out / f"resumed_world{world}.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
