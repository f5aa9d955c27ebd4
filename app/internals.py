"""Every private name of faust, mode and aiokafka that byzguard uses, and the versions they were tested on.

byzguard reaches into the libraries' internals where their public API leaves a gap (the batched runtime's mode
Service and aiokafka assignor and rebalance listener, the review views on faust's web server, the aiokafka client's
metadata refresh; in bench/, the fetch settings faust hard-codes). A private name can change in any release, so:

- every one is listed here (`PRIVATE_NAMES`): whose it is, what kind of name, where byzguard uses it and why,
  and for a method the parameters byzguard relies on and a digest of the source it was read against. So is
  every member of a library class that byzguard's subclasses of it override, add or reach through `self`
  (public by name, but of the libraries' internal classes: `Service.crash`, `RangePartitionAssignor.assign`, ...);
- `tests/unit/test_internals.py` checks each against the installed libraries without a broker (the name is
  there, of the same kind, with the same parameters and the same source), and scans app/, agents/, tables/,
  topics/ and bench/ for a name of that kind that is not listed here, or listed and no longer used;
- the worker refuses to start on a faust-streaming, aiokafka or mode-streaming version not in
  `TESTED_VERSIONS` (`check_versions`), unless BYZGUARD_ALLOW_UNTESTED_VERSIONS=1 turns that into a warning.

docs/upgrading-faust.md says how to move to a new version. `python -m app.internals` prints what differs on
the installed versions. This module imports none of the three libraries at import time: the version gate runs
before they are loaded.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import logging
import sys
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

#: The versions the whole suite (chaos tests included) and the benchmark ran on. A worker refuses others.
TESTED_VERSIONS: Mapping[str, tuple[str, ...]] = {
    "faust-streaming": ("0.15.3",),
    "aiokafka": ("0.14.0",),
    "mode-streaming": ("0.7.1",),
}

#: The environment variable (a worker setting, app/settings.py) that lets a worker start on untested versions.
ALLOW_UNTESTED_ENV = "BYZGUARD_ALLOW_UNTESTED_VERSIONS"

#: attribute: set on instances (in `__init__` or another method) or declared on the class;
#: method / async method: a function defined on the class (byzguard calls or overrides it);
#: added: a name byzguard itself puts on a library class or object, which the library must not define (an
#: attribute set with setattr, a method of a subclass defined inside a function; the methods that a subclass at
#: a module's top level adds need no entry: the scan imports the class and finds a clash itself).
Kind = Literal["attribute", "method", "async method", "added"]


@dataclass(frozen=True)
class PrivateName:
    """One private name of a library (or member of a library class byzguard subclasses) that byzguard relies on."""

    #: The library class byzguard uses it on (or subclasses), as `module.Class`; it may inherit the name.
    owner: str
    name: str
    kind: Kind
    #: Repository paths of the modules that use it.
    used_in: tuple[str, ...]
    why: str
    #: Methods: the parameters byzguard relies on, without annotations, as `inspect.signature` prints them.
    signature: str | None = None
    #: Methods byzguard overrides (rather than only calls): a change of their body can break the override.
    overridden: bool = False
    #: Methods: sha256 (first 16 hex digits) of the dedented source byzguard was written against.
    digest: str | None = None


_FETCHING = "bench/fetching.py"
_AIOKAFKA_DRIVER = "faust.transport.drivers.aiokafka"

PRIVATE_NAMES: tuple[PrivateName, ...] = (
    # -- faust: the benchmark's faust pass-through (variant b) fetches as byzguard does (bench/fetching.py) ------
    PrivateName("faust.app.base.App", "_consumer", "attribute", (_FETCHING,),
                "tune_fetch refuses an app whose consumer exists: the transport's Consumer class is replaced, which "
                "only works before the app created its consumer (`app.consumer` would create it)"),
    PrivateName(f"{_AIOKAFKA_DRIVER}.Consumer", "_new_consumer_thread", "method", (_FETCHING,),
                "overridden: the consumer thread builds its aiokafka consumer with the worker's fetch settings",
                signature="(self)", overridden=True, digest="8fd0d41b15145615"),
    PrivateName(f"{_AIOKAFKA_DRIVER}.AIOKafkaConsumerThread", "_create_worker_consumer", "method", (_FETCHING,),
                "overridden: sets fetch_min_bytes and fetch_max_wait_ms, which faust hard-codes",
                signature="(self, transport)", overridden=True, digest="c179c0bdb9755c3a"),
    PrivateName("mode.services.Service", "loop", "attribute", (_FETCHING,),
                "the consumer thread tune_fetch builds gets the consumer's loop and beacon, as faust's does"),
    PrivateName("mode.services.Service", "beacon", "attribute", (_FETCHING,), "as loop"),
    PrivateName("aiokafka.consumer.consumer.AIOKafkaConsumer", "_fetch_min_bytes", "attribute", (_FETCHING,),
                "set after construction, read by start() when it builds the fetcher"),
    PrivateName("aiokafka.consumer.consumer.AIOKafkaConsumer", "_fetch_max_wait_ms", "attribute", (_FETCHING,),
                "as _fetch_min_bytes"),
    # -- faust: the producer of a bench prototype (variant f) -------------------------------------------------
    PrivateName(f"{_AIOKAFKA_DRIVER}.Producer", "_ensure_producer", "method",
                ("app/faust_producer.py", "bench/faust_batches.py"),
                "the started aiokafka producer: record batches are sent through it (bench, at_least_once); the "
                "worker tells its client which topics to refresh",
                signature="(self)", digest="04016bd22147281a"),
    PrivateName(f"{_AIOKAFKA_DRIVER}.Producer", "on_start", "async method", ("app/faust_producer.py",),
                "overridden: once faust's producer has started, its client refreshes the routes' input topics "
                "instead of every topic of the cluster", signature="(self)", overridden=True,
                digest="a1601325eb84f271"),
    # -- members of library classes that byzguard's subclasses override or reach through self -----------------
    # Public by name, but of faust's, mode's and aiokafka's internal classes: they change as freely as private names.
    PrivateName("mode.services.Service", "__init__", "method", ("app/runtime/loop.py",),
                "BatchedRuntime passes faust's (loop=..., beacon=...) on",
                signature="(self, *, beacon=None, loop=None)", overridden=True, digest="4a44ca859d668719"),
    PrivateName("mode.services.Service", "crash", "async method", ("app/runtime/loop.py",),
                "a failed batch or rebalance stops the worker loudly (nothing past it is committed)",
                signature="(self, reason)", digest="6e0b5672cd830081"),
    PrivateName("mode.services.Service", "add_future", "method", ("app/runtime/loop.py",),
                "the batched runtime removes what a previous process left in faust's group once faust's consumer "
                "joins, in the background (app/runtime/membership.py)", signature="(self, coro)",
                digest="6ff53800dd5241f6"),
    PrivateName("mode.services.ServiceCallbacks", "on_start", "async method", ("app/runtime/loop.py",),
                "overridden: the batched runtime starts its consumer and waits for its first assignment",
                signature="(self)", overridden=True, digest="8878cfa83a70978d"),
    PrivateName("aiokafka.abc.ConsumerRebalanceListener", "on_partitions_revoked", "method",
                ("app/runtime/loop.py",), "overridden: the batched runtime finishes the batch in flight and "
                "closes the revoked partitions' state", signature="(self, revoked)", overridden=True,
                digest="6b7d9bc8e5d9ac4e"),
    PrivateName("aiokafka.abc.ConsumerRebalanceListener", "on_partitions_assigned", "method",
                ("app/runtime/loop.py",), "overridden: the batched runtime restores the assigned partitions' "
                "state before their first record", signature="(self, assigned)", overridden=True,
                digest="473d945f9acad8a8"),
    PrivateName("mode.services.ServiceCallbacks", "on_stop", "async method",
                ("app/review/web.py", "app/runtime/loop.py", "app/worker.py"),
                "overridden: services that stop the review page's and the quarantine backlog's clients",
                signature="(self)", overridden=True, digest="11211872b272fa13"),
    PrivateName("faust.worker.Worker", "on_setup_root_logger", "method", ("app/cli.py",),
                "overridden: attaches the filter that counts the libraries' repeated warnings (app/logs.py)",
                signature="(self, logger, level)", overridden=True, digest="d9e77a9305703e90"),
    PrivateName("faust.web.views.View", "error", "method", ("app/review/web.py",),
                "the review API's problem responses", signature="(self, status, reason, headers=None, **kwargs)",
                digest="652baa0491bfd5ea"),
    PrivateName("faust.web.views.View", "problem", "added", ("app/review/web.py",),
                "the review views' helper (must not override a faust View method)"),
    PrivateName("faust.web.views.View", "guarded", "added", ("app/review/web.py",), "as problem"),
    PrivateName("faust.web.views.View", "body", "added", ("app/review/web.py",), "as problem"),
    # -- aiokafka ----------------------------------------------------------------------------------------------
    PrivateName("aiokafka.coordinator.assignors.range.RangePartitionAssignor", "metadata", "method",
                ("app/runtime/owners.py",), "overridden: the batched runtime's member metadata carries the worker's "
                "web URL in user_data (the owners of the last-known-good view)", signature="(cls, topics)",
                overridden=True, digest="075c7468fda4dc36"),
    PrivateName("aiokafka.coordinator.assignors.range.RangePartitionAssignor", "assign", "method",
                ("app/runtime/owners.py",), "overridden: the range assignment, with the partition -> URL map in "
                "every member's assignment user_data", signature="(cls, cluster, members)", overridden=True,
                digest="36cc4ba588715097"),
    PrivateName("aiokafka.coordinator.assignors.range.RangePartitionAssignor", "on_assignment", "method",
                ("app/runtime/owners.py",), "overridden: each worker keeps the owner map of the generation it joined",
                signature="(cls, assignment)", overridden=True, digest="199ef55cb030e2c8"),
    # -- prometheus_client: a histogram series filled once per batch (app/runtime/tally.py) ---------------------
    PrivateName("prometheus_client.metrics.Histogram", "_upper_bounds", "attribute", ("app/runtime/tally.py",),
                "the bucket bounds a batch's observations are counted in, as Histogram.observe picks them"),
    PrivateName("prometheus_client.metrics.Histogram", "_buckets", "attribute", ("app/runtime/tally.py",),
                "each bucket's value: inc(count) once per batch instead of once per observation"),
    PrivateName("prometheus_client.metrics.Histogram", "_sum", "attribute", ("app/runtime/tally.py",),
                "the series' sum: inc(total) once per batch"),
    PrivateName("aiokafka.consumer.consumer.AIOKafkaConsumer", "_client", "attribute",
                ("app/runtime/fencing.py", "app/sidereads.py", "bench/kafka.py", "byzguard/client/producer.py"),
                "force_metadata_update / send (the metadata of the topics asked for): aiokafka has no public "
                "way to refresh the topic list; coordinator_lookup / send of OffsetFetch v7 require_stable "
                "(app/runtime/fencing.py), which aiokafka's consumer cannot send"),
    PrivateName("aiokafka.admin.client.AIOKafkaAdminClient", "_client", "attribute",
                ("app/provision.py", "app/runtime/limits.py"),
                "send (app.sidereads `known_partitions`): the metadata of the topics asked for alone, without "
                "creating them; aiokafka's describe_topics may create them and list_topics lists the whole cluster"),
    PrivateName("aiokafka.producer.producer.AIOKafkaProducer", "_txn_manager", "attribute",
                ("app/runtime/fencing.py", "app/runtime/stages.py"),
                "exactly_once: a batch's transaction begins in the turn its delivery starts (`begin`), its offsets "
                "and commit are handed over by its records' answer (`transact`); begin_transaction first awaits the "
                "producer id through a task, two more turns of a busy loop. app/runtime/fencing.py `add_offsets`: "
                "the offsets with their group membership (FencedOffsets), which send_offsets_to_transaction's "
                "copy would drop"),
    # Called on _txn_manager in app/runtime/stages.py `begin` (public by name, of an internal class the scan cannot
    # follow there: used_in stays empty, the checks of signature and source still run).
    PrivateName("aiokafka.producer.transaction_manager.TransactionManager", "has_pid", "method",
                (), "as _txn_manager: begin_transaction only awaits this",
                signature="(self)", digest="723e7f92f94bdfd8"),
    PrivateName("aiokafka.producer.transaction_manager.TransactionManager", "begin_transaction", "method",
                (), "as _txn_manager: what begin_transaction does once the producer id is "
                "known", signature="(self)", digest="07894931781c27d9"),
    # Called on _txn_manager in app/runtime/stages.py `_hand_over`: the offsets and the commit handed to the sender
    # from the callback of the records' answer, as send_offsets_to_transaction / commit_transaction do before
    # they wait (without the task's turns in between).
    PrivateName("aiokafka.producer.transaction_manager.TransactionManager", "is_in_transaction", "method",
                (), "as _txn_manager: send_offsets_to_transaction's check", signature="(self)",
                digest="be902440684749eb"),
    PrivateName("aiokafka.producer.transaction_manager.TransactionManager", "add_offsets_to_txn", "method",
                (), "as _txn_manager: what send_offsets_to_transaction does before it waits (the offsets' future)",
                signature="(self, offsets, group_id)", digest="a177ec82d5014d67"),
    PrivateName("aiokafka.producer.transaction_manager.TransactionManager", "committing_transaction", "method",
                (), "as _txn_manager: what commit_transaction does before it waits", signature="(self)",
                digest="85b28a337d3ed98f"),
    PrivateName("aiokafka.producer.transaction_manager.TransactionManager", "wait_for_transaction_end", "method",
                (), "as _txn_manager: what commit_transaction waits for", signature="(self)",
                digest="1854a345134680ab"),
    # -- aiokafka: KIP-447 fencing of a transaction's offsets (app/runtime/fencing.py, not yet used by the runtime) --
    # aiokafka sends TxnOffsetCommit v0 only (no group membership): one producer's TxnOffsetCommit step is replaced
    # by one that sends v3 for offsets that carry the membership (FencedOffsets); the rest stays aiokafka's.
    PrivateName("aiokafka.producer.producer.AIOKafkaProducer", "_sender", "attribute", ("app/runtime/fencing.py",),
                "fence_offsets replaces its TxnOffsetCommit step on this one producer"),
    PrivateName("aiokafka.producer.sender.Sender", "_do_txn_offset_commit", "async method",
                ("app/runtime/fencing.py",), "overridden on one instance (fence_offsets): the same steps (group "
                "coordinator, handler.do) with the v3 handler for FencedOffsets; other offsets go to the original",
                signature="(self, offsets, group_id)", overridden=True, digest="ab4e7128f33ab64e"),
    PrivateName("aiokafka.producer.sender.Sender", "_find_coordinator", "async method", ("app/runtime/fencing.py",),
                "the group coordinator the v3 TxnOffsetCommit goes to, as _do_txn_offset_commit finds it",
                signature="(self, coordinator_type, coordinator_key)", digest="7c69b57bc1fcd070"),
    PrivateName("aiokafka.producer.sender.Sender", "_txn_manager", "attribute", ("app/runtime/fencing.py",),
                "the transaction's producer id, epoch and transactional id for the v3 request; error_transaction"),
    PrivateName("aiokafka.producer.sender.TxnOffsetCommitHandler", "create_request", "method",
                ("app/runtime/fencing.py",), "overridden: TxnOffsetCommit v3 with the offsets' group membership",
                signature="(self)", overridden=True, digest="d51e42678ef339a1"),
    PrivateName("aiokafka.producer.sender.TxnOffsetCommitHandler", "handle_response", "method",
                ("app/runtime/fencing.py",), "overridden: a fenced member's answer makes the transaction abortable; "
                "every other answer goes to aiokafka's (called with v0's shape of the answer)",
                signature="(self, resp)", overridden=True, digest="da2a7e6d89c7b614"),
    PrivateName("aiokafka.producer.sender.TxnOffsetCommitHandler", "__init__", "method", (),
                "the v3 handler is built as aiokafka builds its own (sender, offsets, group_id); not overridden",
                signature="(self, sender, offsets, group_id)", digest="40f9900e84e835bf"),
    PrivateName("aiokafka.producer.sender.TxnOffsetCommitHandler", "_sender", "attribute",
                ("app/runtime/fencing.py",), "reached through self by the v3 handler: the sender's transaction "
                "manager"),
    PrivateName("aiokafka.producer.sender.TxnOffsetCommitHandler", "_offsets", "attribute",
                ("app/runtime/fencing.py",), "reached through self by the v3 handler: the FencedOffsets to commit"),
    PrivateName("aiokafka.producer.sender.TxnOffsetCommitHandler", "_group_id", "attribute",
                ("app/runtime/fencing.py",), "reached through self by the v3 handler: for the refusal's message"),
    PrivateName("aiokafka.producer.sender.BaseHandler", "do", "async method", (),
                "called on the v3 handler by fenced_commit, as aiokafka's sender calls it on its own handler",
                signature="(self, node_id)", digest="47be65fcbddda09d"),
    # Called on _txn_manager (public by name, of an internal class the scan cannot follow): used_in stays empty.
    PrivateName("aiokafka.producer.transaction_manager.TransactionManager", "error_transaction", "method", (),
                "the v3 handler's refusal of a fenced member's offsets: the transaction becomes abortable, the "
                "offsets' future and the commit fail with OffsetsFencedError", signature="(self, exc)",
                digest="4acd8c0364a2816b"),
    PrivateName("aiokafka.producer.transaction_manager.TransactionManager", "_txn_partitions", "attribute",
                ("app/runtime/fencing.py",), "kept across error_transaction, which clears it: else the abort after a "
                "fenced member's refusal sends no EndTxn and the broker's transaction goes on into the next one "
                "(its records committed with it; tests/integration/test_fencing.py, the rebalance test)"),
    PrivateName("aiokafka.producer.transaction_manager.TransactionManager", "_txn_consumer_group", "attribute",
                ("app/runtime/fencing.py",), "as _txn_partitions: the group the broker's transaction holds offsets of"),
    PrivateName("aiokafka.protocol.api.Request", "build", "method", ("app/runtime/fencing.py",),
                "overridden by the v3 / v7 request builders: the one flexible struct they carry",
                signature="(self, request_struct_class)", overridden=True, digest="eac666de710e3b5c"),
    PrivateName("aiokafka.consumer.consumer.AIOKafkaConsumer", "_coordinator", "attribute",
                ("app/runtime/fencing.py",), "group_metadata: the consumer's group membership (generation, member id, "
                "group instance id), which aiokafka does not expose"),
    PrivateName("aiokafka.consumer.group_coordinator.GroupCoordinator", "_group_instance_id", "attribute",
                ("app/runtime/fencing.py",), "group_metadata: the static member id, sent with TxnOffsetCommit v3"),
    PrivateName("aiokafka.consumer.group_coordinator.GroupCoordinator", "generation", "attribute", (),
                "group_metadata (public by name, of an internal class)"),
    PrivateName("aiokafka.consumer.group_coordinator.GroupCoordinator", "member_id", "attribute", (),
                "group_metadata (public by name, of an internal class)"),
    PrivateName("aiokafka.client.AIOKafkaClient", "_bootstrap_servers", "attribute", ("byzguard/client/producer.py",),
                "the client's bootstrap servers, for a side consumer that reads back what was sent"),
)


# -- checking a name against the installed libraries ------------------------------------------------------------

def _resolve(owner: str) -> type:
    """The class `module.Class` names."""
    module_name, _, class_name = owner.rpartition(".")
    found = getattr(importlib.import_module(module_name), class_name)
    if not isinstance(found, type):
        raise TypeError(f"{owner} is not a class")
    return found


@functools.cache
def _class_source_names(cls: type) -> frozenset[str]:
    """Names a class and its bases assign on `self` or declare in their class bodies."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__ == "builtins":
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt in body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                names.add(stmt.target.id)
            elif isinstance(stmt, ast.Assign):
                names.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
        for node in ast.walk(tree):
            target: ast.expr | None = None
            if isinstance(node, ast.AnnAssign | ast.AugAssign):
                target = node.target
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        names.add(t.attr)
            elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                names.add(target.attr)
    return frozenset(names)


