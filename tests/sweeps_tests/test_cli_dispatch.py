"""The CLI runs each subcommand through an explicit handler table (sweeps/cli.py)."""

from __future__ import annotations

import argparse

from batchscope.sweeps.cli import _handler, build_parser


def test_every_subcommand_has_its_handler() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    handlers = {name: _handler(name) for name in sub.choices}
    assert all(callable(h) for h in handlers.values())
    # Each name goes to its own function (a table copied by hand could send two names to one).
    named = {name: h.__name__ for name, h in handlers.items()}
    assert named["noise-scale"] == "cmd_noise_scale"
    assert named["doctor"] == "doctor"
    assert len(set(handlers.values())) == len(handlers)
