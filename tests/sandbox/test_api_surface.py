"""What policy code can reach: the API surface, with the language checks on.

The language refuses underscore names and special attributes, so the only
doors left are the public attributes of what the namespace hands out and
strings read at run time (format fields). Both are pinned here.
"""

import types

import pytest

from sandboxhost.host import Host
from sandboxhost.language import check_and_compile
from sandboxhost.namespace import build_namespace

PUBLIC_SURFACE = {
    "tasks": {"all"},
    "workers": {"all", "names"},
    "stats": {"tasks", "tasks_failed", "tasks_succeeded", "tasks_revoked",
              "tasks_ready", "tasks_unready", "tasks_sent", "mean_waittime",
              "mean_runtime"},
    "queues": set(),
}


class FakeBridge:
    def call(self, op, args):
        return {"op": op, "args": args}

    def print(self, text):
        pass

    def now(self):
        import datetime
        return datetime.datetime(2026, 1, 1)


def public(obj):
    return {n for n in dir(type(obj)) if not n.startswith("_")}


@pytest.mark.parametrize("name, expected", PUBLIC_SURFACE.items())
def test_api_objects_expose_only_the_api(name, expected):
    namespace = build_namespace("apply", FakeBridge())
    assert public(namespace[name]) == expected


def test_selections_expose_only_the_api():
    namespace = build_namespace("apply", FakeBridge())
    worker = namespace["workers"]["w1"]
    assert public(worker) == {"prefetch", "subprocesses", "queues"}
    assert public(worker.prefetch) == {"get", "increment", "decrement"}
    assert public(worker.queues) == {"get", "add", "remove"}
    assert public(namespace["tasks"]["t"]) == set()
    assert public(namespace["queues"]["q"]) == {"length"}


def test_functions_handed_out_are_plain_functions():
    namespace = build_namespace("apply", FakeBridge())
    for name in ("now", "today", "send_email"):
        assert isinstance(namespace[name], types.FunctionType)
        assert {n for n in dir(namespace[name]) if not n.startswith("_")} \
            == set()


def test_module_views_are_read_only_and_hide_modules():
    namespace = build_namespace("apply", FakeBridge())
    for view in (namespace[m] for m in ("datetime", "time", "calendar",
                                        "math")):
        for member in dir(view):
            assert not isinstance(getattr(view, member), types.ModuleType)
        with pytest.raises(AttributeError):
            view.anything = 1
    assert "sleep" not in dir(namespace["time"])
    assert "datetime_CAPI" not in dir(namespace["datetime"])


def test_builtins_are_only_the_allowed_ones():
    namespace = build_namespace("apply", FakeBridge())
    builtins = namespace["__builtins__"]
    assert "open" not in builtins and "getattr" not in builtins
    assert "eval" not in builtins and "type" not in builtins


HEAD = "policy:\n    schedule:\n        crontab()\n    apply:\n"


@pytest.fixture(scope="module")
def host():
    with Host() as made:
        yield made


def run(host, body):
    compiled = check_and_compile(HEAD + body, "p.policy")
    return host.run(compiled.wire(), handler=lambda op, args: None)


@pytest.mark.parametrize("body, message", [
    ("        x = ('{0.' + '_' + '_class__}').format(1)\n",
     "format field {0.__class__} reads an attribute that is not allowed"
     " ('__class__')"),
    ("        x = str.format('{0.' + '_' + '_globals__}', now)\n",
     "format field {0.__globals__} reads an attribute that is not allowed"
     " ('__globals__')"),
    ("        g = (i for i in [1])\n"
     "        x = ('{0.gi' + '_frame}').format(g)\n",
     "format field {0.gi_frame} reads an attribute that is not allowed"
     " ('gi_frame')"),
    ("        x = ('{0[0].' + '_' + '_class__}').format([1])\n",
     "format field {0[0].__class__} reads an attribute that is not allowed"
     " ('__class__')"),
])
def test_format_fields_built_at_run_time_are_refused(host, body, message):
    outcome = run(host, body)
    assert not outcome.ok
    assert outcome.error.message == message
    assert outcome.error.line == 5 + body.count("\n") - 1


def test_format_with_plain_fields_works(host):
    outcome = run(host, "        print('{0} {1[a]} {2.days}'.format(1, {'a': 2},"
                        " datetime.timedelta(days=3)))\n")
    assert outcome.ok and outcome.output == ["1 2 3\n"]


def test_api_objects_print_without_internals(host):
    outcome = run(host, "        print(tasks, workers['w'], stats, queues,"
                        " tasks.all(), workers['w'].prefetch)\n")
    assert outcome.output == ["<tasks> <workers ['w']> <stats> <queues>"
                              " <tasks all> <prefetch of ['w']>\n"]


def test_api_objects_cannot_be_modified(host):
    outcome = run(host, "        workers.names = 1\n")
    assert outcome.error.message.startswith("cannot set 'names'")
    outcome = run(host, "        math.pi = 3\n")
    assert outcome.error.message == "module 'math' is read-only"


def test_library_imports_give_nothing_new(host):
    # A name that reaches __import__ through library code still gets only
    # modules the template loaded, from an allow-list.
    outcome = run(host, "        x = datetime.datetime.strptime('1', '%d')\n")
    assert outcome.ok


def test_empty_prints_count_against_the_output_budget(host):
    outcome = run(host, "        x = [print(end='') for i in range(10 ** 6)]\n")
    assert not outcome.ok
    assert "output" in str(outcome.error)
    assert len(outcome.output) <= 64 * 1024
