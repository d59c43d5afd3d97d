"""Regression tests for what a hostile tenant tried with a policy file."""

import dataclasses
import datetime as dt

import pytest

from sandboxhost.errors import OperationError
from sandboxhost.host import CallRecord
from manager.mailer import Mailer, MailLimitExceeded, check_email
from manager.operations import Operations
from manager.runner import printable
from manager.scheduler import MAX_RECORDED_VALUE_CHARS, bounded_call
from manager.schedules import ScheduleError, build_schedule
from manager.simcluster import SimulatedCluster
from manager.tenants import unrestricted


@pytest.fixture
def ops():
    sim = SimulatedCluster()
    sim.add_worker("w1@a")
    sim.add_task("t")
    return Operations(sim, sim, Mailer(None))


@pytest.mark.parametrize("value", ["10/s\n", "10/s\r", " 10/s", "1" * 20])
def test_rate_limits_with_trailing_junk_are_refused(ops, value):
    with pytest.raises(OperationError) as info:
        ops("tasks.set", {"tasks": None, "setting": "rate_limit",
                          "value": value})
    assert "is not in Celery's form" in info.value.message


@pytest.mark.parametrize("value", ["é" * 120_000, "a" * 256, "q\n", "a b"])
def test_routing_names_are_bounded_and_plain(ops, value):
    with pytest.raises(OperationError) as info:
        ops("tasks.set", {"tasks": None, "setting": "routing_key",
                          "value": value})
    assert "is not a valid name" in info.value.message


@pytest.mark.parametrize("data", [{"type": "every", "seconds": 1e308},
                                  {"type": "every", "seconds": 10 ** 15}])
def test_huge_intervals_are_schedule_errors(data):
    with pytest.raises(ScheduleError):
        build_schedule(data)


def test_far_future_is_never_due_not_an_overflow():
    schedule = build_schedule({"type": "every", "seconds": 366 * 86400})
    far = dt.datetime(9999, 12, 1, tzinfo=dt.timezone.utc)
    assert schedule.next_after(far) is None


def test_addresses_with_a_trailing_newline_are_refused():
    with pytest.raises(Exception) as info:
        check_email("s", "m", "a@b.c\n", ["x@y.z"])
    assert "is not an email address" in str(info.value)


def test_tenant_hourly_email_budget_is_enforced():
    tenant = dataclasses.replace(unrestricted("t"), emails_per_hour=2,
                                 emails_per_run=10)
    sim = SimulatedCluster()
    ops = Operations(sim, sim, Mailer(None), tenant=tenant, policy="p")
    mail = {"subject": "s", "message": "m", "from_email": "a@b.c",
            "recipient_list": ["x@y.z"], "auth_user": None,
            "auth_password": None}
    ops("send_email", mail)
    ops("send_email", mail)
    with pytest.raises(OperationError) as info:
        ops("send_email", mail)
    assert info.value.type_name == MailLimitExceeded.__name__


def test_recorded_calls_are_bounded():
    call = CallRecord("tasks.set", {"value": "é" * 100_000}, True,
                      {"w": "x" * 100_000})
    recorded = bounded_call(call)
    assert len(recorded["args"]["truncated"]) == MAX_RECORDED_VALUE_CHARS
    assert recorded["value"]["chars"] > 100_000


def test_policy_text_cannot_forge_log_lines_or_escape_sequences():
    assert printable("ok\n2026-01-01 ERROR fake") == \
        "ok\\n2026-01-01 ERROR fake"
    assert printable("\x1b[2J") == "\\x1b[2J"
    assert printable("x" * 600).endswith("... (600 characters)")
