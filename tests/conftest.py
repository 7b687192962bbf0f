"""Shared by every test file: nothing may reach the network (127.0.0.1 is allowed)."""

import socket

import pytest


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Only 127.0.0.1 may be reached: nothing here downloads anything."""
    connect = socket.socket.connect

    def local_only(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"test tried to reach {address}")
        return connect(sock, address)
    monkeypatch.setattr(socket.socket, "connect", local_only)
