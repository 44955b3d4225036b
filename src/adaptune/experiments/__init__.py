"""The paper's experiments: ``adaptune compare`` (grid, budget, reports), the layer ablation, the figures."""
