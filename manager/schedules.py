"""Schedules built from the data a policy's schedule section returned.

The child evaluates ``crontab(...)`` or ``every(...)`` and hands back plain
data; here the manager builds Celery's schedule object from it (Celery
parses and checks the crontab fields) and computes when the policy is next
due, in the Celery app's timezone.

Daylight-saving time: each matching wall-clock time runs once. A time
that occurs twice when clocks go back runs at its first occurrence only; a
time that does not exist when clocks go forward runs once, as far after
the jump as it was after the last valid time (02:30 on a night that jumps
from 02:00 to 03:00 runs at 03:30). Instants are compared in UTC, so
nothing runs twice and nothing is skipped.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from celery import schedules as celery_schedules

from manager.errors import OperationRefused

logger = logging.getLogger(__name__)

UTC = dt.timezone.utc
CRONTAB_FIELDS = ("minute", "hour", "day_of_week", "day_of_month",
                  "month_of_year")
# How far ahead to look for a matching day: a crontab such as
# "29 February, a Monday" can be years away; beyond this it is "never".
MAX_LOOKAHEAD_DAYS = 366 * 8
MIN_INTERVAL_S = 1.0
# More than any daylight-saving jump (the largest in use is two hours).
DST_SPAN = dt.timedelta(hours=3)
MAX_INTERVAL_S = 366 * 24 * 3600.0


class ScheduleError(OperationRefused):
    """Raised when a schedule section returned fields Celery cannot use."""


@dataclass(frozen=True)
class PolicySchedule:
    """A policy's schedule: Celery's object plus DST-safe due times."""

    data: dict
    celery: celery_schedules.BaseSchedule
    timezone: dt.tzinfo

    def describe(self) -> str:
        if self.data["type"] == "every":
            return f"every {self.data['seconds']:g} s"
        fields = " ".join(str(self.data[f]) for f in CRONTAB_FIELDS)
        return f"crontab {fields} ({self.timezone})"

    def next_after(self, moment: dt.datetime) -> dt.datetime | None:
        """The first due instant strictly after ``moment`` (aware, UTC)."""
        moment = _aware(moment)
        try:
            if self.data["type"] == "every":
                return moment + dt.timedelta(seconds=self.data["seconds"])
            return _next_crontab(self.celery, self.timezone, moment)
        except OverflowError:
            return None  # past the year 9999: never

    def is_due(self, last_run_at: dt.datetime,
               now: dt.datetime) -> tuple[bool, float]:
        """Like Celery's ``is_due``: (due now?, seconds until it is)."""
        due = self.next_after(last_run_at)
        if due is None:
            return False, float("inf")
        remaining = (due - _aware(now)).total_seconds()
        return remaining <= 0, max(0.0, remaining)


def build_schedule(data: dict, timezone: dt.tzinfo | str = "UTC"
                   ) -> PolicySchedule:
    """Check the schedule data from a child and build the schedule."""
    if isinstance(timezone, str):
        timezone = ZoneInfo(timezone)
    if not isinstance(data, dict) or data.get("type") not in ("crontab",
                                                              "every"):
        raise ScheduleError("the schedule section must return crontab(...)"
                            " or every(...)")
    if data["type"] == "every":
        seconds = data.get("seconds")
        if set(data) != {"type", "seconds"} or \
                not isinstance(seconds, (int, float)) or isinstance(seconds,
                                                                     bool) \
                or not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
            raise ScheduleError(f"every() needs an interval from"
                                f" {MIN_INTERVAL_S:g} s to 366 days")
        run_every = dt.timedelta(seconds=seconds)
        return PolicySchedule(dict(data), celery_schedules.schedule(run_every),
                              timezone)
    if set(data) != {"type", *CRONTAB_FIELDS}:
        raise ScheduleError("crontab data must name exactly"
                            f" {', '.join(CRONTAB_FIELDS)}")
    fields = {}
    for name in CRONTAB_FIELDS:
        value = data[name]
        if isinstance(value, list):
            if not all(isinstance(v, int) and not isinstance(v, bool)
                       for v in value) or len(value) > 400:
                raise ScheduleError(f"crontab {name} must be a string, a"
                                    " number or a list of numbers")
            value = set(value)
        elif not isinstance(value, (str, int)) or isinstance(value, bool) \
                or (isinstance(value, str) and len(value) > 200):
            raise ScheduleError(f"crontab {name} must be a string, a number"
                                " or a list of numbers")
        fields[name] = value
    try:
        schedule = celery_schedules.crontab(**fields)
    except (ValueError, TypeError, celery_schedules.ParseException) as exc:
        raise ScheduleError(f"crontab: {exc}") from exc
    return PolicySchedule(dict(data), schedule, timezone)


def _aware(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        raise ValueError("schedules compare aware datetimes only")
    return moment.astimezone(UTC)


def _instant(local: dt.datetime, timezone: dt.tzinfo) -> dt.datetime:
    """A local wall-clock time as one UTC instant (first one; see module)."""
    return local.replace(tzinfo=timezone, fold=0).astimezone(UTC)


def _offset(timezone: dt.tzinfo, local: dt.datetime) -> dt.timedelta:
    return local.replace(tzinfo=timezone).utcoffset()


def _next_crontab(cron, timezone: dt.tzinfo,
                  after: dt.datetime) -> dt.datetime | None:
    """The earliest matching instant after ``after``.

    Local times are visited in order. A time skipped by a forward jump
    maps to an instant past the jump, so it may come later than a valid
    time a little further on; but never later than DST_SPAN further on,
    which bounds the search once a candidate is found.
    """
    minutes = sorted(cron.minute)
    hours = sorted(cron.hour)
    # Celery counts days of the week from Sunday = 0; Python from Monday.
    weekdays = {(d - 1) % 7 for d in cron.day_of_week}
    local_after = after.astimezone(timezone).replace(tzinfo=None)
    lower = local_after - DST_SPAN
    # Usually no clock change is near: then local order is instant order
    # and the first matching local time after ``after`` is the answer.
    steady = (_offset(timezone, lower) == _offset(timezone, local_after)
              == _offset(timezone, local_after + 2 * DST_SPAN))
    if steady:
        lower = local_after
    day = lower.date()
    best: dt.datetime | None = None
    best_local: dt.datetime | None = None
    for _ in range(MAX_LOOKAHEAD_DAYS):
        if best_local is not None and \
                dt.datetime.combine(day, dt.time()) - best_local > DST_SPAN:
            break
        if (day.month in cron.month_of_year and day.day in cron.day_of_month
                and day.weekday() in weekdays):
            for hour in hours:
                if dt.datetime.combine(day, dt.time(hour, 59)) < lower:
                    continue
                for minute in minutes:
                    local = dt.datetime.combine(day, dt.time(hour, minute))
                    if local < lower:
                        continue
                    if best_local is not None and local - best_local > DST_SPAN:
                        return best
                    instant = _instant(local, timezone)
                    if instant > after and (best is None or instant < best):
                        best, best_local = instant, local
                        if steady:
                            return best
        day += dt.timedelta(days=1)
    return best
