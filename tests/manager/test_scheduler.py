"""The manager loop with a fake clock, the real sandbox and a simulated cluster."""

import datetime as dt

import pytest

from sandboxhost.host import Host
from manager.mailer import Mailer
from manager.registry import Registry
from manager.runner import PolicyRunner
from manager.scheduler import Scheduler
from manager.simcluster import SimulatedCluster
from manager.store import Store
from manager.tenants import parse_tenants, single_tenant

UTC = dt.timezone.utc
START = dt.datetime(2026, 12, 4, 10, 0, 30, tzinfo=UTC)

EVERY_MINUTE = """\
policy:
    schedule:
        crontab()
    apply:
        workers["w1@node1"].prefetch.increment()
"""


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, **delta):
        self.now += dt.timedelta(**delta)


@pytest.fixture(scope="module")
def host():
    with Host() as made:
        yield made


@pytest.fixture
def setup(host, tmp_path):
    def make(policies_dir=None, tenants=None, slots=2):
        clock = Clock(START)
        store = Store(f"sqlite:///{tmp_path / 'm.db'}")
        cluster = SimulatedCluster()
        cluster.add_worker("w1@node1", 2)
        cluster.add_worker("media-1@a", 1)
        cluster.add_worker("billing-1@a", 1)
        runner = PolicyRunner(host)
        tenants = tenants or single_tenant()
        registry = Registry(runner, store, tenants, policies_dir)
        scheduler = Scheduler(runner, registry, cluster=cluster,
                              stats=cluster, mailer=Mailer(None), store=store,
                              tenants=tenants, slots=slots, clock=clock)
        return scheduler, store, cluster, clock
    return make


EVERY_10_S = EVERY_MINUTE.replace("crontab()", "every(seconds=10)")


def from_folder(setup, tmp_path):
    """A manager keeping in step with a folder that holds grow.policy."""
    folder = tmp_path / "policies"
    folder.mkdir()
    path = folder / "grow.policy"
    path.write_text(EVERY_MINUTE)
    scheduler, store, cluster, clock = setup(policies_dir=folder)
    scheduler.step()
    return folder, path, scheduler, store, cluster, clock


def test_a_policy_runs_when_due_and_not_before(setup):
    scheduler, store, cluster, clock = setup()
    store.upsert_policy("grow", EVERY_MINUTE, now=START.timestamp())
    assert scheduler.run_due_once() == []
    clock.advance(seconds=30)
    (report,) = scheduler.run_due_once()
    assert report.ok and report.outcome.applied
    assert cluster.workers["w1@node1"].prefetch == 9
    assert scheduler.run_due_once() == []
    (run,) = store.list_runs("grow")
    assert run.outcome == "ok" and run.calls[0]["op"] == "workers.change"
    assert store.get_policy("grow").last_run_at == pytest.approx(
        clock.now.timestamp(), abs=1)


def test_a_frequent_policy_runs_on_time_beside_a_slower_one(setup):
    # The next scan was set from the policies not running at the time, so
    # one that had just run waited for the slower one's next minute.
    scheduler, store, cluster, clock = setup()
    store.upsert_policy("often", EVERY_10_S, now=START.timestamp())
    store.upsert_policy("minutely", EVERY_MINUTE, now=START.timestamp())
    ran = []
    for _ in range(9):
        clock.advance(seconds=10)
        ran.append(sorted(r.policy for r in scheduler.run_due_once()))
    assert ran.count(["often"]) + ran.count(["minutely", "often"]) == 9
    assert ran.count(["minutely", "often"]) == 2


