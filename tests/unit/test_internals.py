"""The private names of faust, mode and aiokafka byzguard uses are all registered (app/internals.py), each is as
registered on the installed versions, and the worker refuses to start on versions it was not tested on."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app import internals
from app.internals import (
    PRIVATE_NAMES,
    PrivateName,
    UntestedVersionsError,
    check_versions,
    member_names,
    problems,
)

REPO = Path(__file__).parents[2]
#: Where the worker's and the client's code lives (bench/ is scanned on its own below). The pure core imports none
#: of the three libraries, but the client package under byzguard/ may use aiokafka.
PRODUCT_DIRS = ("app", "agents", "tables", "topics", "byzguard")
#: The repository's own packages: a private name reached through one of their imports is byzguard's own.
REPO_PACKAGES = frozenset({"app", "agents", "tables", "topics", "byzguard", "bench", "tests"})
LIBRARIES = frozenset({"faust", "mode", "aiokafka"})
#: Bases that are not a library's classes (a private method defined on a subclass of these is byzguard's own).
PLAIN_BASES = frozenset({"object", "Exception", "RuntimeError", "ValueError", "Protocol", "NamedTuple", "Generic",
                         "Enum", "IntEnum", "StrEnum", "TypedDict", "BaseSettings", "BaseModel", "logging.Filter",
                         "logging.Handler", "Filter", "Handler", "ast.NodeVisitor"})
#: Private names of other libraries (not faust, mode or aiokafka) that the scan finds, and why they are not listed.
OTHER_LIBRARIES = {
    "_Environ": "the standard library's os._Environ, the type of os.environ (app/dev/demo.py)",
    "_regexp": "google-re2's compiled pattern inside its wrapper: the rules' regex search skips the wrapper's span "
               "decoding, and falls back to the public API when the layout differs",
    "_re2": "google-re2's extension module, for the anchor constant of that same fast path",
    "_hmac": "the standard library's hmac.HMAC keeps the OpenSSL HMAC object it wraps there (Python 3.12+)",
}


def _bound(target: ast.expr) -> list[str]:
    """Names an assignment target binds: names, and attributes of self / cls (not `x[k] = ...`)."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id in ("self", "cls"):
        return [target.attr]
    if isinstance(target, ast.Tuple | ast.List):
        return [name for element in target.elts for name in _bound(element)]
    if isinstance(target, ast.Starred):
        return _bound(target.value)
    return []


def _defined_names(tree: ast.AST) -> set[str]:
    """Names a module (or class) defines itself: functions, classes, assigned names and attributes of self / cls."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(_bound(target))
    return names


def _repo_imports(tree: ast.Module) -> set[str]:
    """Local names bound by imports of the repository's own modules."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in REPO_PACKAGES:
                bound.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            bound.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in REPO_PACKAGES:
                    bound.add(alias.asname or alias.name.split(".")[0])
    return bound


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def foreign_names(source: str, module: str | None = None, shared: frozenset[str] = frozenset()) -> set[str]:
    """The names of libraries a module's source relies on that app/internals.py must list.

    Found: `x._name` where `_name` is not defined in the module nor in `shared` (private functions and methods
    other modules of the repository define) and `x` is not one of the repository's modules or classes;
    `getattr` / `setattr` / `hasattr` of a private name (a string, or a module constant holding one); a
    private name imported from faust, mode or aiokafka; and in a subclass of a class that is not the repository's,
    every member it overrides, adds or reaches through `self` / `super()` (see _library_members). With `module`
    (its import name), a class defined at its top level is imported: one that derives from no class of faust, mode
    or aiokafka is left out, and a method the library classes it derives from do not have is byzguard's own
    addition and is left out too (on a library version that adds the name, it is an override and found).
    """
    tree = ast.parse(source)
    top_level = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    own, repo_names = _defined_names(tree), _repo_imports(tree)
    own_classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for target in node.targets if isinstance(target, ast.Name)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            receiver = node.value
            if isinstance(receiver, ast.Name) and receiver.id in repo_names:
                continue  # a private name of one of byzguard's modules or classes
            if node.attr not in own and node.attr not in shared:
                found.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            bases = {ast.unparse(base) for base in node.bases}
            if bases and not all(base in own_classes or base in repo_names or base in PLAIN_BASES
                                 or base.split("[")[0] in PLAIN_BASES for base in bases):
                members = _library_members(node)
                if module is not None and node.name in top_level:
                    cls = getattr(importlib.import_module(module), node.name)
                    if not any(klass.__module__.split(".")[0] in LIBRARIES for klass in cls.__mro__[1:]):
                        continue  # a subclass of another library's class (PyYAML's loader, ...)
                    members -= _own_additions(cls, node)
                found.update(members)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2):
            arg = node.args[1]
            name = arg.value if isinstance(arg, ast.Constant) else constants.get(arg.id) if isinstance(
                arg, ast.Name) else None
            if isinstance(name, str) and _is_private(name) and name not in own:
                found.add(name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            found.update(alias.name for alias in node.names if _is_private(alias.name))
            if any(_is_private(part) for part in node.module.split(".")):
                found.update(alias.name for alias in node.names)
    return found


def _library_members(cls: ast.ClassDef) -> set[str]:
    """What a subclass of a library class relies on: the methods it defines (overrides, or names it adds, which
    the library must not define; `__init__` included, other dunders not) and the members it reaches through
    `self` (not defined in the class itself) or `super()`."""
    own = _defined_names(cls)
    found = {stmt.name for stmt in cls.body if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef)
             and (stmt.name == "__init__" or not stmt.name.startswith("__"))}
    for node in ast.walk(cls):
        if not isinstance(node, ast.Attribute) or (node.attr.startswith("__") and node.attr != "__init__"):
            continue
        receiver = node.value
        via_super = (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name)
                     and receiver.func.id == "super")
        via_self = isinstance(receiver, ast.Name) and receiver.id == "self" and node.attr not in own
        if via_super or via_self:
            found.add(node.attr)
    return found


