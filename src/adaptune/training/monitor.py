"""What a run reports as it goes, and when it stops early.

- :class:`RunLog`: a JSON Lines log in the run folder (``log.jsonl``: one line per training step
  with its loss, learning rate and gradient norm, one per evaluation with the dev metrics, and the
  throughput of each reporting interval), and with ``--log-dir`` the same scalars as TensorBoard
  event files (``torch.utils.tensorboard``; needs the ``tensorboard`` package).
- :func:`early_stop_reason`: ``--early-stop N`` stops a run after N evaluations on dev without an
  improvement on the best; the best weights are what the run keeps (as always).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from adaptune.errors import ConfigError


class RunLog:
    """Appends to ``log.jsonl`` (and TensorBoard files under ``tb_dir``); a resumed run continues
    both, its first lines repeating the steps after the last checkpoint."""

    def __init__(self, path: Path, tb_dir: str | None) -> None:
        self.file = open(path, "a", encoding="utf-8")  # open for the run's life
        self.tb = None
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.file.close()
                raise ConfigError("--log-dir needs TensorBoard: pip install tensorboard") from None
            self.tb = SummaryWriter(tb_dir)

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One line ``{"kind": ..., "step": ..., **values}``; numbers also go to TensorBoard as
        ``kind/name`` (``train/loss``, ``dev/macro_f1``, ...)."""
        values = {k: v for k, v in values.items() if isinstance(v, (int, float, str)) or v is None}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self.file.write(json.dumps({"kind": kind, "step": step, **clean}) + "\n")
        if self.tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{kind}/{name}", value, step)

    def steps(self, records: list[dict], step: int, examples_per_s: float) -> None:
        """The steps of one reporting interval (loss, learning rate, gradient norm) and its throughput."""
        for record in records:
            self.write("train", record["step"], {k: v for k, v in record.items() if k != "step"})
        self.write("speed", step, {"examples_per_s": examples_per_s})
        self.flush()

    def flush(self) -> None:
        self.file.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def early_stop_reason(history: list[dict], best_step: int | None, metric: str, patience: int) -> str | None:
    """Why the run stops now (``patience`` evaluations since the best without improving on it), or None."""
    if patience <= 0 or best_step is None:
        return None
    since = [h for h in history if h["step"] > best_step]
    if len(since) < patience:
        return None
    best = next(h for h in history if h["step"] == best_step)[metric]
    return (
        f"stopped early at step {history[-1]['step']}: dev {metric} has not improved on {best:.4f} "
        f"(step {best_step}) in {patience} evaluation(s); the run keeps the weights of step {best_step}"
    )
