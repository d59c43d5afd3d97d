"""Real brokers and real prefork workers for integration tests.

Redis is Debian's redis-server, started here on a free loopback port; the
filesystem broker lives in a temporary folder. Workers are started with
``celery worker -P prefork --include manager.worker_ext`` and stopped at
the end of the module that asked for them.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BROKERS = ("filesystem", "redis")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed; scripts/test installs it")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


class Cluster:
    """Real workers on one broker, and a client app configured alike."""

    def __init__(self, kind, env, state_dir):
        self.kind = kind
        self.env = env
        self.state_dir = state_dir
        self.procs = {}
        self.logs = {}
        self._apply_env()
        import importlib
        if "cmapp" in sys.modules:
            del sys.modules["cmapp"]
        sys.path.insert(0, str(HERE))
        self.module = importlib.import_module("cmapp")
        self.app = self.module.app

    def _apply_env(self):
        os.environ.update(self.env)

    def start_worker(self, name, concurrency=1, extra=()):
        log = self.state_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "celery", "-A", "cmapp", "worker",
               "-n", name, "-c", str(concurrency), "-P", "prefork",
               "--include", "manager.worker_ext", "--without-mingle",
               "--without-gossip", "--without-heartbeat", "-E",
               "--loglevel", "INFO", *extra]
        env = {**os.environ, **self.env,
               "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
        handle = open(log, "w")
        proc = subprocess.Popen(cmd, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, cwd=HERE,
                                start_new_session=True)
        self.procs[name] = proc
        self.logs[name] = log
        self.wait_for(name)
        return proc

    def wait_for(self, name, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"worker {name} exited:\n"
                                   + self.logs[name].read_text()[-3000:])
            replies = self.app.control.ping(destination=[name], timeout=0.5)
            if replies:
                return
        raise RuntimeError(f"worker {name} did not answer:\n"
                           + self.logs[name].read_text()[-3000:])

    def stop_worker(self, name, sig=signal.SIGTERM):
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            proc.send_signal(sig)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        if self.kind == "filesystem":
            prune_dead_bindings(self.state_dir, name)

    def stop_all(self):
        for name in list(self.procs):
            self.stop_worker(name)

    def log(self, name):
        return self.logs[name].read_text()


def prune_dead_bindings(state_dir, worker):
    """The filesystem transport never removes a stopped worker's binding."""
    import fcntl
    import json
    control = Path(state_dir) / "broker" / "control"
    for path in control.glob("*.pidbox.exchange"):
        with open(path, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                bindings = json.loads(handle.read() or "[]")
            except ValueError:
                continue
            kept = [b for b in bindings
                    if not str(b[-1]).startswith(f"{worker}.")]
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(kept))


@pytest.fixture(scope="module", params=BROKERS)
def cluster(request, tmp_path_factory):
    kind = request.param
    state_dir = tmp_path_factory.mktemp(f"state-{kind}")
    env = {"CMPOLICY_STATE_DIR": str(state_dir)}
    if kind == "redis":
        env["CM_TEST_BROKER"] = request.getfixturevalue("redis_url").replace(
            "/0", f"/{abs(hash(request.module.__name__)) % 15 + 1}")
    else:
        env["CM_TEST_BROKER"] = "filesystem://"
    (state_dir / "results").mkdir()
    saved = {k: os.environ.get(k) for k in env}
    made = Cluster(kind, env, state_dir)
    yield made
    made.stop_all()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
