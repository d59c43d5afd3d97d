"""Two tenants on real workers: each changes only its own, refusals audited."""

import datetime as dt

import pytest

from sandboxhost.host import Host
from manager.control import CeleryCluster
from manager.mailer import Mailer
from manager.registry import Registry
from manager.runner import PolicyRunner
from manager.scheduler import Scheduler
from manager.store import Store
from manager.tenants import parse_tenants

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc
START = dt.datetime(2026, 12, 4, 10, 0, 30, tzinfo=UTC)

TENANTS = {
    "tenants": {
        "media": {"workers": ["media-*@*"], "tasks": ["cmapp.add"],
                  "recipients": ["*@media.example.com"],
                  "limits": {"emails_per_hour": 1}},
        "billing": {"workers": ["billing-*@*"], "tasks": ["cmapp.stamp"],
                    "recipients": ["*@billing.example.com"],
                    "limits": {"emails_per_hour": 5}},
    }}

MAIL = ('send_email("s", "m", "ops@{d}.example.com",'
        ' ["oncall@{d}.example.com"])')

MEDIA = f"""\
policy:
    schedule:
        crontab()
    apply:
        workers["media-1@test"].prefetch.increment()
        {MAIL.format(d="media")}
        tasks["cmapp.stamp"].rate_limit = "1/s"
"""

BILLING = f"""\
policy:
    schedule:
        crontab()
    apply:
        workers.all().prefetch.increment()
        {MAIL.format(d="billing")}
        workers["media-1@test"].prefetch.increment()
"""


def prefetch(app, worker):
    stats = app.control.inspect([worker], timeout=1.0, limit=1).stats()
    return stats[worker]["prefetch_count"]


def test_each_tenant_changes_only_its_own(cluster, tmp_path):
    cluster.start_worker("media-1@test", 1)
    cluster.start_worker("billing-1@test", 1)
    app = cluster.app
    before = {w: prefetch(app, w) for w in ("media-1@test", "billing-1@test")}
    tenants = parse_tenants(TENANTS)
    store = Store(f"sqlite:///{tmp_path / 'm.db'}")
    store.upsert_policy("media-p", MEDIA, tenant="media",
                        now=START.timestamp())
    store.upsert_policy("billing-p", BILLING, tenant="billing",
                        now=START.timestamp())
    control = CeleryCluster(app)
    clock = [START]
    with Host() as host:
        runner = PolicyRunner(host)
        scheduler = Scheduler(
            runner, Registry(runner, store, tenants), cluster=control,
            stats=store, mailer=Mailer(None), store=store, tenants=tenants,
            clock=lambda: clock[0])
        for minute in (1, 2):
            clock[0] = START + dt.timedelta(minutes=minute)
            scheduler.run_due_once()
    control.restore()

    # Each tenant's own worker moved; media's twice, billing's twice.
    assert prefetch(app, "media-1@test") == before["media-1@test"] + 2
    assert prefetch(app, "billing-1@test") == before["billing-1@test"] + 2

    media_runs = store.list_runs("media-p")
    billing_runs = store.list_runs("billing-p")
    assert len(media_runs) == len(billing_runs) == 2
    # media's first run sent its mail, then set another tenant's task:
    # refused, and the refusal is in its history with the arguments.
    first = media_runs[-1]
    assert [c["op"] for c in first.calls] == ["workers.change",
                                              "send_email", "tasks.set"]
    assert first.calls[2]["ok"] is False
    assert first.calls[2]["error"] == ("task 'cmapp.stamp' is outside"
                                       " tenant 'media'")
    assert first.error_line == 7
    # Over its hourly email budget in its second run; billing is not.
    second = media_runs[0]
    assert second.calls[1]["ok"] is False
    assert "emails in the last hour" in second.calls[1]["error"]
    assert all(run.calls[1]["ok"] for run in billing_runs)
    # billing's all() meant its own workers, and naming media's is refused.
    assert billing_runs[0].calls[0]["value"] == {
        "billing-1@test": prefetch(app, "billing-1@test")}
    assert billing_runs[0].calls[2]["error"] == (
        "worker 'media-1@test' is outside tenant 'billing'")
    assert {r.tenant for r in media_runs} == {"media"}
    cluster.stop_worker("media-1@test")
    cluster.stop_worker("billing-1@test")