def member_names(cls: type) -> frozenset[str]:
    """Every name a class has or gives its instances: its and its bases' attributes, and what their sources assign
    on `self` (instance attributes set in `__init__` or elsewhere)."""
    return _class_source_names(cls) | frozenset(name for klass in cls.__mro__ for name in vars(klass))


def plain_signature(func: Callable[..., Any]) -> str:
    """`func`'s parameters without annotations, e.g. `(self, tp, offset_from, offset_to)`."""
    sig = inspect.signature(func)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def source_digest(func: Callable[..., Any]) -> str:
    """sha256 (16 hex digits) of `func`'s dedented source."""
    return hashlib.sha256(textwrap.dedent(inspect.getsource(func)).encode()).hexdigest()[:16]


def problems(entry: PrivateName) -> list[str]:
    """What differs between `entry` and the installed libraries (empty: it is as byzguard expects)."""
    where = f"{entry.owner}.{entry.name}"
    try:
        cls = _resolve(entry.owner)
    except (ImportError, AttributeError, TypeError) as exc:
        return [f"{where}: owner not found ({exc})"]
    if entry.kind == "added":
        if entry.name in member_names(cls):
            return [f"{where}: the library now defines this name, which byzguard adds itself"]
        return []
    if entry.kind == "attribute":
        if entry.name in member_names(cls):
            return []
        return [f"{where}: no longer assigned or declared by the class or its bases"]
    func = inspect.getattr_static(cls, entry.name, None)
    if func is None:
        return [f"{where}: missing"]
    if isinstance(func, staticmethod | classmethod):
        func = func.__func__
    if not inspect.isfunction(func):
        return [f"{where}: no longer a method ({type(func).__name__})"]
    found: list[str] = []
    is_async = inspect.iscoroutinefunction(func)
    if is_async != (entry.kind == "async method"):
        found.append(f"{where}: now {'async' if is_async else 'not async'}")
    signature = plain_signature(func)
    if entry.signature is not None and signature != entry.signature:
        found.append(f"{where}: signature {signature}, byzguard relies on {entry.signature}")
    digest = source_digest(func)
    if entry.digest is not None and digest != entry.digest:
        found.append(f"{where}: source changed (digest {digest}, byzguard read {entry.digest}): read the diff")
    return found


