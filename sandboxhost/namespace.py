"""What policy code can see in the child: builtins, modules, the API.

Everything here runs in the child. Nothing real is handed to policy code:
the API objects are proxies that turn each use into a call to the manager
through ``bridge.call(op, args)``, with arguments made of plain data, and
the modules are read-only views of their public names. A proxy keeps its
state in underscore-named slots, which policy code cannot spell.

The call vocabulary (``op`` and the keys of ``args``) is listed in OPS; the
manager checks every call against it again, since a child may be hostile.
"""

from __future__ import annotations

import builtins
import calendar as _calendar
import datetime as _datetime
import math as _math
import re
import string
import time as _time
import types
from collections.abc import Iterable

import _string
# The C code of datetime.strptime and time.strptime imports _strptime
# through the caller's __import__; load it here, in the template process,
# because a child can read no files.
import _strptime  # noqa: F401
import locale  # noqa: F401
import sys

from sandboxhost.names import ALLOWED_BUILTINS, FORMAT_HOOK, name_problem

# Call names and their argument keys, shared with the manager's checks.
OPS = {
    "tasks.get": ("task", "setting"),
    "tasks.set": ("tasks", "setting", "value"),
    "workers.names": (),
    "workers.get": ("worker", "what"),
    "workers.change": ("workers", "what", "by"),
    "workers.queues": ("workers", "action", "queue"),
    "queues.length": ("queue",),
    "stats": ("fn", "start", "end", "workers", "tasknames", "states"),
    "send_email": ("subject", "message", "from_email", "recipient_list",
                   "auth_user", "auth_password"),
}

STATES = ("PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "REVOKED",
          "RETRY")

# Task settings a policy may read and write, with the types they accept.
TASK_SETTINGS = {
    "ignore_result": (bool,),
    "routing_key": (str, type(None)),
    "exchange": (str, type(None)),
    "default_retry_delay": (int,),
    "rate_limit": (str, type(None)),
    "store_errors_even_if_ignored": (bool,),
    "acks_late": (bool,),
    "expires": (int, type(None)),
    "time_limit": (int, float, type(None)),
    "soft_time_limit": (int, float, type(None)),
}

STATS_FUNCTIONS = ("tasks", "tasks_failed", "tasks_succeeded",
                   "tasks_revoked", "tasks_ready", "tasks_unready",
                   "tasks_sent", "mean_waittime", "mean_runtime")

# \Z, not $: "$" also matches before a trailing newline.
RATE_LIMIT_RE = re.compile(r"\A\d{1,9}(\.\d{1,6})?(/[smh])?\Z")
MAX_NAME_CHARS = 512
MAX_NAMES = 1000

_TIMESTR_RE = re.compile(r"\A(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{0,6}))?)?\Z")

# Module members left out even though public: they change the process or
# expose C internals, and no policy needs them.
_MODULE_EXCLUDES = {
    "time": {"clock_settime", "clock_settime_ns", "tzset", "sleep"},
    "calendar": {"main", "setfirstweekday", "sys", "error"},
    "datetime": {"datetime_CAPI", "sys"},
    "math": set(),
}


class CallFailed(Exception):
    """Raised in policy code when the manager refused or failed a call."""

    def __init__(self, message: str, type_name: str = "PolicyError"):
        super().__init__(message)
        self.type_name = type_name


class ScheduleSpec:
    """What the schedule section returns: plain data for the manager."""

    __slots__ = ("data",)

    def __init__(self, data: dict):
        self.data = data

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.data.items()
                         if k != "type")
        return f"{self.data['type']}({args})"


# -- plain helpers -------------------------------------------------------------

def _check_type(what: str, value, kinds: tuple) -> None:
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join("None" if k is type(None) else k.__name__
                            for k in kinds)
        raise TypeError(f"{what} must be {names}, not"
                        f" {type(value).__name__} ({value!r:.60})")


