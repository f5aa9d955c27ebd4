"""The batched runtime of the guard's verify streams (app/runtime/loop.py), the only runtime."""

from app.runtime.loop import BatchedRuntime, check_routes, verify_group

__all__ = ["BatchedRuntime", "check_routes", "verify_group"]
