"""Tenants: scope checks on every operation, and the tenants file."""

import pytest

from manager.errors import ConfigurationError
from manager.mailer import Mailer
from manager.operations import Operations
from manager.simcluster import SimulatedCluster
from manager.tenants import load_tenants, parse_tenants
from sandboxhost.errors import OperationError

TENANTS = """
[default]
workers = []

[tenants.media]
workers = ["media-*@*"]
tasks = ["media.tasks.*"]
queues = ["media", "media.*"]
recipients = ["*@media.example.com"]

[tenants.media.limits]
memory_mb = 64
max_calls = 10
runs_in_parallel = 1

[tenants.billing]
workers = ["billing-*@*"]
tasks = ["billing.*"]
"""


@pytest.fixture
def tenants(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS)
    return load_tenants(path)


@pytest.fixture
def cluster():
    sim = SimulatedCluster()
    for name in ("media-1@a", "media-2@a", "billing-1@a"):
        sim.add_worker(name, 2)
    for name in ("media.tasks.resize", "billing.tasks.charge"):
        sim.add_task(name)
    sim.record("media.tasks.resize", "SUCCESS", worker="media-1@a", sent=10.0)
    sim.record("billing.tasks.charge", "FAILURE", worker="billing-1@a",
               sent=10.0)
    return sim


def ops_for(cluster, tenant):
    return Operations(cluster, cluster, Mailer(dry_run=True), tenant=tenant)


def refused(ops, op, args):
    with pytest.raises(OperationError) as info:
        ops(op, args)
    return info.value.type_name, info.value.message


def test_limits_come_from_the_file(tenants):
    media = tenants.get("media")
    assert media.limits.memory_bytes == 64 * 1024 * 1024
    assert media.limits.max_calls == 10
    assert media.runs_in_parallel == 1


def test_named_worker_outside_the_tenant_is_refused(tenants, cluster):
    ops = ops_for(cluster, tenants.get("media"))
    assert refused(ops, "workers.change", {
        "workers": ["billing-1@a"], "what": "subprocesses", "by": 1}) == (
        "PermissionDenied", "worker 'billing-1@a' is outside tenant 'media'")
    assert cluster.workers["billing-1@a"].subprocesses == 2


def test_all_means_all_of_the_tenants(tenants, cluster):
    ops = ops_for(cluster, tenants.get("media"))
    result = ops("workers.change", {"workers": None, "what": "subprocesses",
                                    "by": 1})
    assert result == {"media-1@a": 3, "media-2@a": 3}
    assert cluster.workers["billing-1@a"].subprocesses == 2
    ops("tasks.set", {"tasks": None, "setting": "rate_limit",
                      "value": "1/s"})
    assert cluster.tasks["billing.tasks.charge"]["rate_limit"] is None
    assert ops("workers.names", {}) == ["media-1@a", "media-2@a"]


def test_tasks_outside_the_tenant_are_refused(tenants, cluster):
    ops = ops_for(cluster, tenants.get("media"))
    assert refused(ops, "tasks.get", {"task": "billing.tasks.charge",
                                      "setting": "rate_limit"})[1] == (
        "task 'billing.tasks.charge' is outside tenant 'media'")


def test_stats_count_only_the_tenants_tasks(tenants, cluster):
    args = {"fn": "tasks", "start": None, "end": None, "workers": None,
            "tasknames": None, "states": None}
    assert ops_for(cluster, tenants.get("media"))("stats", args) == 1
    assert ops_for(cluster, tenants.get("billing"))("stats", args) == 1
    assert refused(ops_for(cluster, tenants.get("media")), "stats", {
        **args, "tasknames": ["billing.tasks.charge"]})[0] == (
        "PermissionDenied")


