"""The benchmark's variants (bench/variants.py) without a broker: a wrapper a variant's kind cannot apply is refused,
not silently ignored; the command line each variant launches; and the order in which the runtime prototypes
(bench/batch_guard.py) send, store and commit, against stand-ins for aiokafka's producer and consumer: the decisions
alone, not what Kafka does with them (the variants run on a broker only in `make bench`)."""

from typing import Any

import pytest

from bench.variants import VARIANTS, Variant


def test_a_wrapper_on_a_byzguard_variant_is_kept() -> None:
    assert VARIANTS["c_gctrace"].wrapper == ("bench.gctrace",)


@pytest.mark.parametrize("kind", ["raw", "faust", "batch"])
def test_a_wrapper_on_another_kind_is_refused(kind: str) -> None:
    with pytest.raises(ValueError, match="only applied to byzguard workers"):
        Variant("x", "x", kind, "at_least_once", wrapper=("bench.gctrace",))


# -- the runtime prototypes and the steady-state input (docs/runtime-choice.md) ---------------------------------

def _launch(key: str, tmp_path: Any) -> Any:
    from pathlib import Path

    from bench.variants import launch

    return launch(VARIANTS[key], run_id=f"r-{key}", bootstrap="127.0.0.1:1", input_topic="in", partitions=2,
                  workdir=tmp_path, repo=Path(__file__).resolve().parents[2])


def test_a_ck_runs_the_confluent_kafka_pass_through(tmp_path: Any) -> None:
    """a_ck launches bench.passthrough_ck with the raw pass-through's arguments."""
    assert _launch("a_ck", tmp_path).worker.argv[1:4] == ["-m", "bench.passthrough_ck", "--broker"]


def test_a_raw_variant_without_a_module_runs_the_aiokafka_pass_through(tmp_path: Any) -> None:
    """a keeps launching bench.passthrough_raw."""
    assert _launch("a", tmp_path).worker.argv[1:3] == ["-m", "bench.passthrough_raw"]


def test_e_eos_runs_the_batched_loop_with_transactions(tmp_path: Any) -> None:
    """e_eos is the batched loop with --eos, reading committed inputs."""
    lnch = _launch("e_eos", tmp_path)
    assert lnch.worker.argv[1:3] == ["-m", "bench.batch_guard"] and lnch.worker.argv[-1] == "--eos"
    assert VARIANTS["e_eos"].read_committed


def test_f_runs_the_faust_agent_fed_per_fetch(tmp_path: Any) -> None:
    """f launches bench.faust_batches with the guard's config (a faust worker, so BYZGUARD_* settings)."""
    lnch = _launch("f", tmp_path)
    assert lnch.worker.argv[1:3] == ["-m", "bench.faust_batches"] and "--config" in lnch.worker.argv


def test_the_confluent_kafka_consumer_avoids_the_fetch_queue_backoff_trap() -> None:
    """librdkafka's 1000 ms fetch.queue.backoff.ms idles a capped consumer; a_ck sets 5 ms and commits by hand."""
    from bench.passthrough_ck import client_configs

    batching = {"fetch_max_wait_ms": 1500, "max_partition_fetch_bytes": 1 << 20, "acks": "all", "linger_ms": 5,
                "max_batch_size": 1 << 16, "max_request_size": 1 << 20}
    consumer, producer = client_configs("b:9092", "g", batching)
    assert consumer["fetch.queue.backoff.ms"] == 5
    assert consumer["enable.auto.commit"] is False and consumer["group.id"] == "g"
    assert producer["acks"] == "all" and producer["linger.ms"] == 5 and producer["batch.size"] == 1 << 16


def test_a_batch_ends_at_its_record_bound_and_after_the_last_message() -> None:
    """chunks() closes a batch (None) every max_records records and after the last one."""
    from bench.batch_guard import chunks

    assert list(chunks([1, 2, 3, 4, 5], 2, 10.0)) == [1, 2, None, 3, 4, None, 5, None]


def test_a_batch_ends_once_its_time_bound_has_passed() -> None:
    """chunks() closes a batch when max_seconds passed since its first record, each batch keeping one record."""
    from bench.batch_guard import chunks

    ticks = iter([0.0, 0.05, 0.2, 0.2, 0.21, 0.5, 0.5])
    assert list(chunks(["a", "b", "c", "d"], 100, 0.1, clock=lambda: next(ticks))) == \
        ["a", "b", None, "c", "d", None]


