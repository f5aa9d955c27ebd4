"""bench.core runs end to end on a few entities and reports every stage, both cases and the record sizes."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bench import core


def test_bench_core_reports_every_stage_and_writes_its_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    """A tiny run prints the per-stage table for a fresh entity and at steady state, and --out writes the JSON
    and the Markdown into core-<label>/, with an earlier run side by side."""
    core.main(["--entities", "20", "--reps", "1", "--state", "dict", "--label", "t1", "--json-out",
               str(tmp_path / "t1.json")])
    first = orjson.loads((tmp_path / "t1.json").read_bytes())
    assert set(first["cases"]) == {"fresh", "steady"}
    assert first["cases"]["fresh"]["ids"] == 1 and first["cases"]["steady"]["ids"] == 32
    assert set(first["cases"]["steady"]["us"]) == {*core.STAGES, "glue", "total", "batch", "batch by record"}
    assert first["cases"]["steady"]["state_record_written_bytes"] < 2000
    core.main(["--entities", "20", "--reps", "1", "--state", "dict", "--label", "t2", "--out", str(tmp_path),
               "--before", str(tmp_path / "t1.json")])
    text = (tmp_path / "core-t2" / "core.md").read_text()
    assert "Before: t1" in text and "| **total** (Guard.process) |" in text
    assert "| **batch** (Guard.process_batch per 64; before it: prepare + process) |" in text
    assert (tmp_path / "core-t2" / "core.json").exists() and (tmp_path / "core-t2" / "before.json").exists()
    assert "| decode |" in capsys.readouterr().out
