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
from sandboxhost.errors import PolicySyntaxError, Violation

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
        _print_violations(found)
    if unreadable:
        return EXIT_USAGE
    return EXIT_FAILED if found else EXIT_OK


def _print_violations(violations) -> None:
    for violation in violations:
        print(violation)
        print(f"    {violation.source_line.strip()}")


def _print_report(loaded, report, emails, as_json: bool) -> None:
    """What a run did, for people (or as JSON with --json)."""
    data = report.as_dict()
    data["schedule"] = loaded.schedule.describe()
    data["emails"] = [{"subject": e.subject, "from_email": e.from_email,
                       "recipient_list": list(e.recipient_list),
                       "message": e.message} for e in emails]
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    print(f"policy:    {loaded.name} ({loaded.filename})")
    print(f"schedule:  {data['schedule']}")
    print(f"condition: {data['condition']}")
    print(f"applied:   {'yes' if data['applied'] else 'no'}")
    for call in data["calls"]:
        result = call["value"] if call["ok"] else f"error: {call['error']}"
        args = ", ".join(f"{k}={v!r}" for k, v in call["args"].items())
        print(f"call:      {call['op']}({args}) -> {result}")
    for email in emails:
        print(f"email:     {email.subject!r} to"
              f" {', '.join(email.recipient_list)} (not sent: dry run)")
    for line in data["output"]:
        print(f"output:    {line.rstrip()}")
    error = report.describe_error()
    if error:
        print(f"error:     {loaded.filename}:{report.error.line or '?'}: {error}")
    print(f"result:    {data['outcome']} in {data['duration_s'] * 1000:.1f} ms")


def _cmd_try(args: argparse.Namespace) -> int:
    """Run a policy once in the sandbox against a simulated cluster."""
    import datetime as dt

    from sandboxhost.host import Host
    from manager.errors import ConfigurationError
    from manager.mailer import Mailer
    from manager.runner import PolicyLoadError, PolicyRunner, load_file
    from manager.simcluster import SimulatedCluster

    try:
        cluster = (SimulatedCluster.from_file(args.cluster) if args.cluster
                   else SimulatedCluster())
        now = dt.datetime.fromisoformat(args.now) if args.now else None
    except (ConfigurationError, ValueError) as exc:
        print(f"cmpolicy try: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if now is not None and now.tzinfo is None:
        now = now.replace(tzinfo=cluster.timezone)
    mailer = Mailer(None)
    with Host() as host:
        runner = PolicyRunner(host, timezone=cluster.timezone)
        try:
            loaded = load_file(runner, args.file, now=now)
        except OSError as exc:
            print(f"{args.file}: cannot read: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        except PolicySyntaxError as exc:
            _print_violations(exc.violations)
            return EXIT_FAILED
        except PolicyLoadError as exc:
            print(exc)
            return EXIT_FAILED
        report = runner.run(loaded, cluster=cluster, stats=cluster,
                            mailer=mailer, now=now)
    _print_report(loaded, report, mailer.outbox, args.json)
    return EXIT_OK if report.ok else EXIT_FAILED


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

    trying = commands.add_parser(
        "try", help="run a policy once in the sandbox against a simulated"
        " cluster",
        description="Run a policy once, through the real sandbox, against a"
        " simulated cluster (a JSON fixture: workers, tasks, queues, recorded"
        " tasks). Nothing is sent to Celery or a mail server. Exit 0 when the"
        " run succeeded, 1 when the policy failed, 2 on usage errors.")
    trying.add_argument("file", metavar="FILE")
    trying.add_argument("--cluster", metavar="FIXTURE.json",
                        help="the simulated cluster (default: an empty one)")
    trying.add_argument("--now", metavar="ISO-TIME",
                        help="the policy's clock, e.g. 2026-12-04T03:00")
    trying.add_argument("--json", action="store_true",
                        help="print the run as JSON")
    trying.set_defaults(func=_cmd_try)
    return parser


def cmpolicy_main(argv: list[str] | None = None) -> int:
    """Entry point of ``cmpolicy``."""
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(cmpolicy_main())
