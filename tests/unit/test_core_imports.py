"""The import boundary: the pure core (byzguard/ but byzguard.client) imports neither faust, mode nor aiokafka,
not directly and not through another byzguard module; the client (byzguard.client) imports no faust or mode;
no byzguard module imports the worker's packages, which are not in the wheel; and no product module loads the
development-only package (app/dev/) when it is imported."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER_ONLY = ("faust", "mode")  # the stream processor: never in the wheel's code
KAFKA = ("aiokafka",)  # the Kafka client: only byzguard.client (the `client` extra) may import it
CLIENT = "byzguard.client"
WORKER_PACKAGES = ("app", "agents", "tables", "topics")  # run from the checkout or the image, not in the wheel
DEV = "app.dev"  # development-only: the local broker tool, the demo, its fault generator, local mode's secrets


def module_name(path: Path, root: Path) -> str:
    """`byzguard/contract/check.py` -> `byzguard.contract.check`; a package's `__init__.py` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (never executed)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def _in_functions(tree: ast.Module) -> set[int]:
    """ids of the nodes inside function bodies (run when called, not when the module is imported)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def imports_of(path: Path, name: str, modules: set[str], *, module_level: bool = False) -> set[str]:
    """What importing the module executes an import of: every import statement (in functions too, as they run
    when called; with `module_level`, only those outside functions), relative ones resolved, `from package
    import submodule` as the submodule; TYPE_CHECKING blocks left out. Importing `a.b.c` also imports `a` and
    `a.b`."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree) | (_in_functions(tree) if module_level else set())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules)
    closed = set()
    for target in found:
        parts = target.split(".")
        closed.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return closed


