"""Free loopback ports for servers the tests start (SeaweedFS, a Ray head).

A port found free can be taken by another process before the server binds it: callers start
the server through :func:`start_with_free_ports`, which picks new ports and tries again when
the start fails (the usual cause being a port taken in between).
"""

from __future__ import annotations

import socket


def free_ports(n: int, below: int = 55000) -> list[int]:
    """``n`` distinct ports that were free on 127.0.0.1 a moment ago (all bound at once, then released)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            p = s.getsockname()[1]
            if p < below:  # leave room for servers' "port + 10000" conventions
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


def start_with_free_ports(start, n: int, attempts: int = 3):
    """``start(ports)`` with fresh free ports, up to ``attempts`` times; ``start`` raises
    :class:`StartFailed` when the server did not come up (its log in the message)."""
    errors = []
    for _ in range(attempts):
        try:
            return start(free_ports(n))
        except StartFailed as exc:
            errors.append(str(exc))
    raise RuntimeError(f"server did not start in {attempts} attempts (new free ports each time):\n" + "\n---\n".join(
        e[-2000:] for e in errors))


class StartFailed(Exception):
    """The server exited or did not answer: worth another try with other ports."""
