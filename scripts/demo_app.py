"""The demo's Celery app: tasks named like the example policies expect.

It uses the embedded default broker (filesystem://) under the state
directory given by $CMPOLICY_STATE_DIR, exactly as the manager does.
"""

import time

from celery import Celery

from manager.config import configure_broker, default_state_dir

app = Celery("demo")
configure_broker(app, None, default_state_dir())
app.conf.update(
    task_ignore_result=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
)


@app.task(name="media.tasks.resize")
def resize(seconds=1.0):
    time.sleep(seconds)


@app.task(name="billing.tasks.charge")
def charge():
    pass


@app.task(name="reports.tasks.nightly_export")
def nightly_export():
    pass
