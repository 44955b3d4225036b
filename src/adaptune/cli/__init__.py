"""The ``adaptune`` command: the parser built from the config dataclasses (:mod:`adaptune.cli.parser`),
one module per command group (``commands``, ``adapter_commands``, ``lm_commands``)."""

from adaptune.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
