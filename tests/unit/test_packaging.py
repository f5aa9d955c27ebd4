"""Packaging: every package the code imports is declared with both bounds, in the part that installs it, and
constraints.txt pins that set for the Makefile, the Dockerfile and CI alike."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
LOCAL = {"byzguard", "app", "agents", "tables", "topics", "tests", "bench"}
# Imported by a module that only its host loads: pytest loads the contract plugin (entry point pytest11).
HOSTED = {("byzguard/contract/pytest_plugin.py", "pytest")}


def requirements(extra: str | None) -> dict[str, Requirement]:
    """The requirements of the wheel (extra None) or of one extra, by canonical name (self-references left out)."""
    lines = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs if canonicalize_name(r.name) != "byzguard"}


def bounded(req: Requirement) -> bool:
    """True when the requirement has a lower and an upper bound (or pins one version)."""
    ops = {spec.operator for spec in req.specifier}
    return bool(ops & {"==", "===", "~="}) or (bool(ops & {">=", ">"}) and bool(ops & {"<", "<="}))


def third_party_imports(files: Iterable[Path], root: Path = ROOT) -> dict[str, set[str]]:
    """Top-level modules imported (anywhere in the module) that are neither stdlib nor this repo's, with the files."""
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                rel = path.relative_to(root).as_posix()
                if top in sys.stdlib_module_names or top in LOCAL or top == "__future__" or (rel, top) in HOSTED:
                    continue
                found.setdefault(top, set()).add(rel)
    return found


def product_files(part: str) -> list[Path]:
    """The product's modules of one installable part: core, client or worker."""
    byzguard = sorted((ROOT / "byzguard").rglob("*.py"))
    client = ROOT / "byzguard" / "client"
    if part == "core":
        return [p for p in byzguard if client not in p.parents]
    if part == "client":
        return [p for p in byzguard if client in p.parents]
    return [p for d in ("app", "agents", "tables", "topics") for p in sorted((ROOT / d).rglob("*.py"))]


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


# What each part may import: the wheel's own requirements plus the extras installed with that part.
PARTS = {"core": (None,), "client": (None, "client"), "worker": (None, "worker")}


@pytest.mark.parametrize("part", sorted(PARTS))
def test_every_import_is_declared_with_bounds(part: str) -> None:
    """Each third-party module the part imports comes from a requirement of the wheel or of the part's extra,
    and that requirement has a lower and an upper bound (nothing arrives only through another package)."""
    declared: dict[str, Requirement] = {}
    for extra in PARTS[part]:
        declared.update(requirements(extra))
    distributions = _distributions()
    problems = []
    for module, files in sorted(third_party_imports(product_files(part)).items()):
        names = {canonicalize_name(d) for d in distributions.get(module, [])}
        if not names:
            problems.append(f"{module}: no installed distribution provides it ({sorted(files)[0]})")
            continue
        reqs = [declared[n] for n in sorted(names) if n in declared]
        if not reqs:
            problems.append(f"{module} (distribution {sorted(names)}) is imported by {sorted(files)[0]} but not "
                            f"declared in {' + '.join(e or 'dependencies' for e in PARTS[part])}")
        elif not any(bounded(r) for r in reqs):
            problems.append(f"{module}: {reqs[0]} has no upper or no lower bound")
    assert not problems, "\n".join(problems)


def test_the_scan_sees_an_undeclared_import(tmp_path: Path) -> None:
    """The import scan reports a module imported inside a function, and leaves out stdlib and the repo's own."""
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom byzguard import guard\n\ndef f():\n    import yarl.quoting\n")
    assert third_party_imports([module], tmp_path) == {"yarl": {"m.py"}}