def test_a_policy_due_while_it_still_runs_runs_after(setup):
    # Due again while its run is in progress: picked up once it ends, not
    # at some other policy's next time.
    scheduler, store, cluster, clock = setup()
    store.upsert_policy("often", EVERY_10_S, now=START.timestamp())
    store.upsert_policy("hourly", EVERY_MINUTE.replace(
        "crontab()", "crontab(minute=0)"), now=START.timestamp())
    clock.advance(seconds=10)
    scheduler.step()                      # starts "often"
    assert [e.name for e in scheduler._running.values()] == ["often"]
    clock.advance(seconds=15)             # a scan while it counts as busy
    scheduler._queue_due(clock.now)
    assert scheduler._scan_at > clock.now + dt.timedelta(minutes=30)
    while scheduler._running:
        scheduler._wait(1.0)
        scheduler._collect()
    assert scheduler._sleep_for(clock.now) == 0.0
    (report,) = scheduler.run_due_once()  # the run it was due for
    assert report.policy == "often"


def test_a_failing_policy_is_recorded_and_others_run(setup):
    scheduler, store, cluster, clock = setup()
    store.upsert_policy("bad", EVERY_MINUTE.replace("w1@node1", "nope@x"),
                        now=START.timestamp())
    store.upsert_policy("good", EVERY_MINUTE, now=START.timestamp())
    clock.advance(minutes=1)
    reports = {r.policy: r for r in scheduler.run_due_once()}
    assert reports["good"].ok
    assert reports["bad"].error.line == 5
    (run,) = store.list_runs("bad")
    assert (run.outcome, run.error_section, run.error_line) == (
        "policy_error", "apply", 5)
    assert run.error_message.startswith("in apply at line 5: unknown worker")


def test_a_policy_killed_for_its_wall_time_is_recorded(setup):
    tenants = parse_tenants({"default": {"workers": ["*"], "tasks": ["*"],
                                         "limits": {"wall_timeout_s": 0.5}}})
    scheduler, store, cluster, clock = setup(tenants=tenants)
    spin = EVERY_MINUTE.replace(
        'workers["w1@node1"].prefetch.increment()',
        "x = sum(i for i in range(10 ** 12))")
    store.upsert_policy("spin", spin, now=START.timestamp())
    clock.advance(minutes=1)
    (report,) = scheduler.run_due_once()
    assert report.outcome.error.kind == "timeout"
    assert store.list_runs("spin")[0].outcome == "timeout"


def test_invalid_file_is_reported_and_last_good_version_kept(setup, tmp_path,
                                                             caplog):
    folder, path, scheduler, store, cluster, clock = from_folder(setup,
                                                                 tmp_path)
    clock.advance(minutes=1)
    assert len(scheduler.run_due_once()) == 1
    path.write_text(EVERY_MINUTE.replace("prefetch.increment()",
                                         "prefetch.increment(\n"))
    clock.advance(minutes=1)
    (report,) = scheduler.run_due_once()
    assert report.ok
    assert "grow: " in caplog.text and "keeps running" in caplog.text
    assert "'(' was never closed" in caplog.text \
        or "not closed" in caplog.text
    # The store still holds the good text: a restart runs it too.
    assert store.get_policy("grow").source == EVERY_MINUTE


def test_a_file_whose_schedule_fails_keeps_the_good_version(setup, tmp_path,
                                                            caplog):
    folder, path, scheduler, store, cluster, clock = from_folder(setup,
                                                                 tmp_path)
    # Checks, but its schedule section raises in the child.
    path.write_text(EVERY_MINUTE.replace("crontab()", "crontab(minute=1 / 0)"))
    clock.advance(minutes=1)
    (report,) = scheduler.run_due_once()
    assert report.ok
    assert ("grow.policy:3: error: in schedule at line 3: division by zero"
            " (ZeroDivisionError); its last good version keeps running"
            in caplog.text)
    assert "keeps running" in caplog.text
    assert store.get_policy("grow").source == EVERY_MINUTE
    # A new file that fails the same way is reported and not stored.
    (folder / "other.policy").write_text(path.read_text())
    clock.advance(minutes=1)
    scheduler.run_due_once()
    assert store.get_policy("other") is None
    assert "other.policy:3: error: in schedule at line 3" in caplog.text


