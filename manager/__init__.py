"""The Celery side of the policy manager: operations, store, scheduler, CLI."""