def _own_additions(cls: type, node: ast.ClassDef) -> set[str]:
    """The methods `cls` defines that none of its library base classes has (byzguard's own, not overrides)."""
    library = [klass for klass in cls.__mro__[1:] if klass.__module__.split(".")[0] in LIBRARIES]
    known = set().union(*(member_names(klass) for klass in library))
    return {stmt.name for stmt in node.body if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef)
            and stmt.name not in known}


def _repository_functions() -> frozenset[str]:
    """Private function and method names the repository defines, less the names it overrides in library classes
    (those are the libraries' names too: a call of one elsewhere must be listed)."""
    names = {node.name for folder in (*PRODUCT_DIRS, "bench") for path in (REPO / folder).rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _is_private(node.name)}
    return frozenset(names - {entry.name for entry in PRIVATE_NAMES})


# The scripts kept with a measurement under bench/results/ ran once against the commit their folder names; they are a
# record, not code that runs against the installed libraries (and they read byzguard's own privates, e.g. the
# generated rules, which the scan cannot tell from a library's).
ARCHIVED = "bench/results/"


def _scan(dirs: tuple[str, ...]) -> set[tuple[str, str]]:
    """(path, name) of every foreign private name the modules under `dirs` use, other libraries' left out."""
    found = set()
    shared = _repository_functions()
    for folder in dirs:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith(ARCHIVED):
                continue
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found.update((rel, name) for name in foreign_names(path.read_text(), module, shared))
    return {(path, name) for path, name in found if name not in OTHER_LIBRARIES}


def _registered(prefixes: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(path, entry.name) for entry in PRIVATE_NAMES for path in entry.used_in
            if path.split("/")[0] in prefixes}


@pytest.mark.parametrize("entry", PRIVATE_NAMES, ids=lambda e: f"{e.owner.rsplit('.', 1)[-1]}.{e.name}")
def test_registered_name_is_as_byzguard_expects(entry: PrivateName) -> None:
    """Each registered private name exists on the installed libraries with its kind, parameters and source."""
    assert problems(entry) == []


@pytest.mark.parametrize(("change", "expected"), [
    ({"name": "_no_such_method_anywhere", "kind": "method"}, "missing"),
    ({"signature": "(self)"}, "signature"),
    ({"digest": "0" * 16}, "source changed"),
    ({"kind": "method"}, "now async"),
    ({"kind": "added"}, "now defines"),
    ({"kind": "attribute", "name": "_no_such_attribute"}, "no longer assigned"),
    ({"owner": "faust.transport.consumer.NoSuchClass"}, "owner not found"),
])
def test_a_changed_name_is_reported(change: dict[str, str], expected: str) -> None:
    """A name that moved, lost a parameter, changed its source or kind, or clashes with one byzguard adds is
    reported (checked by altering the registered `Service.crash`)."""
    crash = next(e for e in PRIVATE_NAMES if e.name == "crash")
    assert problems(crash) == []
    changed = dataclasses.replace(crash, **change)  # type: ignore[arg-type]
    assert any(expected in line for line in problems(changed)), problems(changed)


def test_an_instance_attribute_is_found_in_the_source() -> None:
    """Attributes set in `__init__` (Consumer._acked) and declared on a base class (ThreadDelegateConsumer._thread,
    seen from the aiokafka driver's Consumer) count as present."""
    for owner, name in [("faust.transport.consumer.Consumer", "_acked"),
                        ("faust.transport.drivers.aiokafka.Consumer", "_thread")]:
        assert problems(PrivateName(owner, name, "attribute", (), "")) == []


