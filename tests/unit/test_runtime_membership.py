"""app/runtime/membership.py without a broker: the consumers' client id is the data dir's, kept across processes."""

from __future__ import annotations

from pathlib import Path

from app.runtime.membership import INSTANCE_FILE, client_id


def test_the_client_id_is_kept_in_the_data_dir_and_differs_between_data_dirs(tmp_path: Path) -> None:
    """Every process on one data dir gets the same client id (kept in its instance file); another data dir, or the
    same one wiped, gets another."""
    first = client_id(tmp_path / "a")
    assert first.startswith("byzguard-") and first == client_id(tmp_path / "a")
    assert (tmp_path / "a" / INSTANCE_FILE).read_text().strip() == first.removeprefix("byzguard-")
    assert client_id(tmp_path / "b") != first
    (tmp_path / "a" / INSTANCE_FILE).unlink()
    assert client_id(tmp_path / "a") != first
