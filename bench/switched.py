"""`python -m bench.switched MS MODULE ARGS...`: run MODULE as __main__ with the GIL switch interval set to MS.

For the diagnostic variants `cf_switch1` and `cf_switch20` (bench/variants.py; the faust agent runtime): faust's
consumer thread asks for the GIL after each socket call, and waits up to the switch interval (5 ms by default) for
the busy main thread to let go of it (bench/results/profile.md, "The 88616c1 run"). """

from __future__ import annotations

import sys

from bench.wrapper import run_as_main


def main() -> None:
    milliseconds, module, *args = sys.argv[1:]
    sys.setswitchinterval(float(milliseconds) / 1000)
    run_as_main(module, args)


if __name__ == "__main__":
    main()
