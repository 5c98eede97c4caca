"""`TcpProxy` plus the faults a network can have: a partition, and a connection lost mid-call.

- `partition()`: nothing crosses in either direction (bytes already read are
  held, as TCP would retransmit them); new connections are accepted and held;
- `heal()`: held bytes flow again;
- `lose_next_reply()`: the next bytes the server sends are dropped and both
  sockets of that connection closed: the request reached the server (a COMMIT
  was carried out) but the client never learns the outcome;
- `lose_next_request()`: the next bytes a client sends are dropped and the
  connection closed: the server never saw the request;
- `retarget(address)`: close every connection and forward new ones to another
  server, on the same port: a failover behind one address (DNS, a proxy).
"""

from __future__ import annotations

import socket
import threading

from psycopg2.extensions import make_dsn, parse_dsn
from tcp_proxy import TcpProxy

__all__ = ["FaultProxy"]

_BUFFER_SIZE = 65536


class FaultProxy(TcpProxy):
    def __init__(self, target: tuple[str, int] | str) -> None:
        super().__init__(target)
        self._flowing = threading.Event()
        self._flowing.set()
        self._lose_reply = False
        self._lose_request = False

    def partition(self) -> None:
        self._stalled = True
        self._flowing.clear()

    def heal(self) -> None:
        self._stalled = False
        self._flowing.set()

    def retarget(self, target: tuple[str, int]) -> None:
        self._target = target
        self._close_connections()

    def lose_next_reply(self) -> None:
        self._lose_reply = True

    def lose_next_request(self) -> None:
        self._lose_request = True

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            from_client = source.getsockname()[1] == self.port
        except (OSError, IndexError, TypeError):
            from_client = False  # a Unix socket to the server
        try:
            while True:
                chunk = source.recv(_BUFFER_SIZE)
                if not chunk:
                    break
                self._flowing.wait()
                if from_client and self._lose_request:
                    self._lose_request = False
                    break
                if not from_client and self._lose_reply:
                    self._lose_reply = False
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        self._forget(source)
        self._forget(sink)


def socket_path(dsn: str) -> str:
    """Return the Unix socket path of a DSN that names a socket directory."""
    params = parse_dsn(dsn)
    return f"{params['host']}/.s.PGSQL.{params.get('port', '5432')}"


def tcp_dsn(dsn: str, port: int) -> str:
    """Return `dsn` pointed at 127.0.0.1:`port` (a proxy in front of the server)."""
    params = {key: value for key, value in parse_dsn(dsn).items() if value != ""}
    params.update(host="127.0.0.1", port=str(port))
    return make_dsn(**params)
