"""Helpers for the tests that run 2 processes (gloo): a free port, and a rank's environment."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port nothing listens on now (for MASTER_PORT / --main_process_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_as_rank(rank: int, world: int, port: int) -> None:
    """Set the environment a launcher gives rank ``rank`` of ``world`` processes on this host."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
