"""The test harness gives workers web ports that no outgoing connection can take while a worker restarts."""

from __future__ import annotations

import socket

from tests.integration.worker_harness import _ephemeral_low, web_port


def test_web_ports_are_free_and_below_the_ephemeral_range() -> None:
    """Every port handed out is bindable and below the range the kernel gives outgoing connections."""
    for _ in range(20):
        port = web_port()
        assert 1024 <= port < _ephemeral_low()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
