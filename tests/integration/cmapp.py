"""The Celery app the integration tests run on real workers.

Workers and the test process build the same broker configuration from the
environment: CM_TEST_BROKER (a URL; filesystem:// by default) and
CMPOLICY_STATE_DIR (the filesystem broker's folders).
"""

import os
import time

from celery import Celery

from manager.config import configure_broker, default_state_dir

app = Celery("cmapp")
configure_broker(app, os.environ.get("CM_TEST_BROKER"), default_state_dir())
app.conf.update(
    result_backend=f"file://{default_state_dir() / 'results'}",
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
)


@app.task
def add(x, y):
    return x + y


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def fail():
    raise ValueError("fails on purpose")


@app.task(bind=True)
def retry_delay(self):
    """Report the retry delay the pool process sees for this task."""
    return self.default_retry_delay


@app.task(bind=True)
def settings_seen(self):
    return {"default_retry_delay": self.default_retry_delay,
            "rate_limit": self.rate_limit, "acks_late": self.acks_late}


@app.task
def stamp():
    """When this ran, to see how a rate limit spreads a burst."""
    return time.time()


@app.task(bind=True, max_retries=1)
def flaky(self):
    """Retried once (same task id), then succeeds."""
    if self.request.retries < 1:
        raise self.retry(countdown=0.05)
    return self.request.retries


@app.task(bind=True, max_retries=1)
def hopeless(self):
    """Retried once, then fails for good."""
    raise self.retry(exc=ValueError("hopeless"), countdown=0.05)