@pytest.mark.parametrize("extra", [None, *sorted(PROJECT["optional-dependencies"])])
def test_every_requirement_has_both_bounds(extra: str | None) -> None:
    """Every requirement of the wheel and of each extra is bounded above and below."""
    loose = [str(r) for r in requirements(extra).values() if not bounded(r)]
    assert not loose, f"{extra or 'dependencies'}: {loose}"


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: pinned version}."""
    pinned: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} does not pin one version"
            pinned[canonicalize_name(name)] = version
    return pinned


def test_constraints_pin_every_declared_requirement_within_its_bounds() -> None:
    """constraints.txt pins each requirement (wheel, client, worker, test) to a version its bounds accept, and
    does not pin byzguard itself."""
    pinned = pins()
    assert "byzguard" not in pinned
    problems = []
    for extra in (None, "client", "worker", "test"):
        for name, req in requirements(extra).items():
            if req.marker is not None and not req.marker.evaluate():
                continue
            if name not in pinned:
                problems.append(f"{req} is not pinned")
            elif not req.specifier.contains(pinned[name], prereleases=True):
                problems.append(f"{req}: pinned {pinned[name]} is outside its bounds")
    assert not problems, "\n".join(problems)


def test_constraints_match_the_tested_environment() -> None:
    """The environment the suite runs in has the pinned version of every requirement it installed."""
    pinned = pins()
    off = []
    for extra in (None, "client", "worker", "test"):
        for name in requirements(extra):
            try:
                installed = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            if name in pinned and installed != pinned[name]:
                off.append(f"{name}: installed {installed}, pinned {pinned[name]}")
    assert not off, "\n".join(off) + "\n(run `make constraints` after changing dependencies)"


def test_makefile_and_dockerfile_install_with_the_constraints() -> None:
    """Every pip install of the Makefile and the Dockerfile uses constraints.txt, and the image installs the
    worker extra."""
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS := -c constraints.txt" in makefile
    for line in makefile.splitlines():
        if "pip install" in line and "--upgrade pip" not in line:
            assert "$(CONSTRAINTS)" in line, line
    assert "-e '.[worker,test]'" in makefile
    docker = (ROOT / "Dockerfile").read_text()
    installs = [line for line in docker.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    assert any("'.[worker]'" in line for line in installs)
    assert "COPY pyproject.toml README.md constraints.txt ./" in docker


def test_the_wheel_holds_byzguard_only() -> None:
    """The wheel's packages are `byzguard` and its subpackages, with py.typed; the pytest plugin is registered."""
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["byzguard*"]
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["byzguard"] == ["py.typed"]
    assert (ROOT / "byzguard" / "py.typed").is_file()
    assert PROJECT["entry-points"]["pytest11"] == {"byzguard_contract": "byzguard.contract.pytest_plugin"}
    assert PROJECT["scripts"]["byzguard"].startswith("byzguard.")


def test_public_surface_resolves_without_a_kafka_client() -> None:
    """Every name in byzguard.__all__ resolves without pytest (a service's production code), and `import byzguard`
    with the non-Kafka names loads no Kafka client (a fresh interpreter, so this suite's imports do not count)."""
    probe = (
        "import sys\n"
        "sys.modules['pytest'] = None  # production code: no pytest\n"
        "import byzguard\n"
        "lazy = {'GuardedProducer', 'Receipt', 'ReceiptTimeout', 'ReceiptsTopicMissing'}\n"
        "[getattr(byzguard, n) for n in byzguard.__all__ if n not in lazy]\n"
        "print(sorted(m for m in ('aiokafka', 'faust', 'mode', 'aiohttp') if m in sys.modules))\n"
        "[getattr(byzguard, n) for n in byzguard.__all__]\n"
        "print(sorted(set(byzguard.__all__) - set(dir(byzguard))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60,
                         cwd=ROOT).stdout.splitlines()
    assert out == ["[]", "[]"]
    import byzguard

    assert len(byzguard.__all__) == len(set(byzguard.__all__)) <= 30  # one screen
    with pytest.raises(AttributeError):
        byzguard.no_such_name  # noqa: B018


def test_script_refuses_an_app_package_that_is_not_the_worker(tmp_path: Path) -> None:
    """`byzguard` with no worker installed, or with someone else's `app` package, exits 2 and says where the
    worker runs; it never runs the foreign package."""
    foreign = tmp_path / "app"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("")
    (foreign / "cli.py").write_text("def main():\n    print('FOREIGN')\n")
    run = [sys.executable, "-c", "from byzguard._command import main; main()", "--help"]
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60, check=False)
    assert done.returncode == 2 and "FOREIGN" not in done.stdout
    assert "the worker's command line is not installed" in done.stderr
    (foreign / "__init__.py").write_text("BYZGUARD_WORKER = True\n")  # now it says it is the worker: it runs
    ours = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60, check=False)
    assert ours.returncode == 0 and ours.stdout == "FOREIGN\n", ours.stderr


def test_the_image_leaves_the_development_tools_out() -> None:
    """The image copies app/ without app/dev/ (development only: local broker tool, demo) by .dockerignore."""
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert "app/dev/" in ignored or "app/dev" in ignored
    assert "COPY app ./app" in (ROOT / "Dockerfile").read_text()
