"""Run untrusted policy code in short-lived, resource-limited children.

This package knows nothing of Celery. ``language`` checks and compiles a
policy; ``host`` (the parent side) runs compiled sections in children forked
from a lean template process; ``runtime`` is the child side; ``protocol`` is
the msgpack framing between the two.
"""
