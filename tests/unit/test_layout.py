"""Tests mirror the modules they test: every module of byzguard/ and app/ has a unit test module a newcomer finds
by its name, or an entry below saying where its tests are; and every unit test module is named after the module
it tests, or says below what it specifies instead (docs/development.md, "Where tests live").

The name: the module's path below its top-level package, `/` as `_`. byzguard/rules/ruleset.py is tested in
tests/unit/test_rules_ruleset.py, app/dev/workers.py in tests/unit/test_dev_workers.py, a package's __init__.py
in test_<package>.py; further files on one aspect of a module add a suffix (test_envelope_fast.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "tests" / "unit"
PACKAGES = ("byzguard", "app")

#: Modules whose tests are not in tests/unit/test_<name>.py: where they are, and why.
ELSEWHERE: dict[str, tuple[tuple[str, ...], str]] = {
    "byzguard/__init__.py": (("tests/unit/test_packaging.py",), "the public surface, with the wheel"),
    "byzguard/_command.py": (("tests/unit/test_packaging.py",), "the console script, with the wheel"),
    "byzguard/client/lkg.py": (("tests/unit/test_entities.py", "tests/integration/test_entities.py"),
                               "the reader of the /entities answers, with the view that writes them"),
    "byzguard/client/producer.py": (("tests/integration/test_producer_clocks.py",
                                     "tests/integration/test_receipts.py"), "needs a broker"),
    "byzguard/contract/check.py": (("tests/unit/test_contract.py",), "the contract package's tests, in one file"),
    "byzguard/contract/diff.py": (("tests/unit/test_contract.py", "tests/integration/test_contract_cli.py"),
                                  "the contract package's tests, in one file"),
    "byzguard/contract/sample.py": (("tests/unit/test_contract.py", "tests/integration/test_contract_cli.py"),
                                    "the contract package's tests, in one file"),
    "byzguard/engine.py": (("tests/unit/test_checks.py", "tests/unit/test_processor.py"),
                           "every check, through the Guard that calls it"),
    "byzguard/errors.py": (("tests/unit/test_config.py", "tests/unit/test_clocks.py"),
                           "the exception tree: each error with the module that raises it"),
    "byzguard/guard.py": (("tests/unit/test_checks.py",), "the index of checks and codes (docs/development.md)"),
    "byzguard/partitioner.py": (("tests/unit/test_partitioning.py", "tests/integration/test_partitioning.py"),
                                "placement: the partitioner with the guard's refusal of misplaced records"),
    "byzguard/routing.py": (("tests/unit/test_output_bounds.py", "tests/unit/test_checks.py"),
                            "the headers byzguard writes, with the bounds of what it writes"),
    "byzguard/rules/environment.py": (("tests/unit/test_rules_ruleset.py",), "through the RuleSet API"),
    "byzguard/rules/wording.py": (("tests/unit/test_rules_ruleset.py", "tests/unit/test_honest_reasons.py"),
                                  "the wording of rule errors, through the RuleSet API"),
    "byzguard/stamp.py": (("tests/unit/test_envelope.py", "tests/unit/test_integrity_forms.py"),
                          "the producer's side of the envelope, with the guard's side"),
    "byzguard/verdict.py": (("tests/unit/test_codes_index.py", "tests/unit/test_checks.py"),
                            "the codes: each with a test that trips it"),
    "byzguard/verify_again.py": (("tests/unit/test_contract.py", "tests/unit/test_cloudevents_sdk.py",
                                  "tests/unit/test_integrity_forms.py"), "end to end checks of the envelope"),
    "app/audit_cli.py": (("tests/integration/test_audit.py",), "needs a broker"),
    "app/cli_contract.py": (("tests/integration/test_contract_cli.py",), "needs a broker"),
    "app/cli_quarantine.py": (("tests/integration/test_review.py", "tests/unit/test_review_render.py"),
                              "needs a broker; its rendering is a unit test of byzguard/review.py's output"),
    "app/dev/local_secrets.py": (("tests/unit/test_cli.py",), "local mode of the command line"),
    "app/faust_producer.py": (("tests/integration/test_metadata_refresh.py",), "needs a broker"),
    "app/provision.py": (("tests/integration/test_worker.py", "tests/integration/test_runtime_batched.py"),
                         "needs a broker"),
    "app/review/store.py": (("tests/integration/test_review.py", "tests/unit/test_review_render.py"),
                            "needs a broker"),
    "app/review/web.py": (("tests/integration/test_review.py", "tests/e2e/test_review_page.py"),
                          "a worker's web server"),
    "app/runtime/limits.py": (("tests/integration/test_poison.py", "tests/integration/test_runtime_batched.py"),
                              "needs a broker"),
    "app/sidereads.py": (("tests/integration/test_sidereads.py",), "needs a broker"),
}

#: Unit test modules that specify a behaviour across modules rather than one module: what each specifies.
ACROSS = {
    "test_ambiguous_json.py": "JSON with a repeated key is refused (decode.ambiguous) in every mode",
    "test_bench_core.py": "the benchmark's bench/core.py",
    "test_bench_scenarios.py": "the state records the benchmark's memory phase restores (bench/scenarios.py)",
    "test_bench_variants.py": "the benchmark's variants (bench/variants.py)",
    "test_causal_delivery.py": "causal delivery in the guard (hold, release, causal.gap)",
    "test_checks.py": "every check: the event that trips it and the one that must not",
    "test_clean_path.py": "the verdict's clean path (engine, guard) decides as every check does",
    "test_cloudevents_sdk.py": "a producer byzguard did not write (the CloudEvents SDK) is verified",
    "test_codes_index.py": "every code can be found from its name",
    "test_js_checksum_forms.py": "checksums made by real JavaScript (node) get the codes ENVELOPE.md gives them",
    "test_core_imports.py": "the import boundary of the core, the client and app/dev",
    "test_docs_links.py": "README and docs link only to what exists",
    "test_honest_reasons.py": "reasons say what is wrong in the event's own terms",
    "test_hot_path.py": "the hot path's shortcuts (memos, identity hashes, skipped checks) change no outcome",
    "test_layout.py": "tests mirror the modules they test",
    "test_output_bounds.py": "what byzguard writes is bounded whatever the input",
    "test_packaging.py": "the wheel, the declared dependencies and the constraints",
    "test_partitioning.py": "placement: the partitioner and the guard's refusal of misplaced records",
    "test_test_environment.py": "the developer's environment cannot change a result",
    "test_type_allow_list.py": "a route's event types are an allow-list",
}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def name_of(module: Path) -> str:
    """tests/unit/test_<name>.py of a module: its path below the top-level package, `/` as `_`."""
    parts = list(module.relative_to(REPO).with_suffix("").parts[1:])
    if parts and parts[-1] == "__init__":
        parts.pop()
    return "_".join(parts)


def _defines_something(module: Path) -> bool:
    """A module with a function or a class; a package's __init__ that only re-exports needs no tests."""
    tree = ast.parse(module.read_text())
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) for n in tree.body)


