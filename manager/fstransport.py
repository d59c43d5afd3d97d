"""kombu's filesystem transport, without its read-while-written race.

The stock transport creates a message file, then locks and writes it; a
reader that lists the folder in between moves the empty file away and
fails to decode it (``Expecting value: line 1 column 1``), which loses a
control reply now and then. Here writers write to a temporary name and
rename it into place (a rename is atomic), and readers skip files that are
empty or still locked by a stock writer, so both kinds of process can share
one folder. The exchange table gets the same care.

Selected by ``broker_transport = "manager.fstransport:Transport"`` with a
``filesystem://`` URL; ``manager.config.configure_broker`` sets both.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from queue import Empty

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)

_TABLE_RETRIES = 20
_TABLE_RETRY_S = 0.005


def _unlocked(path: str) -> bool:
    """True when no writer holds the file's lock."""
    try:
        with open(path, "rb") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return True
    except OSError:
        return False


class Channel(filesystem.Channel):
    """A filesystem channel whose messages appear whole or not at all."""

    def _put(self, queue, payload, **kwargs):
        stamp = int(round(time.monotonic() * 1000))
        name = f"{stamp}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.part")
        try:
            with open(partial, "wb") as handle:
                handle.write(dumps(payload).encode())
            os.rename(partial, final)
        except OSError as exc:
            raise ChannelError(
                f"cannot add a message to {self.data_folder_out}") from exc

    def _get(self, queue):
        wanted = f"{queue}.msg"
        folder = self.data_folder_in
        for name in sorted(os.listdir(folder)):
            if name.startswith(".") or name.partition(".")[2] != wanted:
                continue
            path = os.path.join(folder, name)
            try:
                if os.path.getsize(path) == 0 or not _unlocked(path):
                    continue  # a stock writer has not finished it
            except OSError:
                continue
            claimed = os.path.join(folder, f".{name}.{uuid.uuid4()}.claim")
            try:
                os.rename(path, claimed)  # only one reader wins the rename
            except OSError:
                continue
            try:
                with open(claimed, "rb") as handle:
                    payload = handle.read()
                if self.store_processed:
                    os.rename(claimed, os.path.join(self.processed_folder,
                                                    name))
                else:
                    os.remove(claimed)
            except OSError as exc:
                raise ChannelError(
                    f"cannot read message {name} from {folder}") from exc
            return loads(payload)
        raise Empty()

    def get_table(self, exchange):
        # A stock binder creates the table file empty, then writes it.
        last_error = None
        for _ in range(_TABLE_RETRIES):
            try:
                return super().get_table(exchange)
            except ValueError as exc:
                last_error = exc
                time.sleep(_TABLE_RETRY_S)
        raise ChannelError(
            f"the binding table of {exchange} cannot be read") from last_error


class Transport(filesystem.Transport):
    Channel = Channel
    # The folders are the address; a host name means nothing here, and
    # kombu warns on every connection when a default one stands in.
    default_connection_params = {}


def prune_bindings(control_dir: str | os.PathLike, worker: str) -> int:
    """Remove a stopped worker's bindings from the pidbox exchanges.

    The transport never removes them itself, so broadcasts would go on
    writing messages for a worker that is gone. Returns how many were
    removed.
    """
    removed = 0
    if not os.path.isdir(control_dir):
        return removed
    for name in sorted(os.listdir(control_dir)):
        if not name.endswith(".pidbox.exchange"):
            continue
        with open(os.path.join(control_dir, name), "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                bindings = loads(handle.read() or "[]")
            except ValueError:
                logger.warning("%s: not a list of bindings; left alone", name)
                continue
            kept = [b for b in bindings
                    if not str(b[-1]).startswith(f"{worker}.")]
            if len(kept) == len(bindings):
                continue
            removed += len(bindings) - len(kept)
            handle.seek(0)
            handle.truncate()
            handle.write(dumps(kept))
    return removed
