"""A Celery app with the task names the example policies use.

Its broker is the embedded default under $CMPOLICY_STATE_DIR, which the
policy_real_cluster fixture sets for the workers it starts.
"""

from celery import Celery

from manager.config import configure_broker, default_state_dir

app = Celery("policyapp")
configure_broker(app, None, default_state_dir())
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False)


@app.task(name="media.tasks.resize")
def resize():
    pass


@app.task(name="billing.tasks.charge")
def charge():
    pass


@app.task(name="reports.tasks.nightly_export")
def nightly_export():
    pass
