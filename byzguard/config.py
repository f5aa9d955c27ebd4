"""The guard's configuration file: routes, per-type policies, check severities, keys and rules.

Loaded once at start and refused, with the file, the line and the field path, when anything is wrong.
Secrets never sit here: keys name an environment variable or a file that holds the secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from byzguard.audit import AuditRule, AuditSide, FieldPath, Require
from byzguard.errors import ConfigError, KeyRingError, RuleCompileError
from byzguard.integrity import DEFAULT_FORMS, FORMS, KeyRing
from byzguard.rules import RuleSet, RuleSpec, compile_rules
from byzguard.verdict import CHECK_OF_FAMILY, Code, Severity

CHECKS = ("integrity", "authorization", "idempotency", "version", "causal", "time", "invariant")

# Codes whose default severity is not `reject`: skipped versions are suspicious but often legitimate.
# An event accepted in an integrity form that does not bind its attributes passes with a warning.
DEFAULT_CODE_SEVERITY: dict[Code, Severity] = {Code.VERSION_GAP: Severity.WARN,
                                               Code.STATE_LAST_GOOD_TOO_LARGE: Severity.WARN,
                                               Code.INTEGRITY_LEGACY_FORM: Severity.WARN}

# A module constant: on Python 3.11 `Severity.REJECT` is a descriptor lookup, and level() runs per event.
_REJECT = Severity.REJECT

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """'500ms', '30s', '10m', '24h', '7d' or a number of seconds -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration (examples: 500ms, 30s, 10m, 24h, 7d)")


class Policy(StrEnum):
    """What happens to a suspect event: quarantine it, or forward it marked suspect and record it."""

    FAIL_CLOSED = "fail_closed"
    FAIL_OPEN = "fail_open"


class Partitioning(StrEnum):
    """What a route does with a record that is not in the partition of its entity id (Kafka's murmur2).

    REFUSE quarantines it (decode.wrong_partition; a null key: decode.key_mismatch); REPARTITION first moves
    every input record, bytes and headers untouched, through an internal topic to its entity's partition.
    """

    REFUSE = "refuse"
    REPARTITION = "repartition"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleModel(_Model):
    name: str = Field(min_length=1)
    expr: str = Field(min_length=1)
    severity: Literal["reject", "warn"] = "reject"
    message: str = ""


