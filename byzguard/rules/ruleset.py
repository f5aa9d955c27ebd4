"""The RuleSet API: rule specs compiled into the rules of one event type, and their evaluation per event."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import lark
from celpy import celtypes
from celpy.celparser import CELParseError
from celpy.evaluation import Activation, Evaluator

from byzguard.errors import RuleCompileError
from byzguard.rules.closures import _NO_ENV, _compile_fast, _fast_env, _Fn
from byzguard.rules.conversion import _activation
from byzguard.rules.environment import _BOOL_TYPES, _cel_type_name, _check_names, _env
from byzguard.rules.generated import _generate, _Generated
from byzguard.rules.operators import _CelError, _kind_name
from byzguard.rules.wording import _describe_error, _format_value, _lookup, _quoted_paths, _syntax_error
from byzguard.verdict import Code, Reason, Severity


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One invariant as configured: a name, a CEL expression that must be true, its severity, a message."""

    name: str
    expr: str
    severity: Severity = Severity.REJECT
    message: str = ""


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    expr: str
    severity: Severity
    message: str
    ast: lark.Tree[Any]
    paths: tuple[tuple[str, ...], ...]
    roots: frozenset[str]
    fast: _Fn | None = None  # the rule compiled to closures, or None: celpy evaluates it every time

    def check(self, activation: Activation, inputs: Mapping[str, Any]) -> Reason | None:
        """None when the rule holds; a violation or an error reason otherwise. Never raises."""
        try:
            value = Evaluator(self.ast, activation).evaluate()
        except Exception as exc:
            # A bad event is a verdict, not a crash: celpy errors and celpy bugs alike.
            return self.error(_describe_error(exc))
        if isinstance(value, _BOOL_TYPES):
            return None if value else self.violation(inputs)
        return self.error(f"result is {_cel_type_name(value)}, not bool")

    def error(self, text: str) -> Reason:
        """The reason for a rule that could not be evaluated on this event."""
        detail = f"rule {self.name!r} could not be evaluated: {text}"
        return Reason(Code.INVARIANT_ERROR, detail, self.severity)

    def violation(self, inputs: Mapping[str, Any]) -> Reason:
        """The reason for a rule that evaluated to false, quoting the simple values it looked at."""
        quoted = []
        for path in self.paths:
            found, value = _lookup(inputs.get(path[0]), path[1:])
            text = _format_value(value) if found else None
            if text is not None:
                quoted.append(f"{'.'.join(path)}={text}")
        detail = f"rule {self.name!r} failed: {self.message or self.expr}"
        if quoted:
            detail += f" ({', '.join(quoted)})"
        return Reason(Code.INVARIANT_VIOLATED, detail, self.severity)


def _compile_one(spec: RuleSpec) -> _Rule:
    if not isinstance(spec.name, str) or not spec.name.strip():
        raise RuleCompileError(f"invariant rule with an empty name (expression {spec.expr!r})")
    try:
        severity = Severity(spec.severity)
    except ValueError:
        raise RuleCompileError(
            f"rule {spec.name!r}: unknown severity {spec.severity!r} (reject, warn or off)"
        ) from None
    if not isinstance(spec.expr, str) or not spec.expr.strip():
        raise RuleCompileError(f"rule {spec.name!r}: empty expression")
    try:
        ast = _env().compile(spec.expr)
    except CELParseError as exc:
        raise RuleCompileError(f"rule {spec.name!r}: {_syntax_error(spec.expr, exc)}") from exc
    except Exception as exc:
        raise RuleCompileError(f"rule {spec.name!r}: cannot compile {spec.expr!r}: {exc}") from exc
    try:
        roots = _check_names(ast)
    except ValueError as exc:
        raise RuleCompileError(f"rule {spec.name!r}: {exc} in {spec.expr!r}") from exc
    return _Rule(spec.name, spec.expr, severity, spec.message, ast, _quoted_paths(ast), roots, _compile_fast(ast))


def compile_rules(specs: Sequence[RuleSpec]) -> RuleSet:
    """Compile rule specs into a RuleSet; raise RuleCompileError naming the first rule that is refused.

    Rules with severity ``off`` are checked for errors but never evaluated.
    """
    rules: list[_Rule] = []
    names: set[str] = set()
    for spec in specs:
        rule = _compile_one(spec)
        if rule.name in names:
            raise RuleCompileError(f"rule {rule.name!r} is defined twice")
        names.add(rule.name)
        if rule.severity is not Severity.OFF:
            rules.append(rule)
    return RuleSet(tuple(rules))


