"""Small helpers the integration tests share."""

import time


def eventually(check, timeout=15.0, interval=0.1):
    """Poll ``check`` until it returns a true value; return that value
    (or the last false one when ``timeout`` seconds have passed)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
