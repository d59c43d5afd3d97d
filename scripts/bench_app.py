"""The Celery app of the control benchmark: broker from $CM_BENCH_BROKER."""

import os

from celery import Celery

from manager.config import configure_broker, default_state_dir

app = Celery("bench")
configure_broker(app, os.environ.get("CM_BENCH_BROKER"), default_state_dir())
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False)


@app.task(name="bench.noop")
def noop():
    pass
