"""What ``adaptune compare`` runs: the grid of strategies, sizes, learning rates and seeds (:class:`CompareConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from adaptune.errors import ConfigError
from adaptune.training.train import DEFAULT_LR, TrainConfig

ADAPTER_PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


BASELINES = ("full", "top-k", "layernorm", "head")


@dataclass(frozen=True)
class GridPoint:
    """One training run of the grid."""

    method: str  # "full", "top-k", "layernorm", "head", or an adapter placement
    lr: float
    seed: int
    size: int | None = None  # adapters
    top_k: int | None = None  # top-k
    init_std: float = 1e-2  # adapters
    sweep: str = "main"  # "main", or the robustness sweep it belongs to: "init", "size"

    @property
    def label(self) -> str:
        """The strategy as reported: ``houlsby-64``, ``top-2``, ``full``."""
        if self.method in ADAPTER_PLACEMENTS:
            return f"{self.method}-{self.size}"
        return f"top-{self.top_k}" if self.method == "top-k" else self.method

    @property
    def folder(self) -> str:
        init = f"_init{self.init_std:g}" if self.method in ADAPTER_PLACEMENTS and self.init_std != 1e-2 else ""
        return f"{self.label}{init}_lr{self.lr:g}_seed{self.seed}"

    def train_config(self, base: TrainConfig) -> TrainConfig:
        if self.method in ADAPTER_PLACEMENTS:
            return dataclasses.replace(
                base,
                strategy="adapters",
                adapter=self.method,
                adapter_size=self.size,
                init_std=self.init_std,
                lr=self.lr,
                seed=self.seed,
            )
        return dataclasses.replace(base, strategy=self.method, top_k=self.top_k, lr=self.lr, seed=self.seed)


@dataclass(frozen=True)
class CompareConfig:
    """What ``adaptune compare`` runs.

    Args:
        tasks: data sources, one adapter per task on the one base model (``"reviews"`` = embedded).
        methods: strategies and adapter placements to compare.
        sizes: adapter sizes m (of every placement unless ``other_sizes`` is given).
        other_sizes: sizes of the pfeiffer and parallel placements, when they differ from ``sizes``.
        top_ks: k values of top-k fine-tuning.
        lr_factors: learning rates tried, as factors of each strategy's default rate.
        seeds: seeds; a configuration's score is the mean over them.
        init_stds: the initialisation sweep (houlsby, size 64 or the nearest size in the grid).
        ablation: compute the layer-span ablation of the best Houlsby adapter.
        budget_minutes: shrink the grid and data to fit (estimated from a timed calibration).
        train: the shared training settings (model, epochs, batch, max_length, limits, ...).
    """

    tasks: tuple[str, ...] = ("reviews",)
    methods: tuple[str, ...] = BASELINES + ADAPTER_PLACEMENTS
    sizes: tuple[int, ...] = (8, 64, 256)
    other_sizes: tuple[int, ...] | None = None
    top_ks: tuple[int, ...] = (1, 2, 3)
    lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    seeds: tuple[int, ...] = (0,)
    init_stds: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    ablation: bool = True
    budget_minutes: float | None = None
    train: TrainConfig = TrainConfig()

    def __post_init__(self) -> None:
        if self.other_sizes is not None:
            object.__setattr__(self, "other_sizes", tuple(self.other_sizes))
        for f in ("tasks", "methods", "sizes", "top_ks", "lr_factors", "seeds", "init_stds"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
            if not getattr(self, f) and f not in ("init_stds",):
                raise ConfigError(f"compare needs at least one value in {f}")
        unknown = [m for m in self.methods if m not in BASELINES + ADAPTER_PLACEMENTS]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(BASELINES + ADAPTER_PLACEMENTS)}")
        if len({Path(t).stem if t != "reviews" else t for t in self.tasks}) != len(self.tasks):
            raise ConfigError("two tasks have the same name; give each task its own file or folder name")

    @property
    def init_size(self) -> int:
        """Adapter size of the init sweep: the grid's size nearest the paper's usual 64."""
        return min(self.sizes, key=lambda m: abs(m - 64))

    def grid(self) -> list[GridPoint]:
        """Every run: the main grid, then the robustness sweeps (points shared with the main grid once)."""
        points: list[GridPoint] = []
        for method in self.methods:
            for factor in self.lr_factors:
                for seed in self.seeds:
                    lr = _round_lr(DEFAULT_LR["adapters" if method in ADAPTER_PLACEMENTS else method] * factor)
                    if method in ADAPTER_PLACEMENTS:
                        sizes = self.sizes if method == "houlsby" or self.other_sizes is None else self.other_sizes
                        points += [GridPoint(method, lr, seed, size=m) for m in sizes]
                    elif method == "top-k":
                        points += [GridPoint(method, lr, seed, top_k=k) for k in self.top_ks]
                    else:
                        points.append(GridPoint(method, lr, seed))
        if "houlsby" in self.methods:
            size = self.init_size
            lr = _round_lr(DEFAULT_LR["adapters"])
            for std in self.init_stds:
                for seed in self.seeds:
                    p = GridPoint("houlsby", lr, seed, size=size, init_std=std, sweep="init")
                    if dataclasses.replace(p, sweep="main") not in points:
                        points.append(p)
        return points


def _round_lr(lr: float) -> float:
    return float(f"{lr:.2g}")


def task_name(source: str) -> str:
    return source if source == "reviews" else Path(source.rstrip("/")).stem or "task"
