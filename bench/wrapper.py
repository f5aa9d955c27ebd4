"""What the diagnostic wrappers of a byzguard worker share (`Variant.wrapper`, bench/variants.py): each one
changes the process, then runs the worker's module as `python -m MODULE ARGS...` would."""

from __future__ import annotations

import runpy
import sys


def run_as_main(module: str, args: list[str]) -> None:
    """Run `module` as __main__ with `args` as its command line."""
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
