"""Command lines: ``cmpolicy`` (and the shared option set of the others).

Handlers, levels and formats of logging are set here and nowhere else.

Options follow Celery's style: ``-A proj`` loads the user's Celery app and
its broker configuration; ``--broker URL`` works without one; with neither,
the embedded default (a ``filesystem://`` broker and a SQLite store under
one state directory) needs no server at all.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import sys
import threading
from functools import cached_property
from pathlib import Path

from sandboxhost import language
from sandboxhost.errors import PolicySyntaxError, Violation

from manager.errors import ConfigurationError, ManagerError
from manager.runner import printable

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def configure_logging(verbosity: int, *, default: int = logging.WARNING,
                      prefix: str = "") -> None:
    level = max(logging.DEBUG, default - 10 * verbosity)
    logging.basicConfig(
        level=level, stream=sys.stderr, force=True,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")


# -- the manager's context ----------------------------------------------------------

class Context:
    """What a command needs, built on first use from the shared options."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    @cached_property
    def state_dir(self) -> Path:
        from manager.config import default_state_dir
        folder = Path(self.args.state_dir or default_state_dir())
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @cached_property
    def app(self):
        from manager.config import load_app
        return load_app(self.args.app, self.args.broker, self.state_dir)

    @cached_property
    def timezone(self):
        from zoneinfo import ZoneInfo
        name = getattr(self.app.conf, "timezone", None) or "UTC"
        return ZoneInfo(str(name))

    @cached_property
    def store(self):
        from manager.store import Store
        return Store(self.args.db, state_dir=self.state_dir)

    @cached_property
    def tenants(self):
        from manager.tenants import load_tenants
        return load_tenants(self.args.tenants)

    @cached_property
    def cluster(self):
        from manager.control import CeleryCluster
        return CeleryCluster(self.app)

    @cached_property
    def mailer(self):
        from manager.mailer import Mailer, SmtpSettings
        if not self.args.smtp_host:
            return Mailer(None)
        settings = SmtpSettings.from_options(
            host=self.args.smtp_host, port=self.args.smtp_port,
            security=self.args.smtp_security, user=self.args.smtp_user,
            password_file=self.args.smtp_password_file)
        return Mailer(settings)

    def describe(self) -> str:
        broker = self.app.conf.broker_url or "?"
        return (f"state directory {self.state_dir}; broker {broker};"
                f" database {self.store.safe_url}")


