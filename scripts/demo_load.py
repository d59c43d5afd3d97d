"""Send resize jobs faster than one pool process can run them."""

import sys
import time

from demo_app import resize

RATE_PER_S = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0

sent = 0
while True:
    resize.delay(1.0)
    sent += 1
    if sent % 10 == 0:
        print(f"sent {sent} resize jobs", flush=True)
    time.sleep(1.0 / RATE_PER_S)