def _named_tests(name: str) -> list[Path]:
    return [p for p in UNIT.glob("test_*.py") if name and (p.stem == f"test_{name}" or
                                                          p.stem.startswith(f"test_{name}_"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("module", [m for m in _modules() if _defines_something(m)], ids=_rel)
def test_every_module_has_tests_a_newcomer_finds_by_name(module: Path) -> None:
    """A module has tests/unit/test_<name>.py (or test_<name>_<aspect>.py), or an entry in ELSEWHERE."""
    named = _named_tests(name_of(module))
    elsewhere = ELSEWHERE.get(_rel(module))
    assert named or elsewhere, (f"{_rel(module)}: no tests/unit/test_{name_of(module)}.py; add it, or say in "
                                "tests/unit/test_layout.py ELSEWHERE where its tests are")


def test_every_entry_of_elsewhere_is_needed_and_points_at_tests_that_exist() -> None:
    """ELSEWHERE names existing modules without a test module of their name, and existing test files."""
    modules = {_rel(m) for m in _modules()}
    stale = [m for m in ELSEWHERE if m not in modules]
    named = [m for m in ELSEWHERE if m in modules and _named_tests(name_of(REPO / m))]
    missing = [t for paths, _ in ELSEWHERE.values() for t in paths if not (REPO / t).is_file()]
    assert not stale and not named and not missing, {"no such module": stale, "has a test of its name": named,
                                                     "no such test file": missing}


def test_every_unit_test_module_is_named_after_its_module_or_says_what_it_specifies() -> None:
    """A file of tests/unit is test_<name of a module>[_<aspect>].py, or listed in ACROSS."""
    names = {name_of(m) for m in _modules()} - {""}
    unnamed = [p.name for p in sorted(UNIT.glob("test_*.py"))
               if p.name not in ACROSS and not any(p.stem == f"test_{n}" or p.stem.startswith(f"test_{n}_")
                                                   for n in names)]
    needless = [name for name in ACROSS if not (UNIT / name).is_file()]
    assert not unnamed and not needless, {"named after no module": unnamed, "listed but missing": needless}


def test_no_two_modules_share_a_test_name() -> None:
    """byzguard/ and app/ have no two modules whose tests would be looked for in the same file."""
    seen: dict[str, str] = {}
    clashes = []
    for module in _modules():
        name = name_of(module)
        if name and name in seen and _defines_something(module):
            clashes.append((seen[name], _rel(module)))
        if _defines_something(module):
            seen.setdefault(name, _rel(module))
    assert not clashes