def test_no_batch_of_an_empty_fetch() -> None:
    """chunks() of no messages yields nothing (no empty transaction)."""
    from bench.batch_guard import chunks

    assert list(chunks([], 10, 0.1)) == []


def test_state_is_stored_only_after_the_batch_in_flight_is_delivered(tmp_path: Any) -> None:
    """A batch's writes are read back while pending and in flight, but reach RocksDB only at store()."""
    from bench.batch_guard import PartitionState

    part = PartitionState(tmp_path, 0)
    try:
        part.pending["entities"][b"k"] = b"v1"
        assert part.readers["entities"].get(b"k") == b"v1"
        part.seal()
        part.pending["entities"][b"k"] = b"v2"
        assert part.readers["entities"].get(b"k") == b"v2"      # pending over in flight
        assert part.db("entities").get(b"k") is None            # nothing on disk before delivery
        part.pending["entities"].clear()
        assert part.readers["entities"].get(b"k") == b"v1"      # in flight over disk
        part.store()
        assert part.db("entities").get(b"k") == b"v1" and not part.in_flight["entities"]
        part.pending["entities"][b"k"] = None
        part.seal()
        assert part.readers["entities"].get(b"k") is None       # a delete in flight hides the stored value
        part.store()
        assert part.db("entities").get(b"k") is None
    finally:
        part.close()


def test_a_partition_has_at_most_one_batch_in_flight(tmp_path: Any) -> None:
    """Sealing a second batch before the first is stored is a bug, refused loudly."""
    from bench.batch_guard import PartitionState

    part = PartitionState(tmp_path, 0)
    try:
        part.pending["entities"][b"k"] = b"v"
        part.seal()
        with pytest.raises(AssertionError):
            part.seal()
    finally:
        part.close()


def test_outputs_go_into_one_record_batch_per_destination() -> None:
    """RecordBatches appends each output to its (topic, partition) batch and opens another when one is full."""
    import asyncio

    from bench.batch_guard import RecordBatches

    class Builder:
        def __init__(self) -> None:
            self.records: list[bytes | None] = []

        def append(self, *, timestamp: Any, key: Any, value: bytes | None, headers: Any) -> object | None:
            if len(self.records) == 2:
                return None
            self.records.append(value)
            return object()

    class Producer:
        def __init__(self) -> None:
            self.sent: list[tuple[str, int, list[bytes | None]]] = []

        def create_batch(self) -> Builder:
            return Builder()

        async def send_batch(self, batch: Builder, topic: str, *, partition: int) -> str:
            self.sent.append((topic, partition, batch.records))
            return "future"

    producer = Producer()
    out = RecordBatches(producer)  # type: ignore[arg-type]
    for value in (b"1", b"2", b"3"):
        out.add("v", 0, None, value)
    out.add("v", 1, None, b"x")
    futures = asyncio.run(out.send())
    assert sorted(producer.sent) == [("v", 0, [b"1", b"2"]), ("v", 0, [b"3"]), ("v", 1, [b"x"])]
    assert len(futures) == 3 and out.records == 0 and not out.open


def test_the_timed_part_of_a_steady_state_input_leaves_the_history_out() -> None:
    """timed_span() counts and spans only outputs whose input sequence number is past the history."""
    from bench.scenarios import timed_span

    samples = [(1000, 0), (1500, 1), (1400, 2), (2000, 3), (9000, None)]
    assert timed_span(samples, 2) == (2, 1400, 2000)
    assert timed_span(samples, 10) == (0, None, None)


def test_the_sequence_number_is_read_from_the_output_headers() -> None:
    """seq_of() reads bench_seq and gives None without it."""
    from bench import events
    from bench.scenarios import seq_of

    assert seq_of([("x", b"1"), (events.SEQ_HEADER, b"42")]) == 42
    assert seq_of([]) is None and seq_of(None) is None


def test_a_steady_state_run_produces_the_history_before_the_timed_events() -> None:
    """--history N makes each entity's first N events the untimed part of the input."""
    from bench.run import parse_args

    args = parse_args(["--events", "100", "--entities", "10", "--history", "40"])
    assert args.history * args.entities == 400
    assert parse_args([]).history == 0


