"""Free loopback TCP ports, for servers started on this machine (the demo's Serve HTTP port, tests' servers).

Stdlib only, so anything can import it cheaply. The OS picks the port (bind to port 0), so several Serve
instances, Ray clusters or test runs on one machine never pick the same fixed port. The port is released
before the caller binds it, so another process may in principle take it in between: bind soon after.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """`n` distinct ports free on `host` now (all held open together until each is chosen, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = LOOPBACK) -> int:
    """One port free on `host` now."""
    return free_ports(1, host)[0]
