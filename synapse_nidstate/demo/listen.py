"""A TCP port for a real Synapse process to listen on, chosen before it starts.

The kernel's ``bind(0)`` hands out a port of its ephemeral range, the range
every outgoing connection takes its local port from. Between the moment the
port is chosen and the moment Synapse binds it, any connection of this machine
(Synapse's own to PostgreSQL, or a test job running beside it) may take it:
Synapse then dies with "Address already in use" (it happened in CI, a worker's
port taken while the PostgreSQL conformance job opened connections beside it).

So the port is chosen below that range, where no outgoing connection goes, and
never twice in one process.
"""

import random
import socket

#: Linux's default (``net.ipv4.ip_local_port_range``), where it cannot be read.
DEFAULT_EPHEMERAL_START = 32768
#: How far below the ephemeral range ports are chosen.
SPAN = 12000

_given: set[int] = set()


def ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_START


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the ephemeral range, not given
    before by this process."""
    high = ephemeral_start()
    low = max(1024, high - SPAN)
    candidates = [port for port in range(low, high) if port not in _given]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise OSError(f"no free port on {host} between {low} and {high}")
