"""The exceptions of the manager.

ManagerError
 +-- ConfigurationError     a setting, file or option is wrong
 +-- OperationRefused       a policy's call is malformed or not permitted
 |    +-- UnknownName       a task, worker or queue that does not exist
 |    +-- PermissionDenied  outside the policy's tenant
 +-- ClusterError           Celery or the broker failed to do what was asked
 |    +-- WorkerUnreachable an addressed worker did not answer
 +-- StoreError             the database failed (locked, unreachable)

Errors that a policy caused travel back to it: the call handler turns any
OperationRefused or ClusterError into ``sandboxhost.errors.OperationError``
with the class name as its type.
"""

from __future__ import annotations


class ManagerError(Exception):
    """Root of every error raised by ``manager``."""


class ConfigurationError(ManagerError):
    """Raised when a setting, option or file of the manager is wrong."""


class OperationRefused(ManagerError):
    """Raised when a policy's call is malformed; nothing was sent."""


class UnknownName(OperationRefused):
    """Raised when a call names a task, worker or queue that is not known."""


class PermissionDenied(OperationRefused):
    """Raised when a call reaches outside the policy's tenant."""


class ClusterError(ManagerError):
    """Raised when Celery or the broker did not do what was asked."""


class WorkerUnreachable(ClusterError):
    """Raised when addressed workers did not answer in time; names them."""

    def __init__(self, message: str, *, missing: list[str],
                 applied: dict | None = None):
        self.missing = missing
        self.applied = applied or {}
        super().__init__(message)


class StoreError(ManagerError):
    """Raised when the store cannot read or write (locked, unreachable)."""
