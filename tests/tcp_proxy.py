"""A small threaded TCP proxy on loopback that a test can cut, to simulate a server going away.

The proxy listens on 127.0.0.1 and forwards every connection to a target that is
either a TCP address `(host, port)` or a Unix socket path (the embedded
PostgreSQL server listens only on a Unix socket).

- `cut()` closes every live connection and refuses new ones (the listening
  socket is closed, so a connect fails at once with "connection refused");
- `stall()` keeps accepting connections but forwards nothing (a server that
  hangs);
- `resume()` goes back to forwarding, on the same port.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

__all__ = ["TcpProxy"]

_BUFFER_SIZE = 65536


class TcpProxy:
    """Forward 127.0.0.1:<port> to a TCP address or a Unix socket path."""

    def __init__(self, target: tuple[str, int] | str | Path) -> None:
        self._target = target
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stalled = False
        self._dropping = False
        self.port = 0

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self) -> TcpProxy:
        """Start listening (on a free port the first time, the same port afterwards)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="tcp-proxy-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection."""
        self._close_listener()
        self._close_connections()

    def cut(self) -> None:
        """Close every live connection and refuse new ones until `resume()`."""
        self.stop()

    def stall(self) -> None:
        """Accept new connections but forward nothing (existing ones are closed)."""
        self._stalled = True
        self._close_connections()
        if self._listener is None:
            self.start()

    def drop_traffic(self) -> None:
        """Keep every connection open but forward nothing, either way, until `resume()`.

        What a network partition behind a middlebox looks like to the client:
        the socket stays up, no answer ever comes.
        """
        self._dropping = True

    def resume(self) -> None:
        """Forward again, on the same port."""
        self._stalled = False
        self._dropping = False
        self._close_connections()
        if self._listener is None:
            self.start()

    @property
    def live_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None

    def _close_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            _close(conn)

    def _connect_target(self) -> socket.socket:
        if isinstance(self._target, tuple):
            return socket.create_connection(self._target, timeout=5)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.settimeout(5)
        upstream.connect(str(self._target))
        return upstream

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                self._connections.add(client)
            if self._stalled:
                continue  # hold the connection open, answer nothing
            try:
                upstream = self._connect_target()
            except OSError:
                self._forget(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections.add(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), name="tcp-proxy-pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                chunk = source.recv(_BUFFER_SIZE)
                if not chunk:
                    break
                if self._dropping:
                    continue
                sink.sendall(chunk)
        except OSError:
            pass  # the other side, or cut(), closed a socket: this pair is finished
        self._forget(source)
        self._forget(sink)

    def _forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)
        _close(conn)


def _close(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked in recv() on this socket; close() alone may not.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
