"""What the guard's streams record per record besides their outputs: the verify stream's metrics (verify.py) and
the audits' discrepancy headers and metrics (audit.py). No faust agent is left: the batched runtime (app/runtime)
runs every stream and calls these (docs/development.md, "Layout")."""
