"""kcat as a user's producer, on the real broker: the script of docs/sending-events.md ("From kcat"), taken from
the Markdown and run as written (but for its topic name), and as a user gets it wrong.

kcat is librdkafka: its default partitioner is `consistent_random` (CRC32 of the key), not Kafka's murmur2, so
a record sent without `-X partitioner=murmur2_random` may land outside its entity's partition.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from byzguard.partitioner import partition_for
from tests.conftest import run_async
from tests.integration.users_clients import (
    REPO,
    PricesWorker,
    crc32_partition,
    kcat_path,
    split_subjects,
    start_prices_worker,
)
from tests.integration.worker_harness import Out, WorkerFactory, by_id, collect, wait_caught_up

pytestmark = pytest.mark.kafka

SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
MURMUR2 = " -X partitioner=murmur2_random"
KEY = ' -k "$subject"'
KCAT = "kcat -P "


def documented_script() -> str:
    """The kcat script of docs/sending-events.md, as a user copies it."""
    blocks = [b for b in SH_BLOCK.findall((REPO / "docs" / "sending-events.md").read_text()) if KCAT in b]
    assert len(blocks) == 1, "docs/sending-events.md should have one ```sh block that sends with kcat"
    script = blocks[0]
    for part in (MURMUR2, KEY, " -t prices "):
        assert script.count(part) == 1, f"the documented script no longer has {part!r} once"
    return script


class Sender:
    """Runs a variant of the documented script against a test's worker; returns the event id it printed."""

    def __init__(self, prices: PricesWorker, bootstrap: str, tmp_path: Path) -> None:
        kcat_path()
        self.dir = tmp_path / "kcat"
        self.dir.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BYZGUARD_")}
        self.env.update({"BYZGUARD_BROKER": bootstrap, "BYZGUARD_KEY_PRICING_1": prices.secret})
        self.script = documented_script().replace(" -t prices ", f" -t {prices.topic} ")

    def send(self, subject: str, version: int, price: str = "49.99", *, murmur2: bool = True, key: bool = True,
             tamper: bool = False) -> str:
        script = self.script
        if not murmur2:  # the user left out the partitioner setting
            script = script.replace(MURMUR2, "")
        if not key:  # the user left out -k
            script = script.replace(KEY, "")
        if tamper:  # the value changes after it was signed, before kcat reads it
            script = script.replace(KCAT, "sed -i 's/\"price\":[0-9.]*/\"price\":1/' value.json\n" + KCAT)
        path = self.dir / "send-price.sh"
        path.write_text(script)
        done = subprocess.run(["sh", str(path), subject, str(version), price], cwd=self.dir, env=self.env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"the kcat script failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        sent = re.fullmatch(r"sent (\S+)\n", done.stdout)
        assert sent, done.stdout
        return sent.group(1)


def outputs(factory: WorkerFactory, prices: PricesWorker, sent: int, verified: int) -> tuple[dict[str, list[Out]],
                                                                                           dict[str, list[Out]]]:
    """The verified and quarantined records by event id, once the worker committed everything sent."""
    bootstrap = factory.bootstrap
    run_async(lambda: wait_caught_up(bootstrap, factory.app_id, [prices.topic], workers=[prices.worker]))
    passed = by_id(run_async(lambda: collect(bootstrap, prices.verified, expected=verified)))
    refused = by_id(run_async(lambda: collect(bootstrap, prices.quarantine, expected=sent - verified)))
    assert not set(passed) & set(refused), "a record reached both outputs"
    assert all(len(v) == 1 for v in [*passed.values(), *refused.values()]), "a record came out twice"
    return passed, refused


def test_kcat_as_documented_is_verified_a_changed_value_and_a_missing_key_are_not(
        worker_factory: WorkerFactory, tmp_path: Path) -> None:
    """Prices sent by the documented kcat script are verified in their entity's partition (also for keys CRC32
    places elsewhere, and a UTF-8 key); the same script with its value changed after signing is integrity.bad_mac,
    and without -k decode.key_mismatch."""
    prices = start_prices_worker(worker_factory, tmp_path)
    sender = Sender(prices, worker_factory.bootstrap, tmp_path)
    apart, alike = split_subjects("sku", 2, 1, prices.partitions)
    clean = [sender.send(s, v) for v in (1, 2) for s in [*apart, *alike, "sku-é-日本"]]
    tampered = sender.send(apart[0], 3, tamper=True)
    keyless = sender.send(apart[1], 3, key=False)

    passed, refused = outputs(worker_factory, prices, len(clean) + 2, len(clean))
    assert set(passed) == set(clean), {i: o[0].codes for i, o in refused.items()}
    for event_id in clean:
        out = passed[event_id][0]
        assert out.key is not None and out.partition == partition_for(out.key, prices.partitions)
        assert out.codes == set(), out.reasons
    assert set(refused) == {tampered, keyless}
    assert refused[tampered][0].codes == {"integrity.bad_mac"}, refused[tampered][0].reasons
    assert refused[keyless][0].codes == {"decode.key_mismatch"}, refused[keyless][0].reasons


def test_kcat_with_its_default_partitioner_is_caught_where_it_misplaces_a_record(
        worker_factory: WorkerFactory, tmp_path: Path) -> None:
    """Without -X partitioner=murmur2_random, a newer price that kcat puts outside its entity's partition is
    decode.wrong_partition (its detail names the partition and the setting), never verified, while one whose key
    CRC32 happens to place right is verified."""
    prices = start_prices_worker(worker_factory, tmp_path)
    sender = Sender(prices, worker_factory.bootstrap, tmp_path)
    apart, alike = split_subjects("sku", 3, 1, prices.partitions)
    history = [sender.send(s, 1) for s in apart + alike]
    misplaced = {sender.send(s, 2, murmur2=False): s for s in apart}
    lucky = sender.send(alike[0], 2, murmur2=False)

    passed, refused = outputs(worker_factory, prices, len(history) + len(misplaced) + 1, len(history) + 1)
    assert set(passed) == {*history, lucky}, {i: o[0].codes for i, o in refused.items()}
    assert set(refused) == set(misplaced)
    for event_id, subject in misplaced.items():
        out = refused[event_id][0]
        assert out.codes == {"decode.wrong_partition"}, out.reasons
        crc32, murmur2 = crc32_partition(subject.encode(), 4), partition_for(subject.encode(), 4)
        assert out.header("byzguard_original_partition") == str(crc32).encode()
        detail = out.reasons[0]["detail"]
        assert f"partition {murmur2}" in detail and "partitioner=murmur2_random" in detail, detail



def test_kcat_batches_in_every_compression_codec_are_verified(worker_factory: WorkerFactory, tmp_path: Path) -> None:
    """Prices kcat sends compressed with each codec Kafka producers use (gzip, snappy, lz4, zstd: `-z`) are
    read and verified like uncompressed ones; the worker decompresses them rather than stopping."""
    prices = start_prices_worker(worker_factory, tmp_path)
    sender = Sender(prices, worker_factory.bootstrap, tmp_path)
    documented = sender.script
    sent: dict[str, str] = {}
    for codec in ("gzip", "snappy", "lz4", "zstd"):
        sender.script = documented.replace(KCAT, f"kcat -P -z {codec} ")
        sent[sender.send(f"sku-{codec}", 1)] = codec
    sender.script = documented
    after = sender.send("sku-plain", 1)  # an uncompressed one after them: the worker still reads

    passed, refused = outputs(worker_factory, prices, len(sent) + 1, len(sent) + 1)
    assert prices.worker.alive(), prices.worker.log_digest()
    assert set(passed) == {*sent, after}, {sent.get(i, i): o[0].reasons for i, o in refused.items()}
    assert all(o[0].codes == set() for o in passed.values())
