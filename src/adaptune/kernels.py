"""Moved to :mod:`adaptune.cpu.kernels`; this path keeps working for one release."""

from adaptune.cpu.kernels import *  # noqa: F403
