"""The Python snippets of the user docs (docs/sending-events.md, docs/contracts.md, docs/last-known-good.md), taken
from the Markdown as they are, run against a worker on the real broker."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import run_async
from tests.integration.worker_harness import WorkerFactory, collect

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


#: The documents whose ```python blocks a user copies, in the order a user meets them.
SNIPPET_DOCS = ("README.md", "docs/sending-events.md", "docs/contracts.md", "docs/last-known-good.md")


def readme_snippets() -> list[str]:
    """Every ```python block of the README and the user docs, in order."""
    return [code for doc in SNIPPET_DOCS for code in SNIPPET.findall((REPO / doc).read_text())]


def namespaced_config(path: Path, prefix: str) -> dict[str, str]:
    """byzguard.yaml with every topic and route name under `prefix` and the receipts topic the README's receipts
    section tells the reader to add; returns the renaming (old name -> new name)."""
    doc: dict[str, Any] = yaml.safe_load((REPO / "byzguard.yaml").read_text())
    names: dict[str, str] = {}

    def fresh(name: str) -> str:
        return names.setdefault(name, f"{prefix}-{name}")

    for route in doc["routes"]:
        if route["name"] == "orders":
            route["receipts_topic"] = "orders.receipts"
        route["name"] = fresh(route["name"])
        route["inputs"] = [fresh(t) for t in route["inputs"]]
        for field in ("verified_topic", "quarantine_topic", "receipts_topic"):
            if route.get(field):
                route[field] = fresh(route[field])
    for audit in doc.get("audits") or ():
        for side in ("left", "right"):
            audit[side]["topic"] = fresh(audit[side]["topic"])
        audit["discrepancies_topic"] = fresh(audit.get("discrepancies_topic", "audit.discrepancies"))
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return names


def renamed(code: str, names: dict[str, str]) -> str:
    """The snippet with each quoted topic or route name of the example configuration replaced by its test name
    (not a `source=`: the permissions service is called as its topic is)."""
    return re.sub(r'(?<!source=)"([^"\n]+)"', lambda m: f'"{names.get(m.group(1), m.group(1))}"', code)


def run(args: list[str], env: dict[str, str], what: str) -> str:
    """Run a snippet's process from the repository root; its stdout, or a failure with all its output."""
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_readme_python_snippets_run_as_written(worker_factory: WorkerFactory, tmp_path: Path) -> None:
    """Each ```python block of the README and the user docs runs unchanged but for topic names, against a worker
    on the example configuration: the example price is verified (read back and its MAC checked again
    downstream), its receipt says verified, its last-known-good value is served, and the contract test passes."""
    snippets = readme_snippets()
    assert len(snippets) == 5, "a new snippet in the docs: give it its expectations here"
    sending, receipts, contract, verify_again, last_good = snippets
    assert "GuardedProducer(BROKER" in sending and "send_confirmed" in receipts
    assert "def test_" in contract and "verify_record" in verify_again and "get_last_known_good" in last_good

    prefix = worker_factory.app_id
    worker_factory.config_path = tmp_path / "byzguard.yaml"
    names = namespaced_config(worker_factory.config_path, prefix)
    secret = secrets.token_hex(16)
    worker = worker_factory.new_worker("w1")
    worker.env["BYZGUARD_KEY_PRICING_1"] = secret
    worker.start().wait_ready()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYZGUARD_")}
    env.update({"BYZGUARD_BROKER": worker_factory.bootstrap, "BYZGUARD_KEY_PRICING_1": secret,
                "BYZGUARD_URL": f"http://127.0.0.1:{worker.web_port}", "PYTHONPATH": str(REPO)})

    sent = run([sys.executable, "-c", renamed(sending, names)], env, "the sending snippet")
    event_id = re.fullmatch(r"sent (\S+)\n", sent)
    assert event_id, sent
    verified = run_async(lambda: collect(worker_factory.bootstrap, names["prices.verified"], expected=1, idle=0.5))
    assert [o.event_id for o in verified] == [event_id.group(1)], worker.log_tail()

    confirmed = run([sys.executable, "-c", renamed(receipts, names)], env, "the receipts snippet")
    assert confirmed.startswith("verified [] "), confirmed

    again = run([sys.executable, "-c", renamed(verify_again, names)], env, "the verify-again snippet")
    assert again == f"verified again: sku-1 {event_id.group(1)}\n"

    good = run([sys.executable, "-c", renamed(last_good, names)], env, "the last-known-good snippet")
    assert good == "last known good price of sku-1: 49.99 fresh\n"

    test_file = tmp_path / "test_contract_snippet.py"
    test_file.write_text(contract)  # offline, against the repository's own byzguard.yaml
    passed = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
                  str(test_file)], env, "the contract test snippet")
    assert "1 passed" in passed, passed