def test_a_ck_lib_keeps_librdkafkas_own_producer_batching(tmp_path: Any) -> None:
    """a_ck_lib passes --librdkafka-batching, which leaves linger.ms and batch.size to librdkafka."""
    from bench.passthrough_ck import client_configs

    assert _launch("a_ck_lib", tmp_path).worker.argv[-1] == "--librdkafka-batching"
    batching = {"fetch_max_wait_ms": 1500, "max_partition_fetch_bytes": 1 << 20, "acks": "all", "linger_ms": 0,
                "max_batch_size": 1 << 14, "max_request_size": 1 << 20}
    _, producer = client_configs("b:9092", "g", batching, librdkafka_batching=True)
    assert "linger.ms" not in producer and "batch.size" not in producer


@pytest.mark.parametrize("commit_behind", [False, True])
def test_at_least_once_stores_a_batch_after_its_outputs_and_commits_after_its_state(tmp_path: Any,
                                                                                   commit_behind: bool) -> None:
    """AloBatches: fetch N's outputs acknowledged, then its state in RocksDB, then its offsets committed, while
    fetch N+1 is already processed (reading N's state through the overlay); also with the commit behind the loop."""
    import asyncio
    from types import SimpleNamespace

    from aiokafka import TopicPartition

    from bench.batch_guard import AloBatches, PartitionState

    log: list[str] = []
    tp = TopicPartition("in", 0)
    part = PartitionState(tmp_path, 0)

    class FakeLoop:
        def part(self, _tp: TopicPartition) -> PartitionState:
            return part

        def process(self, p: PartitionState, msg: Any, out: Any) -> None:
            log.append(f"process {msg.offset} sees {p.readers['entities'].get(b'k')!r}")
            p.pending["entities"][b"k"] = str(msg.offset).encode()
            out.add("v", 0, None, b"x")

        def changelog_records(self, p: PartitionState, out: Any) -> None:
            pass

    class Producer:
        def create_batch(self) -> Any:
            return SimpleNamespace(append=lambda **kw: object())

        async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            n = sum(1 for line in log if line.startswith("sent"))
            log.append(f"sent {n}")

            def ack() -> None:
                log.append(f"acked {n}; on disk {part.db('entities').get(b'k')!r}")
                fut.set_result(None)
            asyncio.get_running_loop().call_later(0.01 * (n + 1), ack)
            return fut

    class Consumer:
        async def commit(self, offsets: Any) -> None:
            log.append(f"commit {offsets[tp].offset}; on disk {part.db('entities').get(b'k')!r}")

    async def run() -> None:
        batches = AloBatches(FakeLoop(), Consumer(), Producer(), commit_behind=commit_behind)  # type: ignore[arg-type]
        await batches.step({tp: [SimpleNamespace(offset=0)]})
        await batches.step({tp: [SimpleNamespace(offset=1)]})
        await batches.finish()

    try:
        asyncio.run(run())
    finally:
        part.close()
    assert log == ["process 0 sees None", "sent 0",
                   "process 1 sees b'0'", "sent 1",          # fetch 1 reads fetch 0's state in flight
                   "acked 0; on disk None", "commit 1; on disk b'0'",
                   "acked 1; on disk b'0'", "commit 2; on disk b'1'"]


def test_exactly_once_writes_the_state_only_after_the_transaction_committed(tmp_path: Any) -> None:
    """e_eos: outputs and input offsets go into one transaction; RocksDB gets the batch's state after the commit,
    and an aborted transaction leaves the state unwritten."""
    import asyncio
    from types import SimpleNamespace

    from aiokafka import TopicPartition

    from bench.batch_guard import Loop, PartitionState, RecordBatches

    log: list[str] = []
    part = PartitionState(tmp_path, 0)

    class Txn:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def create_batch(self) -> Any:
            return SimpleNamespace(append=lambda **kw: object())

        async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
            log.append(f"send {topic}")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

        async def begin_transaction(self) -> None:
            log.append("begin")

        async def send_offsets_to_transaction(self, offsets: Any, group: str) -> None:
            log.append(f"offsets {offsets[TopicPartition('in', 0)]} {group}")

        async def commit_transaction(self) -> None:
            if self.fail:
                raise RuntimeError("fenced")
            log.append(f"commit; on disk {part.db('entities').get(b'k')!r}")

        async def abort_transaction(self) -> None:
            log.append("abort")

    loop = SimpleNamespace(app_id="g")

    async def batch(txn: Txn) -> None:
        out = RecordBatches(txn)  # type: ignore[arg-type]
        out.add("v", 0, None, b"x")
        part.pending["entities"][b"k"] = b"1"
        part.seal()
        await Loop._commit_batch(loop, txn, out, part, {TopicPartition("in", 0): 7})  # type: ignore[arg-type]

    try:
        asyncio.run(batch(Txn(fail=False)))
        assert log == ["begin", "send v", "offsets 7 g", "commit; on disk None"]
        assert part.db("entities").get(b"k") == b"1"
        log.clear()
        part.store()
        part.pending["entities"][b"k"] = b"2"
        part.seal()
        part.pending["entities"].clear()
        with pytest.raises(RuntimeError, match="fenced"):
            asyncio.run(Loop._commit_batch(loop, Txn(fail=True), RecordBatches(Txn(fail=True)),  # type: ignore[arg-type]
                                           part, {TopicPartition("in", 0): 8}))
        assert log == ["begin", "offsets 8 g", "abort"] and part.db("entities").get(b"k") == b"1"
    finally:
        part.close()