def test_queues_and_recipients_are_scoped(tenants, cluster):
    ops = ops_for(cluster, tenants.get("media"))
    assert ops("queues.length", {"queue": "media.thumbs"}) == 0
    assert refused(ops, "queues.length", {"queue": "billing"})[1] == (
        "queue 'billing' is outside tenant 'media'")
    mail = {"subject": "s", "message": "m",
            "from_email": "alerts@media.example.com",
            "auth_user": None, "auth_password": None}
    ops("send_email", {**mail, "recipient_list": ["Ops@Media.example.com"]})
    assert refused(ops, "send_email", {
        **mail, "recipient_list": ["boss@billing.example.com"]})[1] == (
        "recipient 'boss@billing.example.com' is outside tenant 'media'")
    assert refused(ops, "send_email", {
        **mail, "from_email": "ceo@billing.example.com",
        "recipient_list": ["ops@media.example.com"]})[1] == (
        "recipient 'ceo@billing.example.com' is outside tenant 'media'")


def test_routing_settings_stay_in_the_tenants_queues(tenants, cluster):
    ops = ops_for(cluster, tenants.get("media"))
    ops("tasks.set", {"tasks": ["media.tasks.resize"],
                      "setting": "routing_key", "value": "media.big"})
    assert refused(ops, "tasks.set", {
        "tasks": ["media.tasks.resize"], "setting": "exchange",
        "value": "billing"})[1] == "queue 'billing' is outside tenant 'media'"


def test_unknown_worker_lists_only_the_tenants_workers(tenants, cluster):
    ops = ops_for(cluster, tenants.get("media"))
    assert refused(ops, "workers.get", {"worker": "media-9@a",
                                        "what": "prefetch"})[1] == (
        "unknown worker 'media-9@a'; known: media-1@a, media-2@a")


def test_results_name_only_the_tenants_workers(tenants, cluster):
    ops = ops_for(cluster, tenants.get("media"))
    result = ops("tasks.set", {"tasks": ["media.tasks.resize"],
                               "setting": "acks_late", "value": True})
    assert sorted(result) == ["media-1@a", "media-2@a"]


def test_default_tenant_of_a_file_may_touch_nothing_unlisted(tenants,
                                                             cluster):
    ops = ops_for(cluster, tenants.get(None))
    assert refused(ops, "workers.get", {"worker": "media-1@a",
                                        "what": "prefetch"})[0] == (
        "PermissionDenied")


def test_no_file_means_one_unrestricted_tenant(cluster):
    ops = ops_for(cluster, load_tenants(None).get(None))
    assert ops("workers.names", {}) == ["billing-1@a", "media-1@a",
                                        "media-2@a"]


@pytest.mark.parametrize("text, message", [
    ("[oops]\n", "unknown section(s) oops"),
    ("[tenants.a]\nworkers = 3\n", "workers must be a list of patterns"),
    ("[tenants.a]\nwho = []\n", "unknown key(s) who"),
    ("[tenants.a.limits]\nmemory_mb = -1\n", "must be a positive number"),
    ("[tenants.a.limits]\nram = 1\n", "unknown limit(s) ram"),
    ("[tenants.a.limits]\ncpu_time_s = 0.5\n",
     "limit cpu_time_s must be a positive whole number"),
    ("[tenants.a.limits]\nmemory_mb = 1e20\n",
     "tenant a: memory_bytes must be a whole number from"),
    ("[tenants.a.limits]\nmemory_mb = 4\n",
     "tenant a: memory_bytes must be a whole number from"),
    ("[tenants.a.limits]\nmemory_mb = inf\n",
     "limit memory_mb must be a positive number"),
    ("[tenants.a.limits]\nwall_timeout_s = nan\n",
     "limit wall_timeout_s must be a positive number"),
    ('[tenants."a b"]\n', "is not a valid tenant name"),
])
def test_bad_tenants_files_are_refused(tmp_path, text, message):
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError) as info:
        load_tenants(path)
    assert message in str(info.value)


def test_unknown_tenant_is_named(tenants):
    with pytest.raises(ConfigurationError) as info:
        tenants.get("nobody")
    assert str(info.value) == ("unknown tenant 'nobody'; configured:"
                               " billing, media")


def test_invalid_toml_is_a_configuration_error(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("[tenants\n")
    with pytest.raises(ConfigurationError):
        load_tenants(path)
    assert parse_tenants({}).get(None).name == "default"