class RuleSet:
    """The compiled invariant rules of one event type; evaluate() them against each event."""

    __slots__ = ("_fast_roots", "_generated", "_generated_names", "_roots", "_rules", "_uses_event", "_uses_last",
                 "plan")

    def __init__(self, rules: tuple[_Rule, ...] = (), *, generate: bool = True) -> None:
        self._rules = rules
        self._generated, self._generated_names = _generate(rules) if generate else (None, ())
        self._roots = frozenset[str]().union(*(rule.roots for rule in rules))
        fast = [rule.roots for rule in rules if rule.fast is not None]
        self._fast_roots = frozenset[str]().union(*fast) if fast else None
        self._uses_last = "last" in self._roots or "has_last" in self._roots
        # A violation quotes `event.x` paths even where `event` is a macro's own variable: those read the
        # attributes too.
        self._uses_event = "event" in self._roots or any(
            path[0] == "event" for rule in rules for path in rule.paths)
        #: For the engine's clean path, in one attribute read: (the generated function or None, uses_last,
        #: uses_event); None when there is no rule to evaluate.
        self.plan: tuple[_Generated | None, bool, bool] | None = \
            (self._generated, self._uses_last, self._uses_event) if rules else None

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"RuleSet({list(self.names)!r})"

    @property
    def uses_last(self) -> bool:
        """Whether any rule reads `last` or `has_last`: if not, callers need not load last-known-good."""
        return self._uses_last

    @property
    def uses_event(self) -> bool:
        """Whether any rule reads (or quotes) `event`: if not, callers need not build the attributes."""
        return self._uses_event

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the rules that are evaluated, in order."""
        return tuple(rule.name for rule in self._rules)

    @property
    def compiled_fast(self) -> tuple[str, ...]:
        """The names of the rules compiled to closures; the others are evaluated by celpy."""
        return tuple(rule.name for rule in self._rules if rule.fast is not None)

    @property
    def generated(self) -> tuple[str, ...]:
        """The names of the rules also translated into the rule set's generated Python function."""
        return self._generated_names

    def evaluate(self, data: Any, last: Any, *, now: float, event: Mapping[str, Any],
                 from_orjson: bool = False) -> list[Reason]:
        """One Reason per rule that fails (invariant.violated) or cannot be evaluated (invariant.error).

        `data` and `last` are parsed JSON (`last` None when unknown), `now` is epoch seconds and `event`
        holds the envelope attributes. Never raises. `from_orjson` says that `data` and `last` are what
        orjson.loads returned (so only JSON's types, string keys and 64-bit integers), which spares checking
        each flat value of theirs; the outcomes are the same either way.
        """
        if not self._rules:
            return []
        slow = None
        generated = self._generated
        if generated is not None:
            try:
                slow = generated(data, last, now, from_orjson)
            except Exception:  # such as a `now` the rules can't hold: the closures and celpy say what it is
                slow = None
            else:
                if not slow:
                    return []  # every rule holds: decide's first answer, without its call
        return self.decide(slow, data, last, now=now, event=event)

    def decide(self, slow: list[int] | None, data: Any, last: Any, *, now: float,
               event: Mapping[str, Any]) -> list[Reason]:
        """evaluate()'s second step, given its first: `slow` is what the generated function returned (the indexes
        of the rules it could not pass; [] when every rule holds), or None when there is none or it raised."""
        rules = self._rules
        if slow is not None:
            if not slow:
                return []  # every rule holds
            rules = tuple([rules[index] for index in slow])
        return self._decide(rules, data, last, now, event)

    def _decide(self, rules: tuple[_Rule, ...], data: Any, last: Any, now: float,
                event: Mapping[str, Any]) -> list[Reason]:
        """The reasons of `rules` (some of this set's), decided by their closures or by celpy."""
        converted: dict[str, Any] = {}
        env = _NO_ENV
        if self._fast_roots is not None:
            try:
                env = _fast_env(self._fast_roots, data, last, now, event, converted)
            except Exception:  # _Bail, or a failure in spite of the guarded conversions: celpy copes
                converted.clear()
        inputs = {"data": data, "last": last, "event": event}
        activation: Activation | None = None
        reasons = []
        for rule in rules:
            if rule.fast is not None and env is not _NO_ENV:
                try:
                    value = rule.fast(env)
                except _CelError as exc:
                    reasons.append(rule.error(str(exc)))
                    continue
                except Exception:
                    pass  # _Bail, or a failure the fast path did not foresee: celpy's answer is the reference
                else:
                    if type(value) is bool or type(value) is celtypes.BoolType:
                        if not value:
                            reasons.append(rule.violation(inputs))
                    else:
                        reasons.append(rule.error(f"result is {_kind_name(value)}, not bool"))
                    continue
            if activation is None:
                try:
                    activation = _activation(self._roots, data, last, now, event, converted)
                except Exception as exc:  # conversions are guarded one by one; this is only a last resort
                    reasons.append(rule.error(f"cannot prepare the event for rules: {_describe_error(exc)}"))
                    continue
            reason = rule.check(activation, inputs)
            if reason is not None:
                reasons.append(reason)
        return reasons


def _celpy_only(rules: RuleSet) -> RuleSet:
    """The same rules with the fast path off: the reference the differential tests and the benchmark use."""
    return RuleSet(tuple(replace(rule, fast=None) for rule in rules._rules))


def _closures_only(rules: RuleSet) -> RuleSet:
    """The same rules without the generated function: closures, and celpy where they bail."""
    return RuleSet(rules._rules, generate=False)