def _names(what: str, value, *, allow_none: bool = True) -> list[str] | None:
    """A string or an iterable of strings, as a bounded list."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, Iterable) or isinstance(value, (bytes, dict)):
        raise TypeError(f"{what} must be a string or an iterable of strings,"
                        f" not {type(value).__name__}")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"{what} must contain strings, not"
                            f" {type(item).__name__} ({item!r:.60})")
        if not item or len(item) > MAX_NAME_CHARS:
            raise ValueError(f"{what}: {item!r:.60} is not a valid name")
        out.append(item)
        if len(out) > MAX_NAMES:
            raise ValueError(f"{what}: more than {MAX_NAMES} names")
    return out


def _selector(what: str, key) -> tuple[str, ...]:
    if isinstance(key, str):
        return tuple(_names(what, key, allow_none=False))
    if isinstance(key, (tuple, list)):
        names = _names(what, key, allow_none=False)
        if not names:
            raise ValueError(f"{what}[...] needs at least one name")
        return tuple(names)
    raise TypeError(f"{what}[...] takes a name or a tuple of names, not"
                    f" {type(key).__name__}")


def _count(n) -> int:
    _check_type("n", n, (int,))
    if n < 1:
        raise ValueError(f"n must be 1 or more, not {n}")
    return n


# -- formatting ------------------------------------------------------------------

class _CheckedFormatter(string.Formatter):
    """str.format that refuses the attribute names the language refuses."""

    def get_field(self, field_name, args, kwargs):
        first, rest = _string.formatter_field_name_split(field_name)
        obj = self.get_value(first, args, kwargs)
        for is_attribute, key in rest:
            if is_attribute:
                if name_problem(key, attribute=True):
                    raise ValueError(f"format field {{{field_name}}} reads"
                                     f" an attribute that is not allowed"
                                     f" ({key!r})")
                obj = getattr(obj, key)
            else:
                obj = obj[key]
        return obj, first


_FORMATTER = _CheckedFormatter()


def _checked_format(template: str, *args, **kwargs) -> str:
    if not isinstance(template, str):
        raise TypeError("format() needs a string template")
    return _FORMATTER.vformat(template, args, kwargs)


def format_hook(obj):
    """What ``obj.format`` means in policy code (the compiler routes it here)."""
    if isinstance(obj, str):
        def format(*args, **kwargs):  # noqa: A001
            return _checked_format(obj, *args, **kwargs)
        return format
    if obj is str:
        return _checked_format
    return getattr(obj, "format")


# -- modules ---------------------------------------------------------------------

class ModuleView:
    """A read-only view of a module's public names."""

    __slots__ = ("_name", "_members")

    def __init__(self, module: types.ModuleType):
        excluded = _MODULE_EXCLUDES.get(module.__name__, set())
        names = getattr(module, "__all__", None) or dir(module)
        members = {}
        for name in names:
            if name.startswith("_") or name in excluded:
                continue
            value = getattr(module, name)
            if isinstance(value, types.ModuleType):
                continue
            members[name] = value
        object.__setattr__(self, "_name", module.__name__)
        object.__setattr__(self, "_members", members)

    def __getattr__(self, name):
        try:
            return self._members[name]
        except KeyError:
            raise AttributeError(f"module {self._name!r} has no attribute"
                                 f" {name!r} available to policies") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"module {self._name!r} is read-only")

    def __delattr__(self, name):
        raise AttributeError(f"module {self._name!r} is read-only")

    def __dir__(self):
        return sorted(self._members)

    def __repr__(self) -> str:
        return f"<module {self._name!r} (read-only)>"


_MODULES = {m.__name__: ModuleView(m)
            for m in (_datetime, _time, _calendar, _math)}


# -- schedule --------------------------------------------------------------------

_CRONTAB_FIELDS = ("minute", "hour", "day_of_week", "day_of_month",
                   "month_of_year")


def crontab(minute="*", hour="*", day_of_week="*", day_of_month="*",
            month_of_year="*") -> ScheduleSpec:
    """Celery's crontab, as data; the manager builds the real schedule."""
    data = {"type": "crontab"}
    for name, value in zip(_CRONTAB_FIELDS, (minute, hour, day_of_week,
                                             day_of_month, month_of_year)):
        if isinstance(value, (set, frozenset, list, tuple, range)):
            value = list(value)
            for item in value:
                _check_type(f"crontab {name} items", item, (int,))
        else:
            _check_type(f"crontab {name}", value, (str, int))
        if isinstance(value, str) and len(value) > 200:
            raise ValueError(f"crontab {name} is too long")
        if isinstance(value, list) and len(value) > 400:
            raise ValueError(f"crontab {name} has too many items")
        data[name] = value
    return ScheduleSpec(data)


def every(seconds=0, minutes=0, hours=0) -> ScheduleSpec:
    """A fixed interval (an extension to the original language)."""
    total = 0.0
    for name, value, scale in (("seconds", seconds, 1), ("minutes", minutes,
                               60), ("hours", hours, 3600)):
        _check_type(f"every {name}", value, (int, float))
        if not _math.isfinite(value) or value < 0:
            raise ValueError(f"every {name} must be a positive number")
        total += value * scale
    if total <= 0:
        raise ValueError("every() needs a positive interval")
    return ScheduleSpec({"type": "every", "seconds": total})