@functools.cache
def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Each module of the package -> the modules (its package's and third-party) its import runs."""
    root = package_dir.parent
    paths = {module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    modules = set(paths)
    return {name: imports_of(path, name, modules) for name, path in paths.items()}


@functools.cache
def module_level_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Each module of the packages -> the modules its import (not its functions) runs an import of."""
    paths = {module_name(p, root): p for package in packages for p in sorted((root / package).rglob("*.py"))}
    modules = set(paths)
    return {name: imports_of(path, name, modules, module_level=True) for name, path in paths.items()}


def forbidden_paths(graph: dict[str, set[str]], start: str, forbidden: tuple[str, ...]) -> list[str]:
    """Import chains from `start` to a forbidden top-level module, following the package's own modules."""
    chains: list[str] = []
    seen = {start}
    queue: deque[list[str]] = deque([[start]])
    while queue:
        chain = queue.popleft()
        for target in sorted(graph.get(chain[-1], ())):
            if target.partition(".")[0] in forbidden:
                chains.append(" -> ".join([*chain, target]))
            elif target in graph and target not in seen:
                seen.add(target)
                queue.append([*chain, target])
    return chains


def test_core_imports_neither_faust_mode_nor_aiokafka() -> None:
    """No core module reaches faust, mode or aiokafka through any chain of byzguard imports."""
    graph = import_graph(ROOT / "byzguard")
    core = [m for m in graph if m != CLIENT and not m.startswith(f"{CLIENT}.")]
    assert "byzguard.guard" in core and "byzguard.contract.pytest_plugin" in core
    chains = [c for m in core for c in forbidden_paths(graph, m, WORKER_ONLY + KAFKA)]
    assert not chains, "the core must not import these:\n" + "\n".join(chains)


def test_client_imports_no_faust_or_mode() -> None:
    """The client modules (the `client` extra) import aiokafka but neither faust nor mode."""
    graph = import_graph(ROOT / "byzguard")
    client = [m for m in graph if m == CLIENT or m.startswith(f"{CLIENT}.")]
    assert f"{CLIENT}.producer" in client
    chains = [c for m in client for c in forbidden_paths(graph, m, WORKER_ONLY)]
    assert not chains, "the client must not import these:\n" + "\n".join(chains)


def test_byzguard_imports_none_of_the_worker_packages() -> None:
    """No byzguard module (client included) imports app, agents, tables or topics: the wheel holds byzguard only.
    (The `byzguard` script finds the worker's `app.cli` by name at run time, byzguard._command.)"""
    graph = import_graph(ROOT / "byzguard")
    chains = [c for m in graph for c in forbidden_paths(graph, m, WORKER_PACKAGES)]
    assert not chains, "byzguard must not import the worker's packages:\n" + "\n".join(chains)


def _is_dev(module: str) -> bool:
    return module == DEV or module.startswith(f"{DEV}.")


def dev_chains(graph: dict[str, set[str]]) -> list[str]:
    """Module-level import chains from a module outside app.dev into app.dev, following modules outside it."""
    product = {m: targets for m, targets in graph.items() if not _is_dev(m)}
    chains: list[str] = []
    for start in sorted(product):
        seen = {start}
        queue: deque[list[str]] = deque([[start]])
        while queue:
            chain = queue.popleft()
            for target in sorted(product.get(chain[-1], ())):
                if _is_dev(target):
                    chains.append(" -> ".join([*chain, target]))
                elif target in product and target not in seen:
                    seen.add(target)
                    queue.append([*chain, target])
    return chains


def test_no_product_module_imports_the_dev_package_at_import_time() -> None:
    """No module of app (but app/dev/), agents, tables or topics imports app.dev when it is imported, directly or
    through another module: the dev-only parts load only inside local mode's, the demo's and the CLI tools'
    no-broker functions."""
    graph = module_level_graph(ROOT, WORKER_PACKAGES)
    assert "app.dev.demo" in graph and "app.cli" in graph and "app.worker" in graph
    chains = dev_chains(graph)
    assert not chains, "only functions may import the dev-only package app.dev:\n" + "\n".join(chains)


def test_the_fault_generator_is_pure() -> None:
    """The demo's fault generator and scorer (app.dev.faults) imports neither faust, mode nor aiokafka (its byzguard
    imports are the core's, checked above)."""
    graph = import_graph(ROOT / "app")
    assert "app.dev.faults" in graph
    assert forbidden_paths(graph, "app.dev.faults", WORKER_ONLY + KAFKA) == []
    assert {m for m in graph["app.dev.faults"] if m.partition(".")[0] == "app"} == set()


def test_the_dev_check_sees_module_level_imports_only(tmp_path: Path) -> None:
    """A product module that imports app.dev at module level (or through another product module) is reported; one
    that imports it inside a function is not."""
    (tmp_path / "app" / "dev").mkdir(parents=True)
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "dev" / "__init__.py").write_text("")
    (tmp_path / "app" / "dev" / "tool.py").write_text("import app.settings\n")
    (tmp_path / "app" / "settings.py").write_text("def f():\n    from app.dev.tool import x\n")
    (tmp_path / "app" / "cli.py").write_text("from app import web\n")
    (tmp_path / "app" / "web.py").write_text("from .dev import tool\n")
    graph = module_level_graph(tmp_path, ("app",))
    assert dev_chains(graph) == ["app.cli -> app.web -> app.dev", "app.cli -> app.web -> app.dev.tool",
                                 "app.web -> app.dev", "app.web -> app.dev.tool"]


def test_the_check_follows_imports_transitively(tmp_path: Path) -> None:
    """A core module that reaches aiokafka two modules away (relative import, then a call-time import) is
    reported with its chain; an import under TYPE_CHECKING is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from aiokafka import AIOKafkaProducer\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import faust\n")
    graph = import_graph(pkg)
    assert forbidden_paths(graph, "pkg.a", KAFKA) == ["pkg.a -> pkg.sub.b -> aiokafka"]
    assert forbidden_paths(graph, "pkg.c", WORKER_ONLY) == []


def test_importing_every_core_module_loads_no_worker_or_kafka_module() -> None:
    """In a fresh interpreter, importing every core module (lazy names included) leaves faust, mode and
    aiokafka out of sys.modules."""
    probe = (
        "import importlib, pkgutil, sys, byzguard\n"
        "for m in pkgutil.walk_packages(byzguard.__path__, 'byzguard.'):\n"
        "    if not m.name.startswith('byzguard.client'):\n"
        "        importlib.import_module(m.name)\n"
        "import byzguard.contract as c\n"
        "[getattr(c, n) for n in c.__all__]\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('faust', 'mode', 'aiokafka')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=True)
    assert done.stdout.strip() == "[]"
