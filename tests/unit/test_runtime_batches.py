"""The batched runtime's output batches (app/runtime/batches.py) hold each record as it was added."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import DefaultRecordBatch

from app.runtime.batches import RecordBatches


def _built(headers_of: list[object]) -> list[list[tuple[str, bytes]]]:
    async def run() -> list[list[tuple[str, bytes]]]:
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")  # never started: it only makes batches
        try:
            out = RecordBatches(producer)
            for headers in headers_of:
                out.add("t", 0, b"k", b"v", headers) if headers is not None else out.add("t", 0, b"k", b"v")
            (builder,) = out.open.values()
            return [list(r.headers) for r in DefaultRecordBatch(bytes(builder._build()))]
        finally:
            await producer.stop()
    return asyncio.run(run())


def test_headers_given_as_a_list_a_tuple_or_not_at_all_reach_the_batch_as_given() -> None:
    """A list goes in without a copy, a tuple (aiokafka's builder refuses one) as a list, none as no headers."""
    listed = [("a", b"1"), ("b", b"2")]
    built = _built([listed, (("c", b"3"),), (), None])
    assert built == [[("a", b"1"), ("b", b"2")], [("c", b"3")], [], []]


def test_a_header_list_changed_after_it_was_added_leaves_the_added_record_as_it_was() -> None:
    """aiokafka's builder encodes a record when it is added: the list passed without a copy is not kept."""
    async def run() -> list[tuple[str, bytes]]:
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
        try:
            out = RecordBatches(producer)
            headers = [("a", b"1")]
            out.add("t", 0, b"k", b"v", headers)
            headers[0] = ("z", b"9")
            headers.append(("b", b"2"))
            (builder,) = out.open.values()
            (record,) = list(DefaultRecordBatch(bytes(builder._build())))
            return list(record.headers)
        finally:
            await producer.stop()
    assert asyncio.run(run()) == [("a", b"1")]