def test_edited_and_removed_files_are_picked_up(setup, tmp_path):
    folder, path, scheduler, store, cluster, clock = from_folder(setup,
                                                                 tmp_path)
    clock.advance(minutes=1)
    scheduler.run_due_once()
    path.write_text(EVERY_MINUTE.replace("prefetch.increment()",
                                         "prefetch.increment(5)"))
    clock.advance(minutes=1)
    scheduler.run_due_once()
    assert cluster.workers["w1@node1"].prefetch == 8 + 1 + 5
    path.unlink()
    clock.advance(minutes=1)
    assert scheduler.run_due_once() == []
    assert store.get_policy("grow") is None


def test_nothing_runs_while_no_worker_answers(setup, caplog):
    scheduler, store, cluster, clock = setup()
    store.upsert_policy("grow", EVERY_MINUTE, now=START.timestamp())
    workers = dict(cluster.workers)
    cluster.workers.clear()
    clock.advance(minutes=1)
    assert scheduler.run_due_once() == []
    assert scheduler.run_due_once() == []
    assert caplog.text.count("policies wait until a worker answers") == 1
    cluster.workers.update(workers)
    assert len(scheduler.run_due_once()) == 1


def test_tenants_take_turns_for_slots(setup):
    tenants = parse_tenants({
        "tenants": {
            "a": {"workers": ["*"], "limits": {"runs_in_parallel": 1}},
            "b": {"workers": ["*"], "limits": {"runs_in_parallel": 1}},
        }})
    scheduler, store, cluster, clock = setup(tenants=tenants, slots=2)
    for i in range(4):
        store.upsert_policy(f"a{i}", EVERY_MINUTE, tenant="a",
                            now=START.timestamp())
    store.upsert_policy("b0", EVERY_MINUTE, tenant="b", now=START.timestamp())
    clock.advance(minutes=1)
    scheduler.step()
    running = sorted(e.tenant for e in scheduler._running.values())
    assert running == ["a", "b"]
    reports = scheduler.run_due_once()
    assert len(reports) == 5


def test_a_spinning_schedule_section_is_stopped_early(setup, caplog):
    # Schedule sections run in the manager loop; theirs is a short leash.
    scheduler, store, cluster, clock = setup()
    spin = EVERY_MINUTE.replace("crontab()",
                                "crontab(minute=sum(range(10 ** 12)))")
    store.upsert_policy("spin", spin, now=START.timestamp())
    store.upsert_policy("grow", EVERY_MINUTE, now=START.timestamp())
    clock.advance(minutes=1)
    (report,) = scheduler.run_due_once()
    assert report.policy == "grow" and report.ok
    assert ("went past its wall-clock limit of 2.0 s" in caplog.text
            or "CPU time limit" in caplog.text)


FORGING = EVERY_MINUTE.replace(
    'workers["w1@node1"].prefetch.increment()',
    'datetime.datetime.strptime("2020" + chr(10) + "2099-01-01 CRITICAL'
    ' forged" + chr(27) + "[8m", "%Y")')


def test_policy_error_text_cannot_forge_log_lines_or_terminal_codes(
        setup, caplog, tmp_path, capsys):
    scheduler, store, cluster, clock = setup()
    store.upsert_policy("forge", FORGING, now=START.timestamp())
    clock.advance(minutes=1)
    (report,) = scheduler.run_due_once()
    assert not report.ok
    assert "\x1b" not in caplog.text
    assert not any(line.startswith("2099") for line in caplog.text.splitlines())
    assert "\\n2099-01-01 CRITICAL forged\\x1b[8m" in caplog.text
    # The stored message is kept as it was; the history prints it escaped.
    from manager.cli import cmpolicy_main
    assert cmpolicy_main(["history", "forge", "--db",
                          f"sqlite:///{tmp_path / 'm.db'}"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\n2099-01-01" in out
