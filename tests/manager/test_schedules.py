"""Schedules from schedule-section data, with a fake clock across DST."""

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from manager.schedules import ScheduleError, build_schedule

UTC = dt.timezone.utc
NY = ZoneInfo("America/New_York")


def cron(**fields):
    data = {"type": "crontab", "minute": "*", "hour": "*",
            "day_of_week": "*", "day_of_month": "*", "month_of_year": "*"}
    data.update(fields)
    return data


def runs(schedule, start, end):
    """Every instant the policy would run at between start and end."""
    times, last = [], start
    while True:
        nxt = schedule.next_after(last)
        if nxt is None or nxt > end:
            return times
        times.append(nxt)
        last = nxt


def local(text, tz=NY, fold=0):
    return dt.datetime.fromisoformat(text).replace(tzinfo=tz, fold=fold)


def test_every_minute_by_default():
    schedule = build_schedule(cron())
    start = dt.datetime(2026, 1, 1, 10, 0, 30, tzinfo=UTC)
    assert schedule.next_after(start) == dt.datetime(2026, 1, 1, 10, 1,
                                                     tzinfo=UTC)


def test_every_ten_minutes_on_weekdays():
    schedule = build_schedule(cron(minute="*/10", day_of_week="mon-fri"),
                              "UTC")
    friday = dt.datetime(2026, 12, 4, 23, 55, tzinfo=UTC)
    assert schedule.next_after(friday) == dt.datetime(2026, 12, 7, 0, 0,
                                                      tzinfo=UTC)


def test_timezone_of_the_app_is_honoured():
    schedule = build_schedule(cron(minute=0, hour=3), "America/New_York")
    start = dt.datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    assert schedule.next_after(start) == local("2026-01-01T03:00")


def test_is_due_against_last_run():
    schedule = build_schedule(cron(minute="*/5"))
    last = dt.datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    assert schedule.is_due(last, last + dt.timedelta(minutes=4)) == (False,
                                                                     60.0)
    assert schedule.is_due(last, last + dt.timedelta(minutes=5))[0] is True


def test_fall_back_runs_a_repeated_time_once():
    # 2026-11-01: New York goes from 02:00 EDT back to 01:00 EST.
    schedule = build_schedule(cron(minute=30, hour=1), NY)
    times = runs(schedule, local("2026-10-31T12:00"), local("2026-11-02T12:00"))
    # The first 01:30 is 05:30 UTC (EDT); the second (06:30 UTC) is skipped.
    assert times == [dt.datetime(2026, 11, 1, 5, 30, tzinfo=UTC),
                     dt.datetime(2026, 11, 2, 6, 30, tzinfo=UTC)]


def test_fall_back_every_fifteen_minutes_never_doubles():
    schedule = build_schedule(cron(minute="*/15"), NY)
    start, end = local("2026-11-01T00:50"), local("2026-11-01T02:20")
    times = runs(schedule, start, end)
    assert len(times) == len(set(times))
    # 01:00, 01:15, 01:30, 01:45 (EDT), skipped in EST, then 02:00, 02:15.
    assert [t.astimezone(NY).strftime("%H:%M") for t in times] == [
        "01:00", "01:15", "01:30", "01:45", "02:00", "02:15"]


def test_spring_forward_does_not_skip_a_missing_time():
    # 2026-03-08: New York jumps from 02:00 EST to 03:00 EDT.
    schedule = build_schedule(cron(minute=30, hour=2), NY)
    times = runs(schedule, local("2026-03-07T12:00"), local("2026-03-09T12:00"))
    assert [t.astimezone(NY).isoformat() for t in times] == [
        "2026-03-08T03:30:00-04:00", "2026-03-09T02:30:00-04:00"]


def test_spring_forward_keeps_times_after_the_jump():
    schedule = build_schedule(cron(minute="0,30", hour="2,3"), NY)
    times = runs(schedule, local("2026-03-08T00:00"), local("2026-03-08T05:00"))
    assert [t.astimezone(NY).strftime("%H:%M") for t in times] == [
        "03:00", "03:30"]
    assert len(times) == len(set(times))


def test_every_interval_counts_from_the_last_run():
    schedule = build_schedule({"type": "every", "seconds": 90})
    last = dt.datetime(2026, 1, 1, tzinfo=UTC)
    assert schedule.next_after(last) == last + dt.timedelta(seconds=90)


@pytest.mark.parametrize("data, message", [
    ({"type": "crontab", "minute": "61", "hour": "*", "day_of_week": "*",
      "day_of_month": "*", "month_of_year": "*"}, "crontab: "),
    (cron(day_of_week="funday"), "crontab: "),
    (cron(minute=True), "crontab minute must be"),
    ({"type": "every", "seconds": 0.1}, "every() needs an interval"),
    ({"type": "every", "seconds": float("inf")}, "every() needs"),
    ({"type": "cron"}, "the schedule section must return"),
    ({"type": "crontab", "minute": "*"}, "crontab data must name exactly"),
])
def test_bad_schedule_data_is_refused(data, message):
    with pytest.raises(ScheduleError) as info:
        build_schedule(data)
    assert str(info.value).startswith(message)


def test_impossible_date_is_refused():
    with pytest.raises(ScheduleError) as info:
        build_schedule(cron(minute=0, hour=0, day_of_month=31,
                            month_of_year=2))
    assert "never occurs" in str(info.value)


def test_rare_date_is_found_years_ahead():
    schedule = build_schedule(cron(minute=0, hour=0, day_of_month=29,
                                   month_of_year=2, day_of_week="tue"))
    found = schedule.next_after(dt.datetime(2026, 1, 1, tzinfo=UTC))
    assert found == dt.datetime(2028, 2, 29, tzinfo=UTC)
