"""Moved to :mod:`adaptune.lm.generate`; this path keeps working for one release."""

from adaptune.lm.generate import *  # noqa: F403