def test_every_private_name_the_worker_uses_is_registered() -> None:
    """app/, agents/, tables/, topics/ and byzguard/ rely on no private name (or member of a subclassed library
    class) that app/internals.py leaves out, and every registered use is still there."""
    found, registered = _scan(PRODUCT_DIRS), _registered(PRODUCT_DIRS)
    unregistered, stale = sorted(found - registered), sorted(registered - found)
    assert not unregistered, f"used but not in app/internals.py PRIVATE_NAMES (path, name): {unregistered}"
    assert not stale, f"in app/internals.py PRIVATE_NAMES but no longer used there (path, name): {stale}"


def test_every_private_name_the_bench_uses_is_registered() -> None:
    """bench/ likewise: its private names of faust and aiokafka are registered, and none registered is unused."""
    found, registered = _scan(("bench",)), _registered(("bench",))
    unregistered, stale = sorted(found - registered), sorted(registered - found)
    assert not unregistered, f"used but not in app/internals.py PRIVATE_NAMES (path, name): {unregistered}"
    assert not stale, f"in app/internals.py PRIVATE_NAMES but no longer used there (path, name): {stale}"


def test_scan_tells_library_names_from_byzguards_own() -> None:
    """The scan finds a library's private attribute, getattr name and import, and what a subclass of a library class
    overrides, adds or reaches through self / super(); it leaves out the module's own private names, those of
    byzguard's modules and what the subclass defines itself."""
    source = '''
from faust.transport.consumer import _private_helper
from byzguard import engine
from byzguard.clocks import VectorClock
_ATTR = "_set_by_constant"

class Mine:
    def __init__(self):
        self._own = 1
    def _helper(self):
        return self._own + engine._advance + VectorClock._of

class Override(base_consumer):
    def __init__(self, app):
        self.mine = app
        super().__init__(app)
    async def _add_gap(self, tp, a, b):
        return await super()._add_gap(tp, a, b)
    def added(self):
        return self._thread, self.in_recovery, self.mine, self.loop.time()

def f(consumer, app):
    setattr(app, _ATTR, 1)
    return consumer._committed_offset, getattr(consumer, "_read_offset"), Mine()._helper()
'''
    assert foreign_names(source) == {"_private_helper", "_add_gap", "_thread", "_set_by_constant", "_committed_offset",
                                     "_read_offset", "__init__", "added", "in_recovery", "loop"}
    # A private method of another module of the repository, reached through an object, is byzguard's own.
    assert "_committed_offset" not in foreign_names(source, shared=frozenset({"_committed_offset"}))


def test_tested_versions_are_the_installed_ones() -> None:
    """The suite runs on the versions the registry was checked against (else the gate would stop its workers)."""
    assert internals.untested_versions() == []


def test_gate_passes_tested_versions() -> None:
    """Tested versions of all three packages start without a word."""
    installed = {package: tested[0] for package, tested in internals.TESTED_VERSIONS.items()}
    assert check_versions(allow_untested=False, installed=installed) == []


def test_gate_refuses_an_untested_version_naming_package_versions_and_escape_hatch() -> None:
    """An untested aiokafka refuses the start with one message: the package, its installed version, the tested
    ones and the variable that starts anyway."""
    installed = {package: tested[0] for package, tested in internals.TESTED_VERSIONS.items()}
    installed["aiokafka"] = "0.99.0"
    with pytest.raises(UntestedVersionsError) as refused:
        check_versions(allow_untested=False, installed=installed)
    message = str(refused.value)
    assert "aiokafka 0.99.0 is installed" in message
    assert f"tested on {', '.join(internals.TESTED_VERSIONS['aiokafka'])}" in message
    assert "BYZGUARD_ALLOW_UNTESTED_VERSIONS=1" in message
    assert "faust-streaming" not in message.split(".")[0]


def test_gate_refuses_a_missing_package() -> None:
    """A package that is not installed at all (mode under another distribution name) is not a tested version."""
    installed = {package: tested[0] for package, tested in internals.TESTED_VERSIONS.items()}
    installed["mode-streaming"] = None
    with pytest.raises(UntestedVersionsError, match="mode-streaming is not installed; byzguard is tested on"):
        check_versions(allow_untested=False, installed=installed)


