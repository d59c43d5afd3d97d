"""Command lines: ``cmpolicy``.

Handlers, levels and formats of logging are set here and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sandboxhost import language
from sandboxhost.errors import Violation

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _cmd_check(args: argparse.Namespace) -> int:
    """Check policy files; print every violation."""
    found: list[Violation] = []
    unreadable = False
    for name in args.files:
        try:
            source = Path(name).read_bytes()
        except OSError as exc:
            print(f"{name}: cannot read: {exc.strerror}", file=sys.stderr)
            unreadable = True
            continue
        found.extend(language.check(source, name))
    if args.format == "json":
        print(json.dumps([v.as_dict() for v in found], indent=2))
    else:
        for violation in found:
            print(violation)
            print(f"    {violation.source_line.strip()}")
    if unreadable:
        return EXIT_USAGE
    return EXIT_FAILED if found else EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmpolicy", description="Check, try and manage policies for"
        " Celery clusters.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat for debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    check = commands.add_parser(
        "check", help="check policy files against the language rules",
        description="Check policy files. Exit 0 when all are valid, 1 when"
        " any is not (every error is printed), 2 on usage errors.")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--format", choices=("text", "json"), default="text",
                       help="text (FILE:LINE:COL: error: MESSAGE) or a JSON"
                       " list")
    check.set_defaults(func=_cmd_check)
    return parser


def cmpolicy_main(argv: list[str] | None = None) -> int:
    """Entry point of ``cmpolicy``."""
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(cmpolicy_main())
