"""The ``mtfm`` command. Thin: each subcommand module parses its options and calls the library.

A subcommand module exposes ``add_parser(subparsers)`` (which registers the parser and sets
``func``) and keeps its work in library functions, so everything the CLI does is importable.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# One module per subcommand, in the order `mtfm --help` lists them.
_COMMAND_MODULES: tuple[str, ...] = (
    "mtfm.cli.prepare",
    "mtfm.cli.train",
    "mtfm.cli.evaluate",
    "mtfm.cli.predict",
    "mtfm.cli.export",
    "mtfm.cli.serve",
    "mtfm.cli.diagnose",
    "mtfm.cli.explain",
    "mtfm.cli.compare",
    "mtfm.cli.demo",
    "mtfm.cli.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtfm",
        description="MTFM: multi-scenario recommendation foundation model "
        "(prepare data, train, evaluate, predict, export, serve, diagnose, compare with baselines).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(sub)
    return parser


EXIT_USER_ERROR = 2
EXIT_BUG = 1


def _os_error_message(err: OSError, args: argparse.Namespace) -> str:
    """An OSError as one line naming the path: the one the system names, else the command's output."""
    if err.filename is None:  # e.g. a write that hit a full disk: the path is the output being written
        where = getattr(args, "out", None) or getattr(args, "run", None)
        return f"{err}" + (f" (while writing {where})" if where and err.strerror else "")
    text = f"{err.filename}: {err.strerror or err}"
    return text + (f" (-> {err.filename2})" if err.filename2 is not None else "")


def user_error_message(err: BaseException, args: argparse.Namespace) -> str | None:
    """The one-line message for an error that is the user's to fix, or None for a bug.

    The user's errors (see :mod:`mtfm.errors`): bad input (``ValueError`` and the project's
    subclasses), a broken run directory (``CheckpointError``), a non-finite training loss
    (``FloatingPointError``, raised by the trainer naming the step) and the file system
    (``OSError``: missing, permission, not a directory, disk full, locked by another process).
    """
    from mtfm.train.checkpoint import CheckpointError

    if isinstance(err, OSError):
        return _os_error_message(err, args)
    if isinstance(err, (ValueError, CheckpointError, FloatingPointError)):
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. The user's errors print one line and exit with status 2; anything
    else prints its traceback and asks for a bug report (status 1)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:  # noqa: BLE001 -- sorted into the user's errors and bugs below
        message = user_error_message(err, args)
        if message is None:
            traceback.print_exc()
            print(f"mtfm {args.command}: internal error ({type(err).__name__}): this is a bug in mtfm; please "
                  "report it with the traceback above and the command line", file=sys.stderr)
            return EXIT_BUG
        print(f"mtfm {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
