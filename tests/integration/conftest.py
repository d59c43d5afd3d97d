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

from manager.workerproc import WorkerProcess

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
        self.workers = {}
        self.procs = {}
        self._apply_env()
        import importlib
        if "cmapp" in sys.modules:
            del sys.modules["cmapp"]
        sys.path.insert(0, str(HERE))
        self.module = importlib.import_module("cmapp")
        self.app = self.module.app

    def _apply_env(self):
        os.environ.update(self.env)

    def start_worker(self, name, concurrency=1, extra=(), events=True,
                     heartbeat=False):
        worker = WorkerProcess(
            "cmapp", name, log_path=self.state_dir / f"{name}.log",
            concurrency=concurrency, cwd=HERE, loglevel="INFO", events=events,
            extra=[*([] if heartbeat else ["--without-heartbeat"]), *extra],
            env={**os.environ, **self.env,
                 "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])})
        worker.start()
        self.workers[name] = worker
        self.procs[name] = worker.proc
        self.wait_for(name)
        return worker.proc

    def wait_for(self, name, timeout=30.0):
        self.workers[name].wait_ready(self.app, timeout)

    def stop_worker(self, name, sig=signal.SIGTERM):
        worker = self.workers.pop(name, None)
        self.procs.pop(name, None)
        if worker is None:
            return
        control_dir = (self.state_dir / "broker" / "control"
                       if self.kind == "filesystem" else None)
        worker.stop(sig, broker_dir=control_dir)

    def stop_all(self):
        for name in list(self.workers):
            self.stop_worker(name)

    def log(self, name):
        return (self.state_dir / f"{name}.log").read_text()


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