# -- the product is the batched runtime: c and d; b is faust's own pass-through, the framework's ceiling ---------

@pytest.mark.parametrize(("key", "guarantee"), [("c", "at_least_once"), ("d", "exactly_once")])
def test_c_and_d_run_the_batched_runtime_whose_group_commits_the_inputs(tmp_path: Any, key: str,
                                                                       guarantee: str) -> None:
    """c and d start `byzguard run` (the batched runtime, the only one), watched through the group
    <app_id>-verify."""
    lnch = _launch(key, tmp_path)
    assert "BYZGUARD_RUNTIME" not in lnch.worker.env
    assert lnch.worker.env["BYZGUARD_PROCESSING_GUARANTEE"] == guarantee
    assert lnch.group == f"r-{key}-verify"


def test_the_compared_variants_are_the_pass_throughs_and_the_product() -> None:
    """The default comparison keeps a, a_ck, b (faust's pass-through) and the product c, d; the guard on the removed
    faust agent runtime (cf, df and its diagnostics) is no variant any more."""
    from bench.run import parse_args

    assert parse_args([]).variants == ["a", "a_ck", "b", "c", "d"]
    assert VARIANTS["b"].kind == "faust"
    assert not [k for k in VARIANTS if k.startswith(("cf", "df"))]


def test_a_report_of_a_run_with_a_removed_variant_still_renders() -> None:
    """Results recorded with cf and df (bench/results/) still render: their label says the variant was removed."""
    from bench.report import label

    assert label("c") == VARIANTS["c"].label
    assert label("cf") == "cf (a variant since removed)"


def test_the_second_worker_of_the_two_worker_run_shares_the_group_but_not_the_data_dir(tmp_path: Any) -> None:
    """bench.pair.second_worker keeps the app id and config of the first worker, with its own data dir and port."""
    from bench.pair import second_worker

    first = _launch("d", tmp_path).worker
    second = second_worker(first)
    assert second.env["BYZGUARD_APP_ID"] == first.env["BYZGUARD_APP_ID"]
    assert second.env["BYZGUARD_CONFIG"] == first.env["BYZGUARD_CONFIG"] and second.argv == first.argv
    assert second.env["BYZGUARD_DATA_DIR"] != first.env["BYZGUARD_DATA_DIR"]
    assert second.env["BYZGUARD_WEB_PORT"] != first.env["BYZGUARD_WEB_PORT"]
    assert second.log_path != first.log_path


def test_each_latency_run_is_paced_at_half_of_its_own_throughput() -> None:
    """report.half_of takes 50% of a variant's own median events/s, None where it has no throughput."""
    from bench import report

    results = {"throughput": {"summary": {"c": {"events_per_s": {"median": 4000.0}},
                                          "d": {"events_per_s": {"median": 3000.0}}}}}
    assert report.half_of(results, "d") == 1500.0 and report.half_of_c(results) == 2000.0
    assert report.half_of(results, "a") is None


def test_the_report_shows_the_targets_of_the_product() -> None:
    """c/a, d/c, a_ck/a and c/a_ck are reported, with the targets c/a 0.4 and d/c 0.7."""
    from bench import report

    runs = [{"variant": k, "rep": 1, "events_per_s": v} for k, v in
            (("a", 10_000.0), ("a_ck", 40_000.0), ("c", 5_000.0), ("d", 4_000.0))]
    out = report.ratios(runs)
    assert out["c/a"] == {"of_medians": 0.5, "per_rep": [0.5], "target": 0.4}
    assert out["d/c"]["of_medians"] == 0.8 and out["d/c"]["target"] == 0.7
    assert out["a_ck/a"]["of_medians"] == 4.0 and out["c/a_ck"]["of_medians"] == 0.125


