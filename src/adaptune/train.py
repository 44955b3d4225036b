"""Moved to :mod:`adaptune.training.train`; this path keeps working for one release."""

from adaptune.training.train import *  # noqa: F403
