"""Run base training and SIGKILL this very process at a chosen moment (a helper of tests/test_train.py).

    python tests/train_kill.py after-step N -- <nanochat-base-train flags>   # killed right after step N
    python tests/train_kill.py mid-write N -- <flags>    # killed halfway through writing model_{N:06d}.pt
"""
import io
import os
import signal
import sys

import torch

import nanochat_nb.train as train


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(step: int):
    record = train.Trainer._record

    def record_then_die(self, *args, **kwargs):
        out = record(self, *args, **kwargs)
        if self.state.step == step:
            die()
        return out
    train.Trainer._record = record_then_die


def kill_mid_write(step: int):
    save = torch.save

    def save_half_then_die(obj, f, *args, **kwargs):
        if f"model_{step:06d}.pt" in str(getattr(f, "name", f)):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            die()
        return save(obj, f, *args, **kwargs)
    torch.save = save_half_then_die


if __name__ == "__main__":
    mode, step, separator, *argv = sys.argv[1:]
    assert separator == "--", __doc__
    {"after-step": kill_after_step, "mid-write": kill_mid_write}[mode](int(step))
    train.main(argv)
    sys.exit("the run finished before it was killed")
