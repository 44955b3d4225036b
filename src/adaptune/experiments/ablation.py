"""Which layers' adapters matter (Houlsby et al. 2019, §3.6, Figure 6).

Take a trained adapter, remove (bypass) its adapters in a contiguous span of layers [i..j] at
evaluation time only, and measure the dev score for every span. The paper finds that removing a
single layer's adapters costs little, removing all of them collapses the model, and the lower
layers matter least.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from adaptune.data.loading import Split
from adaptune.core.inject import get_container


@contextlib.contextmanager
def adapters_removed(model, layers) -> Any:
    """Within the block, the active adapter's bottlenecks in ``layers`` are bypassed."""
    container = get_container(model)
    before = container.skip_layers
    container.skip_layers = frozenset(layers)
    try:
        yield
    finally:
        container.skip_layers = before


def span_ablation(
    run_dir: str | os.PathLike, split: Split, label_names, *, device: str = "auto", progress=None
) -> dict[str, Any]:
    """Score of the run's adapter with the adapters of each layer span [i..j] removed.

    Args:
        run_dir: a finished adapter run folder.
        split: the split to score (the run's dev split).
        label_names: the split's label names (remapped to the run's).
        progress: optional callable(done, total) for a progress display.

    Returns:
        ``{"layers": L, "full": score with every adapter, "scores": L×L list with scores[i][j]
        for i <= j (None below the diagonal), "metric": name}``.
    """
    from adaptune.predict import Predictor

    pred = Predictor(run_dir, device=device)
    metric = pred.task["metric"]
    container = get_container(pred.model)
    layers = sorted(int(i) for i in container.active_set().adapters)
    num_layers = max(layers) + 1
    spans = [(i, j) for i in range(num_layers) for j in range(i, num_layers)]
    scores: list[list[float | None]] = [[None] * num_layers for _ in range(num_layers)]
    full = pred.evaluate(split, label_names)[metric]
    for n, (i, j) in enumerate(spans, 1):
        with adapters_removed(pred.model, range(i, j + 1)):
            scores[i][j] = pred.evaluate(split, label_names)[metric]
        if progress:
            progress(n, len(spans))
    return {"layers": num_layers, "full": full, "scores": scores, "metric": metric}