def test_gate_only_warns_when_allowed(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the escape hatch the start goes on, with a WARNING naming the package and version."""
    installed = {package: tested[0] for package, tested in internals.TESTED_VERSIONS.items()}
    installed["faust-streaming"] = "0.16.0"
    monkeypatch.setattr(internals, "_warned", set())  # said once per process
    with caplog.at_level(logging.WARNING, logger="app.internals"):
        lines = check_versions(allow_untested=True, installed=installed)
    assert lines == [f"faust-streaming 0.16.0 is installed; byzguard is tested on "
                     f"{', '.join(internals.TESTED_VERSIONS['faust-streaming'])}"]
    assert any(r.levelno == logging.WARNING and "faust-streaming 0.16.0" in r.getMessage() for r in caplog.records)
    assert any("private names byzguard uses are present as registered" in r.getMessage() for r in caplog.records)


def test_gate_when_allowed_names_the_private_names_that_differ(caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting anyway on untested versions logs which registered private names differ there."""
    installed = {package: tested[0] for package, tested in internals.TESTED_VERSIONS.items()}
    installed["aiokafka"] = "0.15.0"
    monkeypatch.setattr(internals, "_warned", set())
    gone = PrivateName("faust.transport.consumer.Consumer", "_gone_in_this_version", "attribute", (), "")
    monkeypatch.setattr(internals, "PRIVATE_NAMES", (*PRIVATE_NAMES[:2], gone))
    with caplog.at_level(logging.WARNING, logger="app.internals"):
        check_versions(allow_untested=True, installed=installed)
    assert any("1 of byzguard's 3 private names" in r.getMessage() and "_gone_in_this_version" in r.getMessage()
               for r in caplog.records)


def _untested_aiokafka(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = {package: tested[0] for package, tested in internals.TESTED_VERSIONS.items()}
    installed["aiokafka"] = "0.99.0"
    monkeypatch.setattr(internals, "installed_versions", lambda: dict(installed))


def test_run_refuses_untested_versions_before_touching_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    """`byzguard run` on an untested aiokafka exits 2 with the gate's message, before it contacts a broker."""
    from app.cli import cli

    _untested_aiokafka(monkeypatch)
    contacted: list[str] = []
    monkeypatch.setattr("app.provision.provision", lambda *a, **k: contacted.append("provision"))
    result = CliRunner().invoke(cli, ["run", "--config", str(REPO / "byzguard.yaml"), "--broker", "127.0.0.1:1",
                                      "--no-demo"], env={"BYZGUARD_ALLOW_UNTESTED_VERSIONS": None})
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "cannot start: aiokafka 0.99.0 is installed; byzguard is tested on 0.14.0" in output
    assert "BYZGUARD_ALLOW_UNTESTED_VERSIONS=1" in output
    assert contacted == []


def test_build_app_refuses_untested_versions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Building the worker's app (what every way of running a worker does) refuses untested versions too."""
    from app.settings import Settings
    from app.worker import build_app
    from byzguard.config import load

    _untested_aiokafka(monkeypatch)
    config = tmp_path / "byzguard.yaml"
    config.write_text("routes:\n  - {name: r, inputs: [a], verified_topic: b, quarantine_topic: c, types: {t: {}}}\n")
    with pytest.raises(UntestedVersionsError, match=r"aiokafka 0\.99\.0"):
        build_app(Settings(data_dir=tmp_path / "data"), load(config), "127.0.0.1:9092")


def test_a_method_byzguard_adds_is_found_once_the_library_has_it(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """A method of byzguard's own on a subclass of a library class needs no entry while the library lacks the name;
    on a version that adds it, it is an override and the scan reports it."""
    from mode import Service

    source = ("from mode import Service\n\n\nclass Probe(Service):\n    async def _probe_added(self) -> None:\n"
              "        await self.crash(RuntimeError())\n")
    (tmp_path / "internals_probe.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "_probe_added" not in foreign_names(source, "internals_probe")
    assert "crash" in foreign_names(source, "internals_probe")  # reached through self: always listed
    monkeypatch.setattr(Service, "_probe_added", lambda self: None, raising=False)
    assert "_probe_added" in foreign_names(source, "internals_probe")


def test_demo_that_may_start_a_worker_refuses_untested_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    """`byzguard demo` (which starts a worker unless --worker none) refuses untested versions up front; with
    `--worker none` it only sends and scores, so it is not refused."""
    from app.cli import cli

    _untested_aiokafka(monkeypatch)
    env = {"BYZGUARD_ALLOW_UNTESTED_VERSIONS": None, "BYZGUARD_BROKER": "127.0.0.1:1", "BYZGUARD_KEY_PRICING_1": "x"}
    refused = CliRunner().invoke(cli, ["demo", "--worker", "start", "--config", str(REPO / "byzguard.yaml")], env=env)
    assert refused.exit_code == 2, refused.output
    assert "aiokafka 0.99.0 is installed" in " ".join(refused.output.split())
    monkeypatch.setattr("app.dev.demo.play", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("played")))
    scored = CliRunner().invoke(cli, ["demo", "--worker", "none", "--config", str(REPO / "byzguard.yaml")], env=env)
    assert "played" in scored.output and "0.99.0" not in scored.output