def cluster_options() -> argparse.ArgumentParser:
    """Where the cluster and the store are, and -v: every command's."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("cluster and store")
    group.add_argument("-A", "--app", help="the Celery app (module or"
                       " module:attribute) whose broker to use")
    group.add_argument("--broker", help="broker URL (default: the app's, or"
                       " the embedded filesystem:// broker)")
    group.add_argument("--db", help="store URL (default: manager.db in the"
                       " state directory)")
    group.add_argument("--state-dir", type=Path, help="the local state"
                       " directory (default: $CMPOLICY_STATE_DIR or"
                       " ~/.local/state/celery-policy-manager)")
    parent.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat for debug)")
    return parent


def shared_options() -> argparse.ArgumentParser:
    """The options of cmpolicy and cmrun: the cluster, tenants and mail."""
    parent = argparse.ArgumentParser(add_help=False,
                                     parents=[cluster_options()])
    group = parent.add_argument_group("tenants")
    group.add_argument("--tenants", metavar="FILE",
                       help="tenants file (TOML); without one, every policy"
                       " may touch every worker and task")
    mail = parent.add_argument_group("mail (send_email)")
    mail.add_argument("--smtp-host", help="SMTP server; without one,"
                      " send_email only records messages")
    mail.add_argument("--smtp-port", type=int)
    mail.add_argument("--smtp-security", choices=("none", "starttls", "tls"),
                      default="none")
    mail.add_argument("--smtp-user")
    mail.add_argument("--smtp-password-file", metavar="FILE",
                      help="file holding the SMTP password (else"
                      " $CMPOLICY_SMTP_PASSWORD)")
    return parent


# -- check and try -------------------------------------------------------------------

def _print_violations(violations) -> None:
    for violation in violations:
        print(violation)
        print(f"    {violation.source_line.strip()}")


def _cmd_check(args: argparse.Namespace) -> int:
    """Check policy files; print every violation, then every warning (an
    attribute nothing has: a likely typo). Warnings do not fail."""
    from sandboxhost.lint import lint

    found: list[Violation] = []
    warnings: list[Violation] = []
    unreadable = False
    for name in args.files:
        try:
            source = Path(name).read_bytes()
        except OSError as exc:
            print(f"{name}: cannot read: {exc.strerror}", file=sys.stderr)
            unreadable = True
            continue
        problems = language.check(source, name)
        found.extend(problems)
        if not problems:
            warnings.extend(lint(source, name))
    if args.format == "json":
        print(json.dumps([v.as_dict() for v in found + warnings], indent=2))
    else:
        _print_violations(found + warnings)
    if unreadable:
        return EXIT_USAGE
    return EXIT_FAILED if found else EXIT_OK


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
    condition = data["condition"]
    if condition is None and report.error is not None:
        condition = "not known (the run failed first)"
    print(f"condition: {condition}")
    print(f"applied:   {'yes' if data['applied'] else 'no'}")
    for call in data["calls"]:
        result = call["value"] if call["ok"] else f"error: {call['error']}"
        args = ", ".join(f"{k}={v!r}" for k, v in call["args"].items())
        print(f"call:      {call['op']}({args}) -> {result}")
    for email in emails:
        print(f"email:     {email.subject!r} to"
              f" {', '.join(email.recipient_list)} (not sent: dry run)")
    for line in "".join(data["output"]).splitlines():
        print(f"output:    {printable(line, 2000)}")
    error = report.error
    if error is not None:
        where = f"{loaded.filename}:{error.line}" if error.line \
            else loaded.filename
        kind = printable(getattr(error, "type_name", error.kind), 100)
        section = f"in {error.section}: " if error.section else ""
        print(f"error:     {where}: {section}{printable(error.message, 2000)}"
              f" ({kind})")
    print(f"result:    {data['outcome']} in"
          f" {data['duration_s'] * 1000:.1f} ms")


def _load_for_cli(runner, path: str, **kw):
    """Load a policy file; print why not and return an exit code if not."""
    from manager.runner import PolicyLoadError, load_file
    try:
        return load_file(runner, path, **kw), None
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
        return None, EXIT_USAGE
    except PolicySyntaxError as exc:
        _print_violations(exc.violations)
        return None, EXIT_FAILED
    except PolicyLoadError as exc:
        print(exc)
        return None, EXIT_FAILED


def _cmd_try(args: argparse.Namespace) -> int:
    """Run a policy once in the sandbox against a simulated cluster."""
    from sandboxhost.host import Host
    from manager.mailer import Mailer
    from manager.runner import PolicyRunner
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
    if not args.verbose:
        # The report below says what failed; the log would say it twice.
        logging.getLogger("manager.runner").setLevel(logging.CRITICAL)
    with Host() as host:
        runner = PolicyRunner(host, timezone=cluster.timezone)
        loaded, code = _load_for_cli(runner, args.file, now=now)
        if loaded is None:
            return code
        report = runner.run(loaded, cluster=cluster, stats=cluster,
                            mailer=mailer, now=now)
    _print_report(loaded, report, mailer.outbox, args.json)
    return EXIT_OK if report.ok else EXIT_FAILED


# -- the store's policies ---------------------------------------------------------------

def _cmd_add(args: argparse.Namespace, ctx: Context) -> int:
    """Check a policy (schedule included) and save it in the store."""
    from sandboxhost.host import Host
    from manager.runner import PolicyRunner, policy_name

    tenant = ctx.tenants.get(args.tenant)
    with Host() as host:
        runner = PolicyRunner(host, timezone=ctx.timezone)
        loaded, code = _load_for_cli(runner, args.file, tenant=tenant,
                                     name=args.name)
        if loaded is None:
            return code
    name = args.name or policy_name(args.file)
    existed = ctx.store.get_policy(name) is not None
    ctx.store.upsert_policy(name, loaded.source, tenant=tenant.name,
                            enabled=False if args.disabled else None)
    print(f"{'replaced' if existed else 'added'} policy {name} (tenant"
          f" {tenant.name}, {loaded.schedule.describe()}"
          f"{', disabled' if args.disabled else ''})")
    return EXIT_OK


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "never"
    return dt.datetime.fromtimestamp(timestamp).isoformat(
        sep=" ", timespec="seconds")


def _cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    policies = ctx.store.list_policies(args.tenant)
    if args.json:
        print(json.dumps([{"name": p.name, "tenant": p.tenant,
                           "enabled": p.enabled, "last_run_at": p.last_run_at,
                           "last_outcome": p.last_outcome} for p in policies],
                         indent=2))
        return EXIT_OK
    if not policies:
        print("no policies")
    for p in policies:
        state = "enabled" if p.enabled else "disabled"
        print(f"{p.name:30} {p.tenant:12} {state:9} last run"
              f" {_when(p.last_run_at)} {p.last_outcome or ''}".rstrip())
    return EXIT_OK


def _policy_or_fail(ctx: Context, name: str):
    policy = ctx.store.get_policy(name)
    if policy is None:
        print(f"no policy named {name!r}", file=sys.stderr)
    return policy


def _cmd_show(args: argparse.Namespace, ctx: Context) -> int:
    policy = _policy_or_fail(ctx, args.name)
    if policy is None:
        return EXIT_FAILED
    outcome = f" ({policy.last_outcome})" if policy.last_outcome else ""
    print(f"# {policy.name} (tenant {policy.tenant},"
          f" {'enabled' if policy.enabled else 'disabled'}; last run"
          f" {_when(policy.last_run_at)}{outcome})")
    if policy.last_error:
        print(f"# last error: {printable(policy.last_error, 2000)}")
    print(policy.source, end="" if policy.source.endswith("\n") else "\n")
    return EXIT_OK


def _cmd_enable(args: argparse.Namespace, ctx: Context) -> int:
    enabled = args.command == "enable"
    if not ctx.store.set_policy_enabled(args.name, enabled):
        print(f"no policy named {args.name!r}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{'enabled' if enabled else 'disabled'} policy {args.name}")
    return EXIT_OK


def _cmd_remove(args: argparse.Namespace, ctx: Context) -> int:
    if not ctx.store.delete_policy(args.name):
        print(f"no policy named {args.name!r}", file=sys.stderr)
        return EXIT_FAILED
    print(f"removed policy {args.name} (its run history stays)")
    return EXIT_OK


def _cmd_history(args: argparse.Namespace, ctx: Context) -> int:
    """Runs of one policy, or of every policy of a tenant; newest first."""
    if args.name is None and args.tenant is None:
        print("cmpolicy history: give a policy NAME or --tenant",
              file=sys.stderr)
        return EXIT_USAGE
    names = [args.name] if args.name else \
        [p.name for p in ctx.store.list_policies(args.tenant)]
    if args.name and ctx.store.get_policy(args.name) is None \
            and not ctx.store.list_runs(args.name, limit=1):
        print(f"no policy named {args.name!r}", file=sys.stderr)
        return EXIT_FAILED
    runs = [run for name in names for run in
            ctx.store.list_runs(name, limit=args.limit)]
    if args.tenant:
        runs = [r for r in runs if r.tenant == args.tenant]
    runs.sort(key=lambda r: r.started, reverse=True)
    runs = runs[:args.limit]
    if args.json:
        print(json.dumps([vars(r) for r in runs], indent=2, default=str))
        return EXIT_OK
    for run in runs:
        line = (f"{_when(run.started)} {run.policy} [{run.tenant}] run"
                f" {run.run_id[:8]} {run.outcome} in"
                f" {run.duration_s * 1000:.0f} ms, condition {run.condition},"
                f" {'applied' if run.applied else 'not applied'}")
        print(line)
        for call in run.calls:
            result = call.get("value") if call.get("ok") else \
                f"refused: {call.get('error')}"
            print(f"    call {printable(call.get('op'), 100)}"
                  f" {printable(call.get('args'))} -> {printable(result)}")
        if run.error_message:
            print(f"    error: {printable(run.error_message, 2000)}")
    if not runs:
        print("no runs")
    return EXIT_OK


# -- running for real -----------------------------------------------------------------------

def _cmd_run(args: argparse.Namespace, ctx: Context) -> int:
    """Run a policy (a stored name or a file) once, for real."""
    from sandboxhost.host import Host
    from manager.runner import PolicyLoadError, PolicyRunner

    target = Path(args.policy)
    stored = None if target.suffix == ".policy" or target.exists() else \
        ctx.store.get_policy(args.policy)
    if stored is None and not target.exists():
        print(f"no policy named {args.policy!r} and no such file",
              file=sys.stderr)
        return EXIT_USAGE
    tenant = ctx.tenants.get(args.tenant or (stored.tenant if stored
                                             else None))
    logger.info("cmpolicy run: %s", ctx.describe())
    with Host() as host:
        runner = PolicyRunner(host, timezone=ctx.timezone)
        if stored is not None:
            try:
                loaded = runner.load(stored.source, f"<policy {stored.name}>",
                                     name=stored.name, tenant=tenant)
            except (PolicySyntaxError, PolicyLoadError) as exc:
                print(f"policy {stored.name}: {printable(exc, 2000)}")
                return EXIT_FAILED
        else:
            loaded, code = _load_for_cli(runner, str(target), tenant=tenant)
            if loaded is None:
                return code
        report = runner.run(loaded, cluster=ctx.cluster, stats=ctx.store,
                            mailer=ctx.mailer, tenant=tenant)
    if stored is not None:
        from manager.scheduler import record_report
        record_report(ctx.store, report)
    _print_report(loaded, report, ctx.mailer.outbox, args.json)
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_serve(args: argparse.Namespace, ctx: Context) -> int:
    """The manager loop: run every enabled policy on its schedule."""
    from sandboxhost.host import Host
    from manager.registry import Registry
    from manager.runner import PolicyRunner
    from manager.scheduler import Scheduler

    logger.info("cmpolicy serve: %s", ctx.describe())
    stopping = threading.Event()
    host = Host()
    host.start()
    missing = host.missing_layers()
    runner = PolicyRunner(host, timezone=ctx.timezone)
    registry = Registry(runner, ctx.store, ctx.tenants, args.policies)
    scheduler = Scheduler(runner, registry, cluster=ctx.cluster,
                          stats=ctx.store, mailer=ctx.mailer,
                          store=ctx.store, tenants=ctx.tenants,
                          slots=args.slots)
    if missing:
        logger.warning("sandbox layers not applied here: %s",
                       "; ".join(f"{k}: {v}" for k, v in missing.items()))

    def _stop(signum, _frame) -> None:
        if stopping.is_set():
            return
        logger.info("cmpolicy serve: %s received, stopping",
                    signal.Signals(signum).name)
        stopping.set()
        scheduler.stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    code = EXIT_OK
    try:
        scheduler.run_forever()
    finally:
        host.close()
        try:
            restored = ctx.cluster.restore()
            if restored:
                logger.info("restored task settings on %s",
                            ", ".join(restored))
        except ManagerError as exc:
            logger.error("could not restore task settings: %s", exc)
            code = EXIT_FAILED
        ctx.store.close()
    logger.info("cmpolicy serve: stopped")
    return code


# -- the parser -----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    shared = shared_options()
    parser = argparse.ArgumentParser(
        prog="cmpolicy", description="Check, try and manage policies for"
        " Celery clusters.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name, handler, help_text, *, context=True, **kw):
        sub = commands.add_parser(name, help=help_text,
                                  parents=[shared] if context else [],
                                  **kw)
        sub.set_defaults(handler=handler, needs_context=context)
        if not context:
            sub.add_argument("-v", "--verbose", action="count", default=0)
        return sub

    check = command(
        "check", _cmd_check, "check policy files against the language rules",
        context=False,
        description="Check policy files. Exit 0 when all are valid, 1 when"
        " any is not (every error is printed), 2 on usage errors.")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--format", choices=("text", "json"), default="text",
                       help="text (FILE:LINE:COL: error: MESSAGE) or a JSON"
                       " list")

    trying = command(
        "try", _cmd_try, "run a policy once in the sandbox against a"
        " simulated cluster", context=False,
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

    add = command("add", _cmd_add, "check a policy file and add it to the"
                  " store (or replace it)")
    add.add_argument("file", metavar="FILE")
    add.add_argument("--name", help="default: the file name without .policy")
    add.add_argument("--tenant", help="the tenant it belongs to")
    add.add_argument("--disabled", action="store_true",
                     help="add it without running it")

    listing = command("list", _cmd_list, "list the stored policies")
    listing.add_argument("--tenant")
    listing.add_argument("--json", action="store_true")

    for name, handler, text in (
            ("show", _cmd_show, "print a stored policy"),
            ("enable", _cmd_enable, "let a policy run on its schedule"),
            ("disable", _cmd_enable, "stop a policy from running"),
            ("remove", _cmd_remove, "delete a policy (its history stays)")):
        sub = command(name, handler, text)
        sub.add_argument("name", metavar="NAME")

    history = command("history", _cmd_history, "the runs of a policy or of"
                      " a tenant, newest first, with every call")
    history.add_argument("name", metavar="NAME", nargs="?")
    history.add_argument("--tenant")
    history.add_argument("--limit", type=int, default=20)
    history.add_argument("--json", action="store_true")

    run = command("run", _cmd_run, "run a policy once, for real, ignoring"
                  " its schedule",
                  description="Run a stored policy (NAME) or a policy FILE"
                  " once, for real, through the sandbox, against the cluster"
                  " of the Celery app (-A) or broker (--broker). Exit 0 on"
                  " success, 1 when the policy failed.")
    run.add_argument("policy", metavar="NAME|FILE")
    run.add_argument("--tenant")
    run.add_argument("--json", action="store_true")

    serve = command("serve", _cmd_serve, "run the manager loop: every"
                    " enabled policy on its schedule")
    serve.add_argument("--policies", metavar="DIR", type=Path,
                       help="keep the store in step with this directory of"
                       " .policy files")
    serve.add_argument("--slots", type=int, default=2,
                       help="policies run at once (default 2)")
    return parser


def cmpolicy_main(argv: list[str] | None = None) -> int:
    """Entry point of ``cmpolicy``."""
    args = _parser().parse_args(argv)
    default = logging.INFO if args.command in ("serve", "run") \
        else logging.WARNING
    configure_logging(args.verbose, default=default)
    if not args.needs_context:
        return args.handler(args)
    ctx = Context(args)
    try:
        return args.handler(args, ctx)
    except ConfigurationError as exc:
        print(f"cmpolicy {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ManagerError as exc:
        print(f"cmpolicy {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(cmpolicy_main())
