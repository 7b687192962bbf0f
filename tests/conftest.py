"""Shared by every test file: nothing may reach the network (127.0.0.1 is allowed); a folder
can be made read-only."""

import builtins
import errno
import io
import os
import socket
from pathlib import Path

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


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): writing under folder fails from then on, as on a read-only mount. Done by
    refusing the writes (root, which runs many containers, is not stopped by file modes)."""
    folders = []
    real_open, real_mkdir = builtins.open, os.mkdir

    def refuse(path):
        if any(Path(os.path.realpath(path)).is_relative_to(f) for f in folders):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    return lambda folder: folders.append(Path(folder).resolve())
