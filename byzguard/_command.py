"""The `byzguard` script: the worker's command line (`app.cli`), which runs from a checkout or the image.

The wheel ships the `byzguard` package only, so a producer service that installed `byzguard[client]` has the
script but not the worker: it then says where the worker lives instead of failing on an import, and never
runs an unrelated package that happens to be called `app`.
"""

from __future__ import annotations

import importlib
import sys

_NOT_HERE = (
    "byzguard: the worker's command line is not installed in this environment. The byzguard wheel is the client\n"
    "(Stamper, GuardedProducer, verify_again, the contract plugin); the worker runs from a checkout of its\n"
    "repository (`make run`, or `python -m app.cli` from the checkout's root after `pip install -e '.[worker]'`)\n"
    "or from its container image.\n"
)


def main() -> None:
    """Run the worker's command line when the worker's `app` package is importable; otherwise exit 2."""
    try:
        app = importlib.import_module("app")
    except ModuleNotFoundError as exc:
        if exc.name != "app":
            raise
        app = None
    if app is None or getattr(app, "BYZGUARD_WORKER", False) is not True:
        sys.stderr.write(_NOT_HERE)
        raise SystemExit(2)
    importlib.import_module("app.cli").main()