# -- API proxies -----------------------------------------------------------------

class _Proxy:
    __slots__ = ("_bridge",)

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot set {name!r} on {self!r}")


class Tasks(_Proxy):
    """``tasks``: select task types by name."""

    __slots__ = ()

    def __init__(self, bridge):
        object.__setattr__(self, "_bridge", bridge)

    def __getitem__(self, key) -> "TaskSelection":
        return TaskSelection(self._bridge, _selector("tasks", key))

    def all(self) -> "TaskSelection":
        return TaskSelection(self._bridge, None)

    def __repr__(self) -> str:
        return "<tasks>"


class TaskSelection(_Proxy):
    """One or more task types; settings are read on one, written on any."""

    __slots__ = ("_names",)

    def __init__(self, bridge, names: tuple[str, ...] | None):
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_names", names)

    def __getattr__(self, name):
        if name not in TASK_SETTINGS:
            raise AttributeError(f"tasks have no setting {name!r}; known:"
                                 f" {', '.join(sorted(TASK_SETTINGS))}")
        if self._names is None or len(self._names) != 1:
            raise ValueError(f"read {name!r} on one named task: the"
                             " selected tasks may differ")
        return self._bridge.call("tasks.get", {"task": self._names[0],
                                               "setting": name})

    def __setattr__(self, name, value):
        if name not in TASK_SETTINGS:
            raise AttributeError(f"tasks have no setting {name!r}; known:"
                                 f" {', '.join(sorted(TASK_SETTINGS))}")
        _check_type(name, value, TASK_SETTINGS[name])
        if name == "rate_limit" and value is not None \
                and not RATE_LIMIT_RE.match(value):
            raise ValueError(f"rate_limit {value!r:.60} is not in Celery's"
                             ' form, such as "10/s", "100/m" or "5/h"')
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not _math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a positive number")
        names = None if self._names is None else list(self._names)
        self._bridge.call("tasks.set", {"tasks": names, "setting": name,
                                        "value": value})

    def __repr__(self) -> str:
        return "<tasks all>" if self._names is None else \
            f"<tasks {list(self._names)!r}>"


class Workers(_Proxy):
    """``workers``: select workers by name."""

    __slots__ = ()

    def __init__(self, bridge):
        object.__setattr__(self, "_bridge", bridge)

    def __getitem__(self, key) -> "WorkerSelection":
        return WorkerSelection(self._bridge, _selector("workers", key))

    def all(self) -> "WorkerSelection":
        return WorkerSelection(self._bridge, None)

    def names(self) -> list[str]:
        return list(self._bridge.call("workers.names", {}))

    def __repr__(self) -> str:
        return "<workers>"


class WorkerSelection(_Proxy):
    """One or more workers."""

    __slots__ = ("_names",)

    def __init__(self, bridge, names: tuple[str, ...] | None):
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_names", names)

    @property
    def prefetch(self) -> "WorkerCounter":
        return WorkerCounter(self._bridge, self._names, "prefetch")

    @property
    def subprocesses(self) -> "WorkerCounter":
        return WorkerCounter(self._bridge, self._names, "subprocesses")

    @property
    def queues(self) -> "WorkerQueues":
        return WorkerQueues(self._bridge, self._names)

    def __repr__(self) -> str:
        return "<workers all>" if self._names is None else \
            f"<workers {list(self._names)!r}>"


def _one_worker(names, what: str) -> str:
    if names is None or len(names) != 1:
        raise ValueError(f"{what}.get() works on one named worker only")
    return names[0]


def _worker_list(names) -> list[str] | None:
    return None if names is None else list(names)


class WorkerCounter(_Proxy):
    """``.prefetch`` or ``.subprocesses`` of selected workers."""

    __slots__ = ("_names", "_what")

    def __init__(self, bridge, names, what: str):
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_what", what)

    def get(self) -> int:
        worker = _one_worker(self._names, self._what)
        return self._bridge.call("workers.get", {"worker": worker,
                                                 "what": self._what})

    def increment(self, n=1):
        return self._bridge.call("workers.change", {
            "workers": _worker_list(self._names), "what": self._what,
            "by": _count(n)})

    def decrement(self, n=1):
        return self._bridge.call("workers.change", {
            "workers": _worker_list(self._names), "what": self._what,
            "by": -_count(n)})

    def __iadd__(self, other):
        raise TypeError(f"use .{self._what}.increment(n) or"
                        f" .{self._what}.decrement(n) to change it")

    __isub__ = __iadd__

    def __repr__(self) -> str:
        return f"<{self._what} of {_worker_list(self._names) or 'all'}>"


