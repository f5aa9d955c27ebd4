"""The batched runtime of the guard's verify streams (app/runtime/loop.py), the only runtime."""

from app.runtime.loop import BatchedRuntime, verify_group

__all__ = ["BatchedRuntime", "verify_group"]
