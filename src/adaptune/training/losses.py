"""The training losses, read from the device in batches: the steps leave them on the device (a read
would make the host wait for the step), and :class:`LossLog` reads those of many steps at once."""

from __future__ import annotations

import math

import torch

from adaptune.errors import TrainingError

# The losses are read every REPORT_EVERY steps (and before evaluations and checkpoints); a run stops
# when PERSIST steps in a row (or every step so far) had a non-finite loss.
REPORT_EVERY = 16
PERSIST = 3


class LossLog:
    """Losses of the steps since the last read, and the current run of non-finite ones."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device)
        self.bad_run: tuple[int, float, int] | None = None  # (first step, its loss, length)

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def due(self) -> bool:
        return len(self.pending) >= REPORT_EVERY

    def read(self, learning_rate: float) -> tuple[float | None, list[int]]:
        """One read of the device: the last finite loss (None if none) and the skipped steps.

        Raises:
            TrainingError: the loss stayed non-finite for :data:`PERSIST` steps in a row, or for
                every step so far.
        """
        if not self.pending:
            return None, []
        steps = [n for n, _ in self.pending]
        values = torch.stack([loss.float() for _, loss in self.pending]).tolist()
        self.pending.clear()
        last, skipped = None, []
        for step, value in zip(steps, values):
            if math.isfinite(value):
                self.bad_run, last = None, value
                continue
            skipped.append(step)
            first, first_value, count = self.bad_run or (step, value, 0)
            self.bad_run = (first, first_value, count + 1)
            if count + 1 >= min(PERSIST, step):
                raise TrainingError(
                    f"loss became {first_value} at step {first} and stayed non-finite; lower the learning "
                    f"rate (now {learning_rate:g}) or check the labels"
                )
        return last, skipped
