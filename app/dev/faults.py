"""Labeled fault injection and its score: the seed's services sending clean traffic with each Byzantine
failure of the catalogue mixed in, and what the guard made of every record.

The labels never travel in the records. The generator keeps them (the ground truth, keyed by event id and
value fingerprint); `score` matches them with what came out of the verified and quarantine topics. A
correct guard quarantines, warns about or drops each fault with the code the catalogue expects, passes
every clean event, and loses nothing. Pure: no I/O, no clock (callers pass `now`), no Kafka.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

import orjson
import xxhash

from byzguard.clocks import VectorClock
from byzguard.envelope import CE_ID
from byzguard.integrity import HMAC_SHA256, Key
from byzguard.routing import H_REASONS, H_VERDICT, decode_reasons
from byzguard.stamp import Stamped, Stamper, rfc3339
from byzguard.verdict import Code

PRICING: Final = "pricing"
ORDERS: Final = "orders"
PAYMENTS: Final = "payments"
PERMISSIONS: Final = "permissions"
SERVICES: Final = (PRICING, ORDERS, PAYMENTS, PERMISSIONS)

# The event type each of the seed's services emits.
EVENT_TYPES: Final[Mapping[str, str]] = {
    PRICING: "price.updated",
    ORDERS: "order.confirmed",
    PAYMENTS: "payment.captured",
    PERMISSIONS: "role.changed",
}

ROLES: Final = ("viewer", "member", "admin")
AUDITED_TYPE: Final = "order.confirmed"  # the left side of the orders/payments audit: partial writes show here
SKEW_AHEAD: Final = 30.0            # the seed's machine whose clock is 30 seconds ahead
SKEW_BEHIND: Final = 2 * 86_400.0   # a producer far behind: older than any type's max age


class FaultClass(StrEnum):
    """The failures of the catalogue, as the generator injects them."""

    STALE_CACHE = "stale_cache"
    SPLIT_BRAIN = "split_brain"
    PARTIAL_WRITE = "partial_write"
    SILENT_CORRUPTION = "silent_corruption"
    CLOCK_AHEAD = "clock_ahead"
    CLOCK_BEHIND = "clock_behind"
    DUPLICATE = "duplicate"
    ID_REUSE = "id_reuse"
    FORGED_SOURCE = "forged_source"
    IMPLAUSIBLE_PRICE = "implausible_price"
    ZERO_PRICE_UNKNOWN = "zero_price_unknown"


class Expect(StrEnum):
    """What a correct guard does with a record."""

    PASS = "pass"              # verified topic, verdict pass
    WARN = "warn"              # verified topic, verdict warn, with an expected code
    QUARANTINE = "quarantine"  # quarantine topic, with an expected code
    DROP = "drop"              # counted as a duplicate: in neither topic
    AUDIT = "audit"            # passes every per-event check; only a cross-stream audit can see the fault


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """How a fault class is made and how it should be caught."""

    fault: FaultClass
    expect: Expect
    codes: frozenset[Code]
    story: str


SPECS: Final[Mapping[FaultClass, FaultSpec]] = {s.fault: s for s in (
    FaultSpec(FaultClass.STALE_CACHE, Expect.QUARANTINE, frozenset({Code.VERSION_REGRESSION}),
              "a cache re-sends an older version of a price"),
    FaultSpec(FaultClass.SPLIT_BRAIN, Expect.QUARANTINE, frozenset({Code.VCLOCK_STALE}),
              "a role read from a lagging replica: its vector clock is behind the verified one"),
    FaultSpec(FaultClass.PARTIAL_WRITE, Expect.AUDIT, frozenset(),
              "an order is confirmed and its payment never comes"),
    FaultSpec(FaultClass.SILENT_CORRUPTION, Expect.QUARANTINE,
              frozenset({Code.INTEGRITY_MISMATCH, Code.INTEGRITY_BAD_MAC}),
              "one bit of the value flipped after the checksum or MAC was computed"),
    FaultSpec(FaultClass.CLOCK_AHEAD, Expect.QUARANTINE, frozenset({Code.TIME_FUTURE}),
              f"a producer whose clock is {SKEW_AHEAD:g} s ahead"),
    FaultSpec(FaultClass.CLOCK_BEHIND, Expect.QUARANTINE, frozenset({Code.TIME_STALE}),
              f"a producer whose clock is {SKEW_BEHIND / 86_400:g} days behind"),
    FaultSpec(FaultClass.DUPLICATE, Expect.DROP, frozenset({Code.ID_DUPLICATE}),
              "a retry re-sends a record that was already delivered"),
    FaultSpec(FaultClass.ID_REUSE, Expect.QUARANTINE, frozenset({Code.ID_REUSED}),
              "a new update reuses the event id of an earlier one"),
    FaultSpec(FaultClass.FORGED_SOURCE, Expect.QUARANTINE, frozenset({Code.SOURCE_FORGED}),
              "an event claims another service as its source, signed with the sender's own key"),
    FaultSpec(FaultClass.IMPLAUSIBLE_PRICE, Expect.WARN, frozenset({Code.INVARIANT_VIOLATED}),
              "a price drops to 0.01 from its last verified value (warn, as the seed suggests)"),
    FaultSpec(FaultClass.ZERO_PRICE_UNKNOWN, Expect.QUARANTINE, frozenset({Code.INVARIANT_VIOLATED}),
              "a zero price for a product nobody has priced before"),
)}


def payment_id(order_id: str) -> str:
    """The id of an order's payment: the key the orders/payments audit joins on."""
    return f"pay-{order_id}"