class WorkerQueues(_Proxy):
    """``.queues`` of selected workers: what they consume from."""

    __slots__ = ("_names",)

    def __init__(self, bridge, names):
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_names", names)

    def get(self) -> list[str]:
        worker = _one_worker(self._names, "queues")
        return list(self._bridge.call("workers.get", {"worker": worker,
                                                      "what": "queues"}))

    def add(self, queue):
        return self._change("add", queue)

    def remove(self, queue):
        return self._change("remove", queue)

    def _change(self, action: str, queue):
        _check_type("queue", queue, (str,))
        return self._bridge.call("workers.queues", {
            "workers": _worker_list(self._names), "action": action,
            "queue": queue})

    def __repr__(self) -> str:
        return f"<queues of {_worker_list(self._names) or 'all'}>"


class Queues(_Proxy):
    """``queues``: broker queues by name (an extension)."""

    __slots__ = ()

    def __init__(self, bridge):
        object.__setattr__(self, "_bridge", bridge)

    def __getitem__(self, name) -> "Queue":
        _check_type("queue name", name, (str,))
        return Queue(self._bridge, name)

    def __repr__(self) -> str:
        return "<queues>"


class Queue(_Proxy):
    __slots__ = ("_name",)

    def __init__(self, bridge, name: str):
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_name", name)

    def length(self) -> int:
        return self._bridge.call("queues.length", {"queue": self._name})

    def __repr__(self) -> str:
        return f"<queue {self._name!r}>"


def _moment(value, now: _datetime.datetime, what: str):
    if isinstance(value, _datetime.datetime):
        return value
    raise TypeError(f"{what} must be a datetime or a timedelta, not"
                    f" {type(value).__name__}")


def resolve_interval(interval, now: _datetime.datetime):
    """The (start, end) datetimes an ``interval`` argument stands for."""
    if interval is None:
        return None, None
    td = _datetime.timedelta
    if isinstance(interval, td):
        start, end = now - interval, now
    elif isinstance(interval, (tuple, list)) and len(interval) == 2:
        a, b = interval
        if isinstance(a, td) and isinstance(b, td):
            start, end = now - a, now - b
        elif isinstance(a, td):
            end = _moment(b, now, "interval[1]")
            start = end - a
        elif isinstance(b, td):
            start = _moment(a, now, "interval[0]")
            end = start + b
        else:
            start = _moment(a, now, "interval[0]")
            end = _moment(b, now, "interval[1]")
    else:
        raise TypeError("interval must be a timedelta or a pair of"
                        " timedeltas and datetimes")
    if (start.tzinfo is None) != (end.tzinfo is None):
        raise ValueError("interval mixes naive and timezone-aware datetimes")
    if start > end:
        start, end = end, start
    return start, end


class Stats(_Proxy):
    """``stats``: counts and means over the recorded tasks."""

    __slots__ = ()

    def __init__(self, bridge):
        object.__setattr__(self, "_bridge", bridge)

    def _query(self, fn, interval, workers, tasknames, states=None):
        start, end = resolve_interval(interval, self._bridge.now())
        if states is not None:
            states = _names("states", states)
            for state in states:
                if state not in STATES:
                    raise ValueError(f"unknown state {state!r}; known:"
                                     f" {', '.join(STATES)}")
        return self._bridge.call("stats", {
            "fn": fn,
            "start": None if start is None else start.isoformat(),
            "end": None if end is None else end.isoformat(),
            "workers": _names("workers", workers),
            "tasknames": _names("tasknames", tasknames),
            "states": states,
        })

    def tasks(self, *, states=None, interval=None, workers=None,
              tasknames=None):
        return self._query("tasks", interval, workers, tasknames, states)

    def __repr__(self) -> str:
        return "<stats>"


def _stats_method(fn: str):
    def method(self, *, interval=None, workers=None, tasknames=None):
        return self._query(fn, interval, workers, tasknames)
    method.__name__ = fn
    method.__qualname__ = f"Stats.{fn}"
    return method


for _fn in STATS_FUNCTIONS[1:]:
    setattr(Stats, _fn, _stats_method(_fn))


# -- namespace -------------------------------------------------------------------

