"""Test driver for the kill-and-resume tests: run the ``adaptune`` command line and SIGKILL this
process right after optimisation step ``$KILL_AT_STEP`` (under torchrun only on rank ``$KILL_RANK``,
default every rank), through ``adaptune.training.train.train``'s ``on_step`` callback.

    python tests/kill_at_step.py train -o runs/x ...            # KILL_AT_STEP=5 in the environment
    torchrun --nproc-per-node 2 tests/kill_at_step.py train ...  # KILL_AT_STEP=5 KILL_RANK=1
"""

from __future__ import annotations

import os
import signal
import sys

import adaptune.training.train as training
from adaptune.cli.parser import main

_train = training.train


def _train_then_die(*args, **kwargs):
    at = int(os.environ["KILL_AT_STEP"])
    mine = os.environ.get("KILL_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")

    def on_step(step: int) -> None:
        if mine and step == at:
            os.kill(os.getpid(), signal.SIGKILL)

    return _train(*args, on_step=on_step, **kwargs)


training.train = _train_then_die  # the command line looks it up when it runs

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