class TypeModel(_Model):
    """Per event type settings; unset fields fall back to the route's, then to the file's defaults."""

    policy: Policy | None = None
    checks: dict[str, Severity] = Field(default_factory=dict)
    codes: dict[str, Severity] = Field(default_factory=dict)
    max_age: float | None = None
    max_skew: float | None = None
    sources: list[str] | None = None
    key_ids: list[str] | None = None
    rules: list[RuleModel] = Field(default_factory=list)
    # keep: a verified value with a warning does not replace the last-known-good; replace: it does.
    last_good_on_warn: Literal["keep", "replace"] | None = None

    @field_validator("max_age", "max_skew", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float | None:
        return None if value is None else parse_duration(value)

    @field_validator("checks", "codes", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare `off` as false; `off` is what the user wrote.
        if isinstance(value, dict):
            return {k: ("off" if v is False else v) for k, v in value.items()}
        return value

    @field_validator("checks")
    @classmethod
    def _known_checks(cls, value: dict[str, Severity]) -> dict[str, Severity]:
        unknown = sorted(set(value) - set(CHECKS))
        if unknown:
            raise ValueError(f"unknown check(s) {unknown}; known: {list(CHECKS)}")
        return value

    @field_validator("codes")
    @classmethod
    def _known_codes(cls, value: dict[str, Severity]) -> dict[str, Severity]:
        # decode failures always reject; type.unlisted follows the route's `unlisted_types` alone.
        known = {c.value for c in Code if c.value.split(".")[0] != "decode" and c is not Code.TYPE_UNLISTED}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown code(s) {unknown}; known: {sorted(known)}")
        return value


class CausalModel(_Model):
    """Causal delivery: hold events whose vector-clock dependencies have not been verified yet."""

    buffer: bool = False
    deadline: float = 30.0
    max_held_per_scope: int = Field(default=100, ge=1)
    max_held_total: int = Field(default=10_000, ge=1)
    #: The bytes of held records one entity's buffer may keep: its state record must fit its changelog.
    max_held_bytes: int = Field(default=262_144, ge=1024, le=524_288)

    @field_validator("deadline", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)


class InputModel(_Model):
    """An input topic that one source writes: records naming no source are that source's.

    Only as trustworthy as the topic's write ACL: declare it for topics only that source may write."""

    topic: str = Field(min_length=1)
    source: str | None = Field(default=None, min_length=1)


class SourceModel(_Model):
    """What the guard accepts from one source: the integrity forms besides `bound` (ENVELOPE.md)."""

    forms: list[str] = Field(default_factory=list)

    @field_validator("forms")
    @classmethod
    def _known_forms(cls, value: list[str]) -> list[str]:
        unknown = [f for f in value if f not in FORMS]
        if unknown:
            raise ValueError(f"unknown integrity form(s) {unknown}; known: {list(FORMS)}")
        return value


class RouteModel(_Model):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    inputs: list[InputModel] = Field(min_length=1)
    verified_topic: str
    quarantine_topic: str
    partitions: int = Field(default=8, ge=1)
    default_type: str = ""
    require_checksum: bool = False
    policy: Policy = Policy.FAIL_CLOSED
    types: dict[str, TypeModel] = Field(default_factory=dict)
    # Types are an allow-list: a type not under `types` is refused (type.unlisted), unless the route opts in
    # to passing it with a warning. Neither a check's nor a code's severity loosens this.
    unlisted_types: Literal["reject", "warn"] = "reject"
    causal: CausalModel = Field(default_factory=CausalModel)
    receipts_topic: str | None = None
    partitioning: Partitioning = Partitioning.REFUSE

    @model_validator(mode="after")
    def _allow_list(self) -> RouteModel:
        if self.unlisted_types == "reject":
            if not self.types:
                raise ValueError(f"route {self.name!r} lists no types, so it would refuse every event "
                                 "(type.unlisted): list its event types under `types`, or set "
                                 "`unlisted_types: warn` to pass any type with a warning")
            if self.default_type and self.default_type not in self.types:
                raise ValueError(f"route {self.name!r}: default_type {self.default_type!r} is not listed under "
                                 f"types (listed: {sorted(self.types)})")
        return self

    @field_validator("inputs", mode="before")
    @classmethod
    def _plain_topics(cls, value: object) -> object:
        # `inputs: [prices]` is `inputs: [{topic: prices}]`: a topic whose records name their source.
        if isinstance(value, list):
            return [{"topic": t} if isinstance(t, str) else t for t in value]
        return value

    def topics(self) -> list[str]:
        """The input topic names."""
        return [t.topic for t in self.inputs]


class KeyModel(_Model):
    source: str = Field(min_length=1)
    secret_env: str | None = None
    secret_file: str | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> KeyModel:
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret_env or secret_file (never the secret itself)")
        return self


class IdempotencyModel(_Model):
    ids_per_entity: int = Field(default=32, ge=1, le=4096)
    window: float = 86_400.0

    @field_validator("window", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)


class AuditSideModel(_Model):
    """One stream of an audit rule: records of `type` on a verified topic, the join key and the compared value."""

    topic: str = Field(min_length=1)
    type: str = Field(min_length=1)
    key: str
    value: str | None = None
    name: str | None = None  # the service, as discrepancies name it (default: the type)

    @field_validator("key", "value")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None:
            FieldPath.parse(value)
        return value


class AuditModel(_Model):
    """A cross-stream consistency rule: every left record has a right one with the same key within `within`."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    description: str = ""
    left: AuditSideModel
    right: AuditSideModel
    within: float
    grace: float = 5.0
    tolerance: float = Field(default=0.0, ge=0)
    require: Require = Require.LEFT
    discrepancies_topic: str = Field(default="audit.discrepancies", min_length=1)
    partitions: int | None = Field(default=None, ge=1)

    @field_validator("within", "grace", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("within")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("the window must be longer than 0s")
        return value


def _error_at(loc: tuple[int | str, ...], message: str, value: object) -> ValidationError:
    """A validation error of a whole-file check placed at `loc`, so that loads() reports its file:line."""
    return ValidationError.from_exception_data("FileModel", [InitErrorDetails(
        type=PydanticCustomError("consistency", "{message}", {"message": message}), loc=loc, input=value)])


class FileModel(_Model):
    defaults: TypeModel = Field(default_factory=TypeModel)
    keys: dict[str, KeyModel] = Field(default_factory=dict)
    sources: dict[str, SourceModel] = Field(default_factory=dict)
    idempotency: IdempotencyModel = Field(default_factory=IdempotencyModel)
    last_good_retention: float = 30 * 86_400.0
    # A last-known-good value larger than this is not kept (state.last_good_too_large): state records stay
    # well under Kafka's 1 MB message limit.
    last_good_max_bytes: int = Field(default=256 * 1024, ge=0, le=512 * 1024)
    routes: list[RouteModel] = Field(min_length=1)
    audits: list[AuditModel] = Field(default_factory=list)

    @field_validator("last_good_retention", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)

    @model_validator(mode="after")
    def _consistent(self) -> FileModel:
        seen_inputs: dict[str, str] = {}
        names = set()
        for route in self.routes:
            if route.name in names:
                raise ValueError(f"route name {route.name!r} is used twice")
            names.add(route.name)
            for topic in route.topics():
                if topic in seen_inputs:
                    raise ValueError(f"input topic {topic!r} is in routes {seen_inputs[topic]!r} and {route.name!r}")
                seen_inputs[topic] = route.name
                if topic in (route.verified_topic, route.quarantine_topic):
                    raise ValueError(f"route {route.name!r} reads and writes topic {topic!r}")
            for type_name, type_model in route.types.items():
                for n, key_id in enumerate(type_model.key_ids or ()):
                    if key_id not in self.keys:
                        # At the key id's own place (file:line), not at the top of the file.
                        raise _error_at(("routes", self.routes.index(route), "types", type_name, "key_ids", n),
                                        f"route {route.name!r} type {type_name!r}: key id {key_id!r} is not "
                                        "declared under keys", key_id)
        return self

    @model_validator(mode="after")
    def _audits_consistent(self) -> FileModel:
        # Audits read verified topics only: what they compare has passed every check.
        verified = {r.verified_topic: r for r in self.routes}
        route_topics = {t for r in self.routes for t in (*r.topics(), r.verified_topic, r.quarantine_topic)}
        names = set()
        for audit in self.audits:
            if audit.name in names:
                raise ValueError(f"audit name {audit.name!r} is used twice")
            names.add(audit.name)
            if audit.discrepancies_topic in route_topics:
                raise ValueError(f"audit {audit.name!r}: discrepancies_topic {audit.discrepancies_topic!r} is a "
                                 "route's topic")
            for which, side in (("left", audit.left), ("right", audit.right)):
                route = verified.get(side.topic)
                if route is None:
                    raise ValueError(f"audit {audit.name!r} {which}: topic {side.topic!r} is not a route's "
                                     f"verified_topic (known: {sorted(verified)})")
                reader = next((r.name for r in self.routes if side.topic in r.topics()), None)
                if reader is not None:  # one consumer group reads each topic once: the route would take it
                    raise ValueError(f"audit {audit.name!r} {which}: topic {side.topic!r} is also an input of route "
                                     f"{reader!r}; audit a topic no route reads")
                known = {*route.types, route.default_type} - {""}
                if route.types and side.type not in known:
                    raise ValueError(f"audit {audit.name!r} {which}: route {route.name!r} has no type "
                                     f"{side.type!r} (known: {sorted(known)})")
            if (audit.left.topic, audit.left.type) == (audit.right.topic, audit.right.type):
                raise ValueError(f"audit {audit.name!r}: left and right read the same records")
        return self


@dataclass(frozen=True, slots=True)
class TypePolicy:
    """Everything the checks need to know about one event type on one route, resolved and compiled."""

    policy: Policy
    severity: Mapping[Code, Severity]
    max_age: float | None
    max_skew: float | None
    sources: frozenset[str] | None
    key_ids: frozenset[str] | None
    require_checksum: bool
    rules: RuleSet
    #: False for the route's fallback policy, which judges the types the route does not list (type.unlisted).
    listed: bool = True
    #: Whether a verified event with a warning replaces the last-known-good value (`last_good_on_warn`).
    warned_replaces_last_good: bool = False
    #: Source -> the integrity forms accepted from it; sources not listed get DEFAULT_FORMS (`bound` only).
    forms: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def level(self, code: Code) -> Severity:
        """The severity of a code on this type."""
        return self.severity.get(code, _REJECT)


@dataclass(frozen=True, slots=True)
class Route:
    """One route: its topics and the compiled policy of each event type it knows."""

    name: str
    inputs: tuple[str, ...]
    verified_topic: str
    quarantine_topic: str
    partitions: int
    default_type: str
    causal: CausalModel
    types: Mapping[str, TypePolicy]
    fallback: TypePolicy
    receipts_topic: str | None = None
    #: Input topic -> the source that writes it (records naming no source are that source's).
    input_sources: Mapping[str, str] = field(default_factory=dict)
    partitioning: Partitioning = Partitioning.REFUSE
    #: causal.buffer, as a plain attribute: the guard reads it for every record, and an attribute of the pydantic
    #: model costs a Python-level __getattr__ hook.
    holds: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "holds", bool(self.causal.buffer))

    def policy_for(self, event_type: str) -> TypePolicy:
        """The policy of an event type, or the route's fallback for types it does not list (type.unlisted)."""
        return self.types.get(event_type, self.fallback)


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """The whole validated configuration."""

    routes: tuple[Route, ...]
    keyring: KeyRing
    ids_per_entity: int
    id_window: float
    last_good_retention: float
    source_path: str = "<memory>"
    last_good_max_bytes: int = 256 * 1024
    route_by_input: Mapping[str, Route] = field(default_factory=dict)
    audits: tuple[AuditRule, ...] = ()

    def route_for(self, topic: str) -> Route:
        """The route that reads `topic`."""
        return self.route_by_input[topic]

    def audit(self, name: str) -> AuditRule | None:
        """The audit rule called `name`, if any."""
        return next((a for a in self.audits if a.name == name), None)


def _merge_type(defaults: TypeModel, route: RouteModel, own: TypeModel | None,
                forms: Mapping[str, frozenset[str]] | None = None) -> TypePolicy:
    layers = [defaults] + ([own] if own is not None else [])
    checks: dict[str, Severity] = {}
    codes: dict[str, Severity] = {}
    for layer in layers:
        checks.update(layer.checks)
        codes.update(layer.codes)

    def pick(attr: str) -> Any:
        for layer in reversed(layers):
            value = getattr(layer, attr)
            if value is not None:
                return value
        return None

    severity: dict[Code, Severity] = {}
    for code in Code:
        family = code.value.split(".", 1)[0]
        if family == "decode":
            continue
        if code is Code.TYPE_UNLISTED:
            severity[code] = Severity(route.unlisted_types)  # only the route's own opt-in loosens it
            continue
        level = DEFAULT_CODE_SEVERITY.get(code, Severity.REJECT)
        check_level = checks.get(CHECK_OF_FAMILY[family])
        if check_level is not None:
            # A check switched off silences all its codes; `warn` demotes rejects but keeps softer defaults.
            level = check_level if check_level is Severity.OFF or level is Severity.REJECT else level
        severity[code] = codes.get(code.value, level)
    rule_models = [*defaults.rules, *(own.rules if own else [])]
    specs = [RuleSpec(r.name, r.expr, Severity(r.severity), r.message) for r in rule_models]
    sources = pick("sources")
    key_ids = pick("key_ids")
    return TypePolicy(
        policy=pick("policy") or route.policy,
        severity=severity,
        max_age=pick("max_age"),
        max_skew=pick("max_skew"),
        sources=frozenset(sources) if sources is not None else None,
        key_ids=frozenset(key_ids) if key_ids is not None else None,
        require_checksum=route.require_checksum or bool(key_ids),
        rules=compile_rules(specs),
        listed=own is not None,
        warned_replaces_last_good=pick("last_good_on_warn") == "replace",
        forms=forms or {},
    )


def _load_keys(model: FileModel, environ: Mapping[str, str] | None, require_secrets: bool) -> KeyRing:
    """The key ring; without require_secrets, keys whose secret is not available here are left out (for tools that
    read or check and verify no MAC: the review CLI, `config check`, audits)."""
    specs = {kid: (k.source, k.secret_env, k.secret_file) for kid, k in model.keys.items()}
    if require_secrets:
        return KeyRing.load(specs, environ)
    available = {}
    for kid, spec in specs.items():
        try:
            key = KeyRing.load({kid: spec}, environ).get(kid)
        except KeyRingError:
            continue
        if key is not None:
            available[kid] = key
    return KeyRing(available)


def build(model: FileModel, *, source_path: str = "<memory>", environ: Mapping[str, str] | None = None,
          require_secrets: bool = True) -> GuardConfig:
    """Compile a validated file model: resolve layers, compile rules, load keys."""
    keyring = _load_keys(model, environ, require_secrets)
    forms = {name: DEFAULT_FORMS | frozenset(spec.forms) for name, spec in model.sources.items()}
    routes = []
    for index, route in enumerate(model.routes):
        types = {}
        for name, type_model in route.types.items():
            try:
                types[name] = _merge_type(model.defaults, route, type_model, forms)
            except RuleCompileError as exc:
                raise _rule_error(exc, model, ("routes", index, "types", name), type_model) from exc
        try:
            fallback = _merge_type(model.defaults, route, None, forms)
        except RuleCompileError as exc:
            raise _rule_error(exc, model, ("defaults",), None) from exc
        routes.append(Route(
            name=route.name,
            inputs=tuple(route.topics()),
            verified_topic=route.verified_topic,
            quarantine_topic=route.quarantine_topic,
            partitions=route.partitions,
            default_type=route.default_type,
            causal=route.causal,
            types=types,
            fallback=fallback,
            receipts_topic=route.receipts_topic,
            input_sources={t.topic: t.source for t in route.inputs if t.source is not None},
            partitioning=route.partitioning,
        ))
    by_input = {topic: r for r in routes for topic in r.inputs}
    return GuardConfig(
        routes=tuple(routes),
        keyring=keyring,
        ids_per_entity=model.idempotency.ids_per_entity,
        id_window=model.idempotency.window,
        last_good_retention=model.last_good_retention,
        last_good_max_bytes=model.last_good_max_bytes,
        source_path=source_path,
        route_by_input=by_input,
        audits=tuple(_compile_audit(model, audit) for audit in model.audits),
    )


def _rule_error(exc: RuleCompileError, model: FileModel, where: tuple[int | str, ...],
                own: TypeModel | None) -> RuleCompileError:
    """The error with the location of the rule that failed (`loc`, turned into file:line by loads()): the first rule
    that does not compile on its own, else the rules list of the type (a name defined twice)."""
    candidates: list[tuple[tuple[int | str, ...], RuleModel]] = [
        (("defaults", "rules", n), r) for n, r in enumerate(model.defaults.rules)]
    if own is not None:
        candidates += [((*where, "rules", n), r) for n, r in enumerate(own.rules)]
    loc: tuple[int | str, ...] = (*where, "rules")
    for rule_loc, rule in candidates:
        try:
            compile_rules([RuleSpec(rule.name, rule.expr, Severity(rule.severity), rule.message)])
        except RuleCompileError:
            loc = (*rule_loc, "expr")
            break
    error = RuleCompileError(f"{'.'.join(map(str, loc))}: {exc}")
    error.loc = loc
    return error


def _compile_audit(model: FileModel, audit: AuditModel) -> AuditRule:
    """An audit rule with parsed paths; its join partitions default to those of the left topic's route."""
    def side(m: AuditSideModel) -> AuditSide:
        return AuditSide(m.name or m.type, m.topic, m.type, FieldPath.parse(m.key),
                         FieldPath.parse(m.value) if m.value is not None else None)
    left_route = next(r for r in model.routes if r.verified_topic == audit.left.topic)
    return AuditRule(audit.name, side(audit.left), side(audit.right), audit.within, grace=audit.grace,
                     tolerance=audit.tolerance, require=audit.require,
                     discrepancies_topic=audit.discrepancies_topic,
                     partitions=audit.partitions or left_route.partitions, description=audit.description)


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location, as deep as the path resolves."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
        else:
            nxt = None
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    return line


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: object, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} (first at line {first})")
        self.key = key
        self.line = line
        self.first = first


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error: PyYAML keeps the last
    silently, so a second `routes:` would replace the first and leave its topics unguarded."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are meant to be overridden by the mapping's own keys
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not None:
                raise _DuplicateKeyError(key, line, first)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str) -> Any:
    """Configuration text as plain data, as yaml.safe_load gives it, except that a repeated key is a YAMLError."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no Python objects from the file


def loads(text: str, *, source_path: str = "<memory>", environ: Mapping[str, str] | None = None,
          require_secrets: bool = True) -> GuardConfig:
    """Parse, validate and compile configuration text; ConfigError says file:line, the field and the fault.
    require_secrets=False: MAC keys whose secret is not available are left out of the key ring, not refused."""
    try:
        raw = read_yaml(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{source_path}:{exc.line}: duplicate key {exc.key!r} (first at line {exc.first}); "
                          "YAML would silently keep only the last one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source_path}: not valid YAML: {exc}") from exc
    try:
        model = FileModel.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "enum"))))
            line = _line_of(root, loc)
            where = f"{source_path}:{line}" if line else source_path
            path = ".".join(str(p) for p in loc) or "(top level)"
            lines.append(f"{where}: {path}: {err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    try:
        return build(model, source_path=source_path, environ=environ, require_secrets=require_secrets)
    except RuleCompileError as exc:
        line = _line_of(root, exc.loc) if exc.loc else None
        raise RuleCompileError(f"{source_path}:{line}: {exc}" if line else f"{source_path}: {exc}") from exc
    except ConfigError as exc:
        raise type(exc)(f"{source_path}: {exc}") from exc


def load(path: str | Path, *, environ: Mapping[str, str] | None = None, require_secrets: bool = True) -> GuardConfig:
    """Load and validate a configuration file (see loads for require_secrets)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the configuration: {exc}") from exc
    return loads(text, source_path=str(p), environ=environ, require_secrets=require_secrets)
