"""app/runtime/membership.py without a broker: the consumers' client id is the worker's name or the data dir's,
kept across processes, a member's web URL read from its metadata, addresses and whether a URL is served here."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from pydantic import ValidationError

from app.runtime.membership import INSTANCE_FILE, address, client_id, member_url, serving
from app.runtime.owners import encode_member
from app.settings import Settings


def test_the_client_id_is_kept_in_the_data_dir_and_differs_between_data_dirs(tmp_path: Path) -> None:
    """Every process on one data dir gets the same client id (kept in its instance file); another data dir, or the
    same one wiped, gets another."""
    first = client_id(tmp_path / "a")
    assert first.startswith("byzguard-") and first == client_id(tmp_path / "a")
    assert (tmp_path / "a" / INSTANCE_FILE).read_text().strip() == first.removeprefix("byzguard-")
    assert client_id(tmp_path / "b") != first
    (tmp_path / "a" / INSTANCE_FILE).unlink()
    assert client_id(tmp_path / "a") != first


def test_a_named_worker_has_its_names_client_id_whatever_its_data_dir(tmp_path: Path) -> None:
    """With BYZGUARD_WORKER_ID the client id is the name's, the same on any data dir (none is written), and no
    data dir's instance id can be mistaken for it."""
    named = client_id(tmp_path / "a", "guard-0")
    assert named == client_id(tmp_path / "wiped", "guard-0") == "byzguard-worker-guard-0"
    assert not (tmp_path / "wiped" / INSTANCE_FILE).exists()
    assert client_id(tmp_path / "a", "guard-1") != named
    assert not client_id(tmp_path / "c").startswith("byzguard-worker-")


def test_a_members_url_is_read_from_its_verify_group_metadata() -> None:
    """A member's web URL is read from the owners assignor's metadata; another assignor's, or bytes that are not
    metadata, give none (such a member is never taken for this worker's predecessor)."""
    metadata = ConsumerProtocolMemberMetadata(0, ["in"], encode_member("http://w0:6066")).encode()
    assert member_url(metadata) == "http://w0:6066"
    assert member_url(ConsumerProtocolMemberMetadata(0, ["in"], b"").encode()) is None
    assert member_url(b"\x00garbage") is None


def test_the_worker_id_setting_takes_a_plain_name_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """BYZGUARD_WORKER_ID is a plain name (letters, digits, `.`, `_`, `-`); unset, there is none."""
    monkeypatch.setenv("BYZGUARD_ENV_FILE", "")
    assert Settings().worker_id is None
    monkeypatch.setenv("BYZGUARD_WORKER_ID", "guard-0.eu")
    assert Settings().worker_id == "guard-0.eu"
    monkeypatch.setenv("BYZGUARD_WORKER_ID", "a b")
    with pytest.raises(ValidationError):
        Settings()


def test_addresses_of_members_and_sockets_compare_in_one_form() -> None:
    """The broker's client host (`/10.0.0.5`, `host/10.0.0.5`, an IPv6 one) and a socket's address (an IPv4-mapped
    IPv6 one as IPv4) compare equal for one address; text that is no address gives none."""
    assert address("/10.0.0.5") == address("w0/10.0.0.5") == address("::ffff:10.0.0.5") == "10.0.0.5"
    assert address("/0:0:0:0:0:0:0:1") == address("::1") == "::1"
    assert address("/10.0.0.6") != address("/10.0.0.5")
    assert address("") is None and address("/not-an-address") is None


def test_a_url_served_on_this_host_is_told_from_a_free_one() -> None:
    """A URL whose address and port a listening socket holds is served; once it is closed the URL is free (a
    restarted worker's own URL); a URL of an address this host does not have cannot be told."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert serving(url) is True
    assert serving(url) is False
    assert serving("http://192.0.2.1:6066") is None  # TEST-NET-1: no address of this host