# -- the version gate ------------------------------------------------------------------------------------------

class UntestedVersionsError(RuntimeError):
    """An installed faust-streaming, aiokafka or mode-streaming version is not one byzguard was tested on."""


def installed_versions() -> dict[str, str | None]:
    """The installed version of each package in TESTED_VERSIONS (None: not installed)."""
    found: dict[str, str | None] = {}
    for package in TESTED_VERSIONS:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def untested_versions(installed: Mapping[str, str | None] | None = None) -> list[str]:
    """One line per installed package whose version byzguard was not tested on."""
    installed = installed_versions() if installed is None else installed
    lines = []
    for package, tested in TESTED_VERSIONS.items():
        version = installed.get(package)
        if version not in tested:
            found = f"{package} {version} is installed" if version else f"{package} is not installed"
            lines.append(f"{found}; byzguard is tested on {', '.join(tested)}")
    return lines


def check_versions(*, allow_untested: bool, installed: Mapping[str, str | None] | None = None) -> list[str]:
    """Refuse (UntestedVersionsError) to run on untested faust-streaming / aiokafka / mode-streaming versions, or
    with `allow_untested` log one WARNING per package instead; returns the lines found."""
    lines = untested_versions(installed)
    if not lines:
        return lines
    advice = ("byzguard relies on private names of these libraries (app/internals.py) that can change in any "
              "release; run tests/unit/test_internals.py on the new versions and see docs/upgrading-faust.md")
    if not allow_untested:
        raise UntestedVersionsError(f"{'; '.join(lines)}. {advice}. To start anyway at your own risk, set "
                                    f"{ALLOW_UNTESTED_ENV}=1.")
    fresh = [line for line in lines if line not in _warned]  # the CLI and build_app both check: say it once
    if not fresh:
        return lines
    _warned.update(fresh)
    for line in fresh:
        log.warning("%s; starting anyway (%s=1). %s", line, ALLOW_UNTESTED_ENV, advice)
    # What the registry can tell about the installed versions, so the operator knows what to watch.
    changed = [problem for entry in PRIVATE_NAMES for problem in problems(entry)]
    if changed:
        log.warning("%d of byzguard's %d private names of these libraries differ on the installed versions: %s",
                    len(changed), len(PRIVATE_NAMES), "; ".join(changed))
    else:
        log.warning("all %d private names byzguard uses are present as registered (kind, parameters, source)",
                    len(PRIVATE_NAMES))
    return lines


_warned: set[str] = set()


def main() -> int:
    """Print every registered name that differs on the installed versions; exit 1 if any does."""
    for line in untested_versions():
        print(f"version: {line}")
    found = [problem for entry in PRIVATE_NAMES for problem in problems(entry)]
    for problem in found:
        print(problem)
    if not found:
        print(f"all {len(PRIVATE_NAMES)} private names as registered")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
