"""Domain invariant rules: declarative CEL expressions per event type, evaluated without Python eval.

A rule says what must be true of an event for it to be plausible, in CEL (the Common Expression
Language, as Confluent data contracts use), e.g. the seed article's price invariants::

    data.price > 0
    data.currency.matches("^[A-Z]{3}$")
    last == null || abs(data.price - last.price) / last.price < 0.5
    now - timestamp(data.lastUpdated) < duration("24h")

Variables an expression can use:

- ``data``: the event's parsed JSON data (map, list or scalar).
- ``last``: the entity's last-known-good data, or ``null`` when there is none.
- ``has_last``: ``last != null``, as a bool.
- ``now``: the current time, a CEL timestamp.
- ``event``: envelope attributes: ``id``, ``source``, ``type``, ``subject`` (strings or null),
  ``time`` (timestamp or null) and ``version`` (int or null), plus any other attribute given
  (such as ``lamport``, an int).

Numbers. JSON has a single number type and the seed's producers are TypeScript, where every number is a
double; CEL's own JSON mapping (google.protobuf.Value) agrees. So every JSON number in ``data`` and ``last``
is a CEL double, whether it was written ``50`` or ``49.99``: ``data.price - last.price`` never trips over
int-versus-double. Int literals in rules mix freely with those doubles: comparisons and equality across
int, uint and double compare numeric values (as the CEL spec's heterogeneous equality and cross-type
comparisons do), and, as a deliberate leniency beyond strict CEL, ``+ - * /`` with one double operand
promote the other to double, so ``data.price > 0`` and ``data.price * 2 < last.price`` both work.
Equality between values of different kinds is ``false`` rather than an error, so ``data.x == null`` is
safe on any present field (a missing one is an error: test it with ``has(data.x)``). Use ``int(data.n)``
for integer arithmetic such as ``%``; use strings for ids beyond 2^53.

Extra functions: ``abs(x)`` (also spelled ``math.abs(x)`` as in cel-go's math extension).

Evaluation never raises: a rule that is false yields ``invariant.violated``; one that errors (missing field,
type mismatch, unparsable timestamp, a value CEL can't hold such as an integer beyond double range or
containers nested 1,024 levels deep or more, deeper than orjson parses) or returns a non-bool yields
``invariant.error``, both with the rule's severity. A rule that does not parse,
or names an unknown variable or function, is refused at start with ``RuleCompileError``.

Cost: an empty RuleSet returns at once, and only the variables some rule uses are prepared. celpy walks
a rule's parse tree on every evaluation (0.1-0.6 ms a rule), so at compile time each rule written in the
common subset of CEL (literals, the five variables, field selection and indexing, ``has``, ``! -``,
arithmetic, comparisons, ``&& || ?:``, ``in``, list and constant map literals, ``size matches startsWith
endsWith contains abs int double string timestamp duration``) is also compiled into nested Python
closures that compute what celpy would, reading the event's JSON as parsed: a few µs a rule. Rules outside
that subset (macros such as ``all()``, ``type()``, map literals with computed values...) are evaluated by
celpy, as is any event the closures can't decide (such as ``true + 1``, which celpy computes its own way),
so both paths give the same outcomes; differential tests keep them honest. ``RuleSet.compiled_fast`` names
the rules on the fast path.

On top of the closures, the rules of one event type are translated once, from the configuration only, into
the source of one Python function (compiled with ``compile()``) for their expected case: type-guarded reads
of plain JSON numbers, strings, timestamps. It decides every rule that holds in well under a µs each; a rule
it cannot show true (a failed guard, a violation, an error) goes to the closures, which decide and word
it. ``RuleSet.generated`` names the rules in that function. Its source holds no constant and no event
value: constants, field names and patterns are bound as names. ``now - timestamp(x) < duration(...)``
(any ordering) is decided there in seconds, without making a datetime of ``now``, wherever it is more than a
millisecond from the limit. The engine passes ``from_orjson=True``: values orjson parsed always convert to
CEL, so the function reads them without first walking them to check that.

The package, one module per concern: ``environment`` (variables, functions, CEL's numbers for celpy, the
parser), ``wording`` (celpy's errors reworded, values quoted), ``conversion`` (values as CEL values),
``operators`` (the fast path's operators), ``closures`` (rules compiled to closures), ``generated`` (the
rule set's generated function) and ``ruleset`` (the API re-exported here).
"""

from __future__ import annotations

from byzguard.rules.environment import VARIABLES
from byzguard.rules.ruleset import RuleSet, RuleSpec, compile_rules

__all__ = ["VARIABLES", "RuleSet", "RuleSpec", "compile_rules"]
