"""The ``mtfm`` command. Thin: each subcommand module parses its options and calls the library.

A subcommand module exposes ``add_parser(subparsers)`` (which registers the parser and sets
``func``) and keeps its work in library functions, so everything the CLI does is importable.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# One module per subcommand, in the order `mtfm --help` lists them.
_COMMAND_MODULES: tuple[str, ...] = (
    "mtfm.cli.prepare",
    "mtfm.cli.train",
    "mtfm.cli.evaluate",
    "mtfm.cli.predict",
    "mtfm.cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtfm",
        description="MTFM: multi-scenario recommendation foundation model "
        "(prepare data, train, evaluate, predict).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        # Bad input: one clear message naming what is wrong, no traceback.
        print(f"mtfm {args.command}: error: {err}", file=sys.stderr)
        return 2
