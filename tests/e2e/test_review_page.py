"""The review page in a real headless Chromium, served by a real worker on the real broker."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import async_playwright, expect

from tests.conftest import _topic_prefix, missing
from tests.integration.worker_harness import Events, WorkerFactory, collect, produce

pytestmark = [pytest.mark.kafka, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "page-token"


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium; installed with apt-get when missing and we are root (as CI is on a fresh machine)."""
    if not CHROMIUM.exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            missing(f"{CHROMIUM} is not installed (apt-get install chromium), and we are not root to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, timeout=900)
    return CHROMIUM


@pytest.fixture
def workers(kafka_bootstrap: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[WorkerFactory]:
    """Worker processes of this test (own app id, config and topics), all reaped afterwards."""
    factory = WorkerFactory(kafka_bootstrap, tmp_path, _topic_prefix(request.node.name))
    try:
        yield factory
    finally:
        factory.cleanup()


async def _quarantined_id(base: str) -> str:
    """Wait until the worker has quarantined one record and return its id."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{base}/review/api/records", headers=headers) as resp:
                body = await resp.json() if resp.status == 200 else {}
            if body.get("total") == 1:
                return str(body["records"][0]["quarantine_id"])
            assert time.monotonic() < deadline, f"nothing quarantined within 60 s: {body}"
            await asyncio.sleep(0.3)


async def test_approve_on_the_page_delivers_the_record_to_the_verified_topic(chromium: Path,
                                                                             workers: WorkerFactory) -> None:
    """A reviewer logs in, sees the record beside the entity's last good value, clicks approve, and it is delivered."""
    route = workers.configure(partitions=2)
    worker = workers.new_worker("web")
    worker.env["BYZGUARD_REVIEW_TOKEN"] = TOKEN
    worker.start()
    await asyncio.to_thread(worker.wait_ready)
    events = Events()
    await produce(workers.bootstrap, route.input, [events.clean("ord-7", 1), events.clean("ord-7", 2)])
    await produce(workers.bootstrap, route.input, [events.regression("ord-7", 1)])
    base = f"http://127.0.0.1:{worker.web_port}"
    qid = await _quarantined_id(base)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), args=LAUNCH_ARGS, headless=True)
        try:
            page = await browser.new_page()
            await page.goto(f"{base}/review/")
            await expect(page.get_by_test_id("message")).to_contain_text("token")  # reads need the token too

            await page.get_by_test_id("token").fill(TOKEN)
            await page.get_by_test_id("reviewer").fill("alice")
            await page.get_by_test_id("save-login").click()
            row = page.locator(f'tr[data-qid="{qid}"]')
            await expect(row).to_contain_text("version.regression")
            await expect(page.get_by_test_id("reason-counts")).to_contain_text("version.regression: 1")

            await row.click()
            await expect(page.get_by_test_id("detail-status")).to_have_text("pending")
            await expect(page.get_by_test_id("detail-reasons")).to_contain_text("version.regression")
            await expect(page.get_by_test_id("detail-entity")).to_contain_text('"version": 2')
            await expect(page.get_by_test_id("detail-data")).to_contain_text('"version": 1')

            await page.get_by_test_id("note").fill("late but correct")
            await page.get_by_test_id("approve").click()
            await expect(page.get_by_test_id("message")).to_contain_text(f"delivered: {qid}")
            await expect(page.get_by_test_id("detail-status")).to_have_text("replayed")
            await expect(page.get_by_test_id("detail-history")).to_contain_text("approve by alice")
        finally:
            await browser.close()

    verified = await collect(workers.bootstrap, route.verified, expected=3, idle=1.0)
    replayed = [r for r in verified if r.header("byzguard_replayed") == b"1"]
    assert [(r.header("byzguard_quarantine_id"), r.header("byzguard_reviewer")) for r in replayed] == [
        (qid.encode(), b"alice")]