def fingerprint(value: bytes) -> str:
    """A short fingerprint of a record's value bytes (tells apart records that share an event id)."""
    return xxhash.xxh3_64_hexdigest(value)


@dataclass(frozen=True, slots=True)
class Label:
    """The ground truth about one sent record. Kept by the generator, never written into the record."""

    seq: int
    event_id: str
    fingerprint: str
    service: str               # whose producer sent it
    topic: str
    event_type: str
    subject: str
    fault: FaultClass | None   # None: a clean event
    expect: Expect
    codes: frozenset[Code]     # any of these is the right catch
    detail: str

    @property
    def name(self) -> str:
        """The fault class, or "clean"."""
        return self.fault.value if self.fault is not None else "clean"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the demo's truth file)."""
        return {"seq": self.seq, "event_id": self.event_id, "fingerprint": self.fingerprint,
                "service": self.service, "topic": self.topic, "type": self.event_type, "subject": self.subject,
                "class": self.name, "expect": self.expect.value, "codes": sorted(c.value for c in self.codes),
                "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Injection:
    """One record to send, which service's producer sends it, and its label."""

    topic: str
    record: Stamped
    sender: str
    label: Label


@dataclass
class _Price:
    sku: str
    version: int
    price: float
    history: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # verified (version, data)
    last: Stamped | None = None


@dataclass
class _User:
    user: str
    clock: VectorClock
    role: str
    history: list[tuple[VectorClock, str]] = field(default_factory=list)
    last: Stamped | None = None


@dataclass
class _Due:
    order_id: str
    amount: float
    due: int


class TrafficGenerator:
    """The seed's four services producing clean traffic with faults injected at `rate` per class.

    `stampers` maps each service to its producer's Stamper (its Lamport clock and checksum or MAC);
    `topics` maps each service to the input topic it writes. `forger_key`, a MAC key of one service,
    lets that service forge events of another (FORGED_SOURCE); without it that class is not injected.
    Each class is injected at least `min_each` times after the first `warmup` events, so short runs
    cover the whole catalogue; after that each event is a fault of a given class with probability `rate`.
    Injected faults never advance the generator's view of an entity, since the guard must not either.
    """

    def __init__(
        self,
        stampers: Mapping[str, Stamper],
        topics: Mapping[str, str],
        *,
        run_id: str,
        rate: float = 0.02,
        seed: int = 0,
        forger_key: Key | None = None,
        classes: Iterable[FaultClass] = tuple(FaultClass),
        min_each: int = 1,
        warmup: int = 60,
        prices: int = 24,
        users: int = 16,
    ) -> None:
        missing = [s for s in SERVICES if s not in stampers or s not in topics]
        if missing:
            raise ValueError(f"no stamper or topic for service(s) {missing}")
        self.classes = tuple(c for c in classes if c is not FaultClass.FORGED_SOURCE or forger_key is not None)
        if rate < 0 or rate * len(self.classes) > 1:
            raise ValueError(f"rate {rate} per class x {len(self.classes)} classes is not a probability")
        self.stampers = dict(stampers)
        self.topics = dict(topics)
        self.run_id = run_id
        self.rate = rate
        self.rng = random.Random(seed)
        self.forger_key = forger_key
        self.min_each = min_each
        self.warmup = warmup
        self.seq = 0
        self.injected: Counter[FaultClass] = Counter()
        self.labels: list[Label] = []
        self._skus = 0
        self._orders = 0
        self._prices = [self._new_price() for _ in range(prices)]
        self._users = [_User(f"user-{run_id}-{i:03d}", VectorClock(), self.rng.choice(ROLES)) for i in range(users)]
        self._due: deque[_Due] = deque()
        self._recent: deque[Injection] = deque(maxlen=48)  # recent clean records, for duplicates
        self._makers: dict[FaultClass, Callable[[float], Injection | None]] = {
            FaultClass.STALE_CACHE: self._fault_stale_cache,
            FaultClass.SPLIT_BRAIN: self._fault_split_brain,
            FaultClass.PARTIAL_WRITE: self._fault_partial_write,
            FaultClass.SILENT_CORRUPTION: self._fault_silent_corruption,
            FaultClass.CLOCK_AHEAD: self._fault_clock_ahead,
            FaultClass.CLOCK_BEHIND: self._fault_clock_behind,
            FaultClass.DUPLICATE: self._fault_duplicate,
            FaultClass.ID_REUSE: self._fault_id_reuse,
            FaultClass.FORGED_SOURCE: self._fault_forged_source,
            FaultClass.IMPLAUSIBLE_PRICE: self._fault_implausible_price,
            FaultClass.ZERO_PRICE_UNKNOWN: self._fault_zero_price_unknown,
        }

    # ------------------------------------------------------------------ the stream

    def next(self, now: float) -> Injection:
        """The next record: a payment that is due, an injected fault, or a clean event."""
        self.seq += 1
        if self._due and self._due[0].due <= self.seq:
            return self._clean_payment(self._due.popleft(), now)
        fault = self._pick_fault()
        if fault is not None:
            made = self._inject(fault, now)
            if made is not None:
                return made
        return self._clean(now)

    def flush(self, now: float) -> list[Injection]:
        """The payments still due, so that only the injected partial writes lack one when the run ends."""
        out = []
        while self._due:
            self.seq += 1
            out.append(self._clean_payment(self._due.popleft(), now))
        return out

    def inject(self, fault: FaultClass, now: float) -> Injection | None:
        """One record of `fault` now, or None when its preconditions do not hold yet (e.g. no history)."""
        self.seq += 1
        return self._inject(fault, now)

    def _inject(self, fault: FaultClass, now: float) -> Injection | None:
        made = self._makers[fault](now)
        if made is not None:
            self.injected[fault] += 1
        return made

    def _pick_fault(self) -> FaultClass | None:
        if self.seq <= self.warmup or not self.classes:
            return None
        owed = [c for c in self.classes if self.injected[c] < self.min_each]
        if owed and self.seq % 3 == 0:
            return owed[self.seq // 3 % len(owed)]
        roll = self.rng.random()
        index = int(roll / self.rate) if self.rate > 0 else len(self.classes)
        return self.classes[index] if index < len(self.classes) else None

    def _clean(self, now: float) -> Injection:
        roll = self.rng.random()
        if roll < 0.5:
            return self._clean_price(now)
        if roll < 0.75:
            return self._clean_order(now)
        return self._clean_role(now)

    # ------------------------------------------------------------------ stamping and labels

    def _emit(self, service: str, record: Stamped, fault: FaultClass | None, detail: str, *,
              sender: str | None = None, codes: frozenset[Code] | None = None,
              event_type: str | None = None) -> Injection:
        spec = SPECS[fault] if fault is not None else None
        label = Label(
            seq=self.seq, event_id=record.event_id, fingerprint=fingerprint(record.value),
            service=sender or service, topic=self.topics[service], event_type=event_type or EVENT_TYPES[service],
            subject=record.key.decode(), fault=fault, expect=spec.expect if spec is not None else Expect.PASS,
            codes=codes if codes is not None else (spec.codes if spec is not None else frozenset()), detail=detail,
        )
        self.labels.append(label)
        injection = Injection(self.topics[service], record, sender or service, label)
        if fault is None:
            self._recent.append(injection)
        return injection

    def _stamp(self, service: str, data: Any, subject: str, now: float, *, version: int | None = None,
               vclock: VectorClock | None = None, event_id: str | None = None) -> Stamped:
        return self.stampers[service].binary(data, type=EVENT_TYPES[service], subject=subject, version=version,
                                             time=now, vclock=vclock, event_id=event_id or self._event_id())

    def _event_id(self) -> str:
        return f"{self.run_id}-{self.seq:07d}"

    # ------------------------------------------------------------------ the services' clean events

    def _new_price(self) -> _Price:
        self._skus += 1
        return _Price(f"sku-{self.run_id}-{self._skus:03d}", 0, round(self.rng.uniform(5, 100), 2))

    @staticmethod
    def _price_data(p: _Price, price: float, at: float) -> dict[str, Any]:
        return {"productId": p.sku, "price": price, "currency": "USD", "lastUpdated": rfc3339(at)}

    def _next_price(self, p: _Price) -> float:
        # Clean moves stay well inside the 50% plausibility rule.
        return max(0.5, round(p.price * self.rng.uniform(0.95, 1.05), 2)) if p.version else p.price

    def _clean_price(self, now: float) -> Injection:
        p = self.rng.choice(self._prices)
        price = self._next_price(p)
        data = self._price_data(p, price, now)
        record = self._stamp(PRICING, data, p.sku, now, version=p.version + 1)
        p.version += 1
        p.price = price
        p.history = [*p.history, (p.version, data)][-4:]
        p.last = record
        return self._emit(PRICING, record, None, f"{p.sku} v{p.version} price {price}")

    def _order_data(self, order_id: str, total: float) -> dict[str, Any]:
        return {"orderId": order_id, "paymentId": payment_id(order_id), "productId": self.rng.choice(self._prices).sku,
                "quantity": self.rng.randint(1, 3), "total": total, "currency": "USD", "status": "confirmed"}

    def _new_order(self) -> tuple[str, float]:
        self._orders += 1
        return f"order-{self.run_id}-{self._orders:05d}", round(self.rng.uniform(5, 300), 2)

    def _clean_order(self, now: float) -> Injection:
        order_id, total = self._new_order()
        record = self._stamp(ORDERS, self._order_data(order_id, total), order_id, now, version=1)
        self._due.append(_Due(order_id, total, self.seq + self.rng.randint(2, 6)))
        return self._emit(ORDERS, record, None, f"{order_id} confirmed, total {total}")

    def _clean_payment(self, due: _Due, now: float) -> Injection:
        # Keyed by the order id: the payment lands in the order's partition, next to its order.
        data = {"paymentId": payment_id(due.order_id), "orderId": due.order_id, "amount": due.amount,
                "currency": "USD", "status": "captured"}
        record = self._stamp(PAYMENTS, data, due.order_id, now)
        return self._emit(PAYMENTS, record, None, f"{due.order_id} payment captured, {due.amount}")

    def _role_data(self, u: _User, role: str) -> dict[str, Any]:
        return {"userId": u.user, "role": role}

    def _clean_role(self, now: float) -> Injection:
        u = self.rng.choice(self._users)
        role = self.rng.choice([r for r in ROLES if r != u.role])
        clock = u.clock.tick(PERMISSIONS)
        record = self._stamp(PERMISSIONS, self._role_data(u, role), u.user, now, vclock=clock)
        u.clock, u.role, u.last = clock, role, record
        u.history = [*u.history, (clock, role)][-4:]
        return self._emit(PERMISSIONS, record, None, f"{u.user} role {role} at {clock.to_header().decode()}")

    # ------------------------------------------------------------------ the faults

    def _fault_stale_cache(self, now: float) -> Injection | None:
        candidates = [p for p in self._prices if len(p.history) >= 2]
        if not candidates:
            return None
        p = self.rng.choice(candidates)
        version, data = self.rng.choice(p.history[:-1])
        record = self._stamp(PRICING, data, p.sku, now, version=version)
        return self._emit(PRICING, record, FaultClass.STALE_CACHE,
                          f"{p.sku} v{version} (price {data['price']}) re-sent after v{p.version}")

    def _fault_split_brain(self, now: float) -> Injection | None:
        candidates = [u for u in self._users if u.history]
        if not candidates:
            return None
        u = self.rng.choice(candidates)
        if len(u.history) >= 2:
            clock, role = u.history[-2]
        else:  # the replica has the current clock's predecessor state: same clock, the old role
            clock, role = u.clock, self.rng.choice([r for r in ROLES if r != u.role])
        record = self._stamp(PERMISSIONS, self._role_data(u, role), u.user, now, vclock=clock)
        return self._emit(PERMISSIONS, record, FaultClass.SPLIT_BRAIN,
                          f"{u.user} role {role} read at {clock.to_header().decode()}, verified is "
                          f"{u.clock.to_header().decode()}")

    def _fault_partial_write(self, now: float) -> Injection:
        order_id, total = self._new_order()
        record = self._stamp(ORDERS, self._order_data(order_id, total), order_id, now, version=1)
        return self._emit(ORDERS, record, FaultClass.PARTIAL_WRITE, f"{order_id} confirmed, payment never sent")

    def _next_of(self, service: str, now: float, *, at: float | None = None) -> tuple[Stamped, str]:
        """A plausible next event of `service` stamped at time `at`, without advancing any entity."""
        at = now if at is None else at
        if service == PRICING:
            p = self.rng.choice(self._prices)
            price = self._next_price(p)
            record = self._stamp(PRICING, self._price_data(p, price, at), p.sku, at, version=p.version + 1)
            return record, f"{p.sku} v{p.version + 1} price {price}"
        if service == ORDERS:  # an order that is lost leaves no payment behind
            order_id, total = self._new_order()
            return self._stamp(ORDERS, self._order_data(order_id, total), order_id, at, version=1), order_id
        u = self.rng.choice(self._users)
        role = self.rng.choice([r for r in ROLES if r != u.role])
        clock = u.clock.tick(PERMISSIONS)
        record = self._stamp(PERMISSIONS, self._role_data(u, role), u.user, at, vclock=clock)
        return record, f"{u.user} role {role}"

    def _fault_silent_corruption(self, now: float) -> Injection:
        service = self.rng.choice((PRICING, ORDERS, PERMISSIONS))
        record, what = self._next_of(service, now)
        value = bytearray(record.value)
        at = self.rng.randrange(len(value))
        value[at] ^= 1 << self.rng.randrange(8)
        corrupted = replace(record, value=bytes(value))
        code = Code.INTEGRITY_BAD_MAC if self.stampers[service].algorithm == HMAC_SHA256 else Code.INTEGRITY_MISMATCH
        return self._emit(service, corrupted, FaultClass.SILENT_CORRUPTION, f"{what}: bit flipped at byte {at}",
                          codes=frozenset({code}))

    def _fault_clock_ahead(self, now: float) -> Injection:
        service = self.rng.choice((PRICING, ORDERS, PERMISSIONS))
        record, what = self._next_of(service, now, at=now + SKEW_AHEAD)
        return self._emit(service, record, FaultClass.CLOCK_AHEAD, f"{what}, stamped {SKEW_AHEAD:g} s ahead")

    def _fault_clock_behind(self, now: float) -> Injection:
        service = self.rng.choice((PRICING, ORDERS, PERMISSIONS))
        record, what = self._next_of(service, now, at=now - SKEW_BEHIND)
        return self._emit(service, record, FaultClass.CLOCK_BEHIND, f"{what}, stamped {SKEW_BEHIND:g} s behind")

    def _fault_duplicate(self, now: float) -> Injection | None:
        if not self._recent:
            return None
        original = self.rng.choice(self._recent)
        return self._emit(original.label.service, original.record, FaultClass.DUPLICATE,
                          f"re-send of {original.label.event_id} ({original.label.detail})",
                          event_type=original.label.event_type)

    def _fault_id_reuse(self, now: float) -> Injection | None:
        prices = [p for p in self._prices if p.last is not None]
        users = [u for u in self._users if u.last is not None]
        if prices and (not users or self.rng.random() < 0.5):
            p = self.rng.choice(prices)
            assert p.last is not None
            price = self._next_price(p)
            record = self._stamp(PRICING, self._price_data(p, price, now), p.sku, now, version=p.version + 1,
                                 event_id=p.last.event_id)
            return self._emit(PRICING, record, FaultClass.ID_REUSE,
                              f"{p.sku} v{p.version + 1} reuses id {p.last.event_id}")
        if not users:
            return None
        u = self.rng.choice(users)
        assert u.last is not None
        role = self.rng.choice([r for r in ROLES if r != u.role])
        record = self._stamp(PERMISSIONS, self._role_data(u, role), u.user, now, vclock=u.clock.tick(PERMISSIONS),
                             event_id=u.last.event_id)
        return self._emit(PERMISSIONS, record, FaultClass.ID_REUSE, f"{u.user} role {role} reuses id "
                          f"{u.last.event_id}")

    def _fault_forged_source(self, now: float) -> Injection | None:
        key = self.forger_key
        if key is None:
            return None
        victims = [s for s in (PERMISSIONS, ORDERS) if s != key.source]
        victim = self.rng.choice(victims)
        forger = Stamper(victim, algorithm=HMAC_SHA256, key=key)
        if victim == PERMISSIONS:
            u = self.rng.choice(self._users)
            record = forger.binary(self._role_data(u, "admin"), type=EVENT_TYPES[victim], subject=u.user, time=now,
                                   vclock=u.clock.tick(PERMISSIONS), lamport=False, event_id=self._event_id())
            what = f"{u.user} made admin"
        else:
            order_id, total = self._new_order()
            record = forger.binary(self._order_data(order_id, total), type=EVENT_TYPES[victim], subject=order_id,
                                   version=1, time=now, lamport=False, event_id=self._event_id())
            what = f"{order_id} confirmed"
        return self._emit(victim, record, FaultClass.FORGED_SOURCE,
                          f"{what}: claims source {victim!r}, signed with {key.source}'s key {key.key_id!r}",
                          sender=key.source)

    def _fault_implausible_price(self, now: float) -> Injection | None:
        candidates = [p for p in self._prices if p.version >= 1 and p.price >= 1]
        if not candidates:
            return None
        p = self.rng.choice(candidates)
        record = self._stamp(PRICING, self._price_data(p, 0.01, now), p.sku, now, version=p.version + 1)
        # A warning forwards the event, so 0.01 becomes the product's verified price: retire the product, or
        # its next clean price would be a 5000x jump.
        self._prices[self._prices.index(p)] = self._new_price()
        return self._emit(PRICING, record, FaultClass.IMPLAUSIBLE_PRICE,
                          f"{p.sku} v{p.version + 1} price 0.01 after {p.price}")

    def _fault_zero_price_unknown(self, now: float) -> Injection:
        p = self._new_price()
        record = self._stamp(PRICING, self._price_data(p, 0, now), p.sku, now, version=1)
        return self._emit(PRICING, record, FaultClass.ZERO_PRICE_UNKNOWN, f"{p.sku} (never priced) price 0")


# ---------------------------------------------------------------------- what came out, and the score

VERIFIED: Final = "verified"
QUARANTINE: Final = "quarantine"


@dataclass(frozen=True, slots=True)
class Observation:
    """One record read back from a verified or quarantine topic."""

    event_id: str
    fingerprint: str
    where: str                  # VERIFIED or QUARANTINE
    verdict: str                # pass, warn, suspect or reject
    codes: tuple[str, ...]


def observe(where: str, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> Observation | None:
    """An output record as an Observation; None for records that carry no event id (not the generator's)."""
    h = {k: v for k, v in headers}
    raw_id = h.get(CE_ID)
    if raw_id is None:
        return None
    reasons = decode_reasons(h[H_REASONS]) if h.get(H_REASONS) else []
    return Observation(raw_id.decode("utf-8", "replace"), fingerprint(value or b""), where,
                       h.get(H_VERDICT, b"").decode(), tuple(r["code"] for r in reasons))


class Fate(StrEnum):
    """What happened to one labeled record."""

    CAUGHT = "caught"            # flagged (quarantined, warned or dropped) with an expected code
    OTHER_CODE = "other_code"    # flagged, but with none of the expected codes
    MISSED = "missed"            # a fault that went through as clean
    PASSED = "passed"            # a clean (or audit-only) record that went through as clean
    FALSE_POSITIVE = "false_positive"  # a clean record that was flagged
    UNACCOUNTED = "unaccounted"  # in neither topic, and not a dropped duplicate


@dataclass
class ClassScore:
    """The tally of one fault class (or of the clean events)."""

    name: str
    expect: str
    expected_codes: tuple[str, ...]
    sent: int = 0
    fates: Counter[Fate] = field(default_factory=Counter)
    codes_seen: Counter[str] = field(default_factory=Counter)

    @property
    def caught(self) -> int:
        return self.fates[Fate.CAUGHT]


@dataclass
class Report:
    """The score of a run: one row per class, clean events last, plus outputs that match no label."""

    rows: dict[str, ClassScore]
    extra: int = 0
    fates: dict[int, Fate] = field(default_factory=dict)  # label seq -> fate

    @property
    def clean(self) -> ClassScore:
        return self.rows["clean"]

    def unaccounted(self) -> int:
        """Records that ended nowhere (a dropped duplicate is accounted for by the duplicate counter)."""
        return sum(r.fates[Fate.UNACCOUNTED] for r in self.rows.values())

    def false_positives(self) -> int:
        """Clean (or audit-only) events that the guard flagged."""
        return sum(r.fates[Fate.FALSE_POSITIVE] for r in self.rows.values())


def _flagged(obs: Observation) -> bool:
    return obs.where == QUARANTINE or obs.verdict != "pass"


def _fate(label: Label, obs: Observation | None, audited: Collection[str] | None) -> Fate:
    if obs is None:
        return Fate.CAUGHT if label.expect is Expect.DROP else Fate.UNACCOUNTED
    if label.expect in (Expect.PASS, Expect.AUDIT):
        if _flagged(obs):
            return Fate.FALSE_POSITIVE
        if audited is None or label.event_type != AUDITED_TYPE:
            return Fate.PASSED
        if label.expect is Expect.AUDIT:
            return Fate.CAUGHT if label.subject in audited else Fate.MISSED
        return Fate.FALSE_POSITIVE if label.subject in audited else Fate.PASSED
    if label.expect is Expect.DROP or not _flagged(obs):
        return Fate.MISSED  # a duplicate delivered again, or a fault forwarded as clean
    return Fate.CAUGHT if any(c in {x.value for x in label.codes} for c in obs.codes) else Fate.OTHER_CODE


def score(labels: Sequence[Label], observations: Iterable[Observation], *,
          duplicates_counted: int | None = None, audited: Collection[str] | None = None) -> Report:
    """Match outputs to labels (by event id and value fingerprint, in send order) and tally each class.

    A duplicate that is dropped leaves no record; `duplicates_counted` (the guard's duplicate counter over
    the run, when known) says how many drops really happened: drops beyond it are unaccounted. `audited`
    holds the orders a cross-stream audit reported (None: no audit result to score); a partial write is
    caught when its order is among them, and a clean order among them is a false positive.
    """
    rows: dict[str, ClassScore] = {}
    for fault in FaultClass:
        spec = SPECS[fault]
        rows[fault.value] = ClassScore(fault.value, spec.expect.value, tuple(sorted(c.value for c in spec.codes)))
    rows["clean"] = ClassScore("clean", Expect.PASS.value, ())
    pending: dict[tuple[str, str], deque[Label]] = {}
    for label in sorted(labels, key=lambda lb: lb.seq):
        pending.setdefault((label.event_id, label.fingerprint), deque()).append(label)
    matched: dict[int, Observation] = {}
    report = Report(rows)
    for obs in observations:
        if obs.where == QUARANTINE and obs.verdict == "suspect":
            continue  # a fail-open route's record: its verified copy carries the same verdict
        queue = pending.get((obs.event_id, obs.fingerprint))
        if not queue:
            report.extra += 1
            continue
        matched[queue.popleft().seq] = obs
    dropped_budget = duplicates_counted
    for label in labels:
        row = rows[label.name]
        row.sent += 1
        got = matched.get(label.seq)
        fate = _fate(label, got, audited)
        if fate is Fate.CAUGHT and got is None and dropped_budget is not None:
            if dropped_budget > 0:
                dropped_budget -= 1
            else:
                fate = Fate.UNACCOUNTED
        if got is not None:
            row.codes_seen.update(got.codes)
        elif fate is Fate.CAUGHT:
            row.codes_seen[Code.ID_DUPLICATE.value] += 1
        if fate is Fate.CAUGHT and label.expect is Expect.AUDIT:
            row.codes_seen["audit.missing"] += 1
        row.fates[fate] += 1
        report.fates[label.seq] = fate
    return report


def as_json(report: Report) -> bytes:
    """The report as JSON (for the demo's --report file and for tools)."""
    return orjson.dumps({
        "classes": {name: {"expect": r.expect, "expected_codes": list(r.expected_codes), "sent": r.sent,
                           "fates": {f.value: n for f, n in r.fates.items()}, "codes_seen": dict(r.codes_seen)}
                    for name, r in report.rows.items()},
        "extra_outputs": report.extra,
        "false_positives": report.false_positives(),
        "unaccounted": report.unaccounted(),
    }, option=orjson.OPT_INDENT_2)
