"""Development-only parts, not the product: the local Kafka broker tool (localkafka), the demo (demo), its fault
generator and scorer (faults), local mode's made-up MAC key secrets (local_secrets) and a worker as a child
process for the demo, the integration tests and the benchmark (workers).

The product (the rest of app/, agents/, tables/, topics/, byzguard/) imports these only inside the functions of
local mode (`byzguard run` without BYZGUARD_BROKER), the `demo` command and the CLI tools' "no broker configured"
fallback; byzguard/ never imports app (tests/unit/test_core_imports.py)."""