def _make_print(bridge):
    def print(*values, sep=" ", end="\n", flush=False):  # noqa: A001
        if sep is None:
            sep = " "
        if end is None:
            end = "\n"
        if not isinstance(sep, str) or not isinstance(end, str):
            raise TypeError("sep and end must be strings")
        bridge.print(sep.join(str(v) for v in values) + end)
    return print


def _make_today(bridge):
    def today(*, offset_days=0, timestr=None, time=None):
        """Today's date at midnight, at ``timestr`` or at ``time``."""
        _check_type("offset_days", offset_days, (int,))
        day = bridge.now().date() + _datetime.timedelta(days=offset_days)
        hms = (0, 0, 0, 0)
        if timestr is not None:
            hms = _parse_timestr(timestr)
        elif time is not None:
            if not isinstance(time, (tuple, list)) or not 2 <= len(time) <= 4 \
                    or not all(isinstance(t, int) and not isinstance(t, bool)
                               for t in time):
                raise ValueError("time must be a tuple or list of 2 to 4"
                                 " integers (hours, minutes, seconds,"
                                 " microseconds)")
            hms = tuple(time) + (0,) * (4 - len(time))
        return _datetime.datetime.combine(day, _datetime.time(*hms))
    return today


def _parse_timestr(timestr) -> tuple[int, int, int, int]:
    expected = ('timestr must look like "HH:MM[:SS[.ffffff]]" (for example'
                f' "02:30" or "10:00:33.9"), not {timestr!r:.40}')
    if not isinstance(timestr, str):
        raise ValueError(expected)
    match = _TIMESTR_RE.match(timestr)
    if not match:
        raise ValueError(expected)
    hours, minutes, seconds, fraction = match.groups()
    micro = int((fraction or "").ljust(6, "0"))
    values = (int(hours), int(minutes), int(seconds or 0), micro)
    try:
        _datetime.time(*values)
    except ValueError:
        raise ValueError(expected) from None
    return values


def _make_send_email(bridge):
    def send_email(subject, message, from_email, recipient_list,
                   auth_user=None, auth_password=None):
        for what, value in (("subject", subject), ("message", message),
                            ("from_email", from_email)):
            _check_type(what, value, (str,))
        for what, value in (("auth_user", auth_user),
                            ("auth_password", auth_password)):
            _check_type(what, value, (str, type(None)))
        recipients = _names("recipient_list", recipient_list,
                            allow_none=False)
        if isinstance(recipient_list, str):
            raise TypeError("recipient_list must be a list of addresses,"
                            " not a string")
        return bridge.call("send_email", {
            "subject": subject, "message": message,
            "from_email": from_email, "recipient_list": recipients,
            "auth_user": auth_user, "auth_password": auth_password})
    return send_email


# Modules that library code (not policy code: it cannot write an import)
# may ask for through __import__; each is loaded in the template already.
_LIBRARY_IMPORTS = frozenset({"_strptime", "time", "datetime", "calendar",
                              "locale", "math"})


def _library_import(name, globals=None, locals=None, fromlist=(), level=0):
    """__import__ for the C code of allowed modules: loaded modules only."""
    if level == 0 and name in _LIBRARY_IMPORTS and name in sys.modules:
        return sys.modules[name]
    raise ImportError(f"import of {name!r} is not available to policies")


SAFE_BUILTINS = {name: getattr(builtins, name)
                 for name in sorted(ALLOWED_BUILTINS) if name != "print"}
SAFE_BUILTINS["__import__"] = _library_import


def build_namespace(section: str, bridge) -> dict:
    """A fresh globals dict for one section of one run."""
    safe = dict(SAFE_BUILTINS)
    safe["print"] = _make_print(bridge)
    namespace = {"__builtins__": safe, FORMAT_HOOK: format_hook}
    namespace.update(_MODULES)

    def now() -> _datetime.datetime:
        """The policy's clock: naive local time of the manager."""
        return bridge.now()

    namespace["now"] = now
    namespace["today"] = _make_today(bridge)
    for state in STATES:
        namespace[state] = state
    if section == "schedule":
        namespace["crontab"] = crontab
        namespace["every"] = every
    if section in ("condition", "apply"):
        namespace["stats"] = Stats(bridge)
        namespace["queues"] = Queues(bridge)
    if section == "apply":
        namespace["tasks"] = Tasks(bridge)
        namespace["workers"] = Workers(bridge)
        namespace["send_email"] = _make_send_email(bridge)
    return namespace
