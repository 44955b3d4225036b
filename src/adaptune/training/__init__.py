"""Training: the run configuration, one step, the loop, evaluation, checkpoints, torchrun, the
frozen-layer cache, and :func:`adaptune.training.train.train`."""