def test_the_memory_phase_takes_only_a_byzguard_worker() -> None:
    """--memory-variant: a worker without byzguard's state changelog (a pass-through, a prototype) is refused at
    once, instead of failing the phase after its topics were made."""
    from bench.run import parse_args

    assert parse_args(["--memory-variant", "d"]).memory_variant == "d"
    assert parse_args([]).memory_variant == "c_norules"
    for key in ("a", "b", "e"):
        with pytest.raises(SystemExit):
            parse_args(["--memory-variant", key])


class _Held:
    """A confluent-kafka consumer's local queue: `poll` and `consume` as librdkafka's (consume waits for its count
    or the whole timeout), recording the waits asked for."""

    def __init__(self, held: int) -> None:
        self.held = list(range(held))
        self.waits: list[float] = []

    def poll(self, timeout: float) -> int | None:
        self.waits.append(timeout if not self.held else 0.0)
        return self.held.pop(0) if self.held else None

    def consume(self, num_messages: int, timeout: float) -> list[int]:
        if len(self.held) < num_messages:
            self.waits.append(timeout)  # librdkafka waits for the rest until the timeout
        out, self.held = self.held[:num_messages], self.held[num_messages:]
        return out


def test_the_confluent_kafka_pass_through_takes_what_is_held_without_waiting_for_more() -> None:
    """a_ck and the latency phase's confluent reader never wait for a full batch: 3 records held come back at once,
    the rest of the queue's records up to the bound on the next call, and nothing held waits the poll's timeout."""
    from bench.passthrough_ck import take

    held = _Held(3)
    assert take(held, 1000, 0.2) == [0, 1, 2]
    assert held.waits == [0.0, 0]
    assert take(held, 1000, 0.2) == [] and held.waits[-1] == 0.2
    many = _Held(2500)
    assert take(many, 1000, 0.2) == list(range(1000)) and take(many, 1000, 0.2) == list(range(1000, 2000))
    assert all(w == 0 for w in many.waits)


def test_the_confluent_latency_clients_place_keys_as_aiokafka_and_read_committed_for_exactly_once() -> None:
    """The latency phase's confluent pair: linger 0, acks all, murmur2 placement (aiokafka's), the reader's isolation
    and fetch wait as asked."""
    from bench.latency_clients import CLIENTS, clients, confluent_configs

    producer, reader = confluent_configs("b:9092", read_committed=True, reader_wait_ms=7, group="g")
    assert producer["linger.ms"] == 0 and producer["acks"] == "all" and producer["partitioner"] == "murmur2_random"
    assert reader["isolation.level"] == "read_committed" and reader["fetch.wait.max.ms"] == 7
    assert confluent_configs("b:9092", read_committed=False, reader_wait_ms=7, group="g")[1]["isolation.level"] == \
        "read_uncommitted"
    assert CLIENTS == ("aiokafka", "confluent")
    with pytest.raises(ValueError, match="unknown latency client"):
        clients("kafka-python", "b:9092", read_committed=False, reader_wait_ms=100)


def test_a_ck1_and_the_latency_producer_keep_one_produce_request_in_flight_as_aiokafka(tmp_path: Any) -> None:
    """a_ck1 passes --in-flight 1 (librdkafka's max.in.flight per connection); the latency phase's confluent
    producer always has one in flight; a_ck keeps librdkafka's default."""
    from bench.latency_clients import confluent_configs
    from bench.passthrough_ck import client_configs

    assert _launch("a_ck1", tmp_path).worker.argv[-2:] == ["--in-flight", "1"]
    batching = {"fetch_max_wait_ms": 10, "max_partition_fetch_bytes": 1 << 20, "acks": "all", "linger_ms": 0,
                "max_batch_size": 1 << 16, "max_request_size": 1 << 20}
    assert client_configs("b:9092", "g", batching, in_flight=1)[1]["max.in.flight.requests.per.connection"] == 1
    assert "max.in.flight.requests.per.connection" not in client_configs("b:9092", "g", batching)[1]
    producer, _ = confluent_configs("b:9092", read_committed=False, reader_wait_ms=100, group="g")
    assert producer["max.in.flight.requests.per.connection"] == 1
