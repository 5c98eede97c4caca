"""A private redis-server process a test can pause, kill and restart, always by its own pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis
import redis.asyncio

__all__ = ["RedisProcess", "async_redis_client", "free_port", "redis_server_path"]


def async_redis_client(url: str) -> redis.asyncio.Redis:
    """The library's fail-fast asyncio client (the twin of `redis_client_from_url`)."""
    try:
        from session.config import async_redis_client_from_url
    except ImportError:  # the same settings, spelled out
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        from session.config import REDIS_SOCKET_TIMEOUT

        return redis.asyncio.Redis.from_url(
            url,
            socket_timeout=REDIS_SOCKET_TIMEOUT,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
    return async_redis_client_from_url(url)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


class RedisProcess:
    """`redis-server` on 127.0.0.1:<port>, data (AOF) in `directory`.

    `appendonly=True` writes every command to the AOF before answering
    (`appendfsync always`), so a kill -9 and restart brings back exactly what
    was acknowledged: the case of a Redis restarting with its old data.
    """

    def __init__(
        self, directory: Path, *, appendonly: bool = False, password: str | None = None
    ) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.password = password
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        server = redis_server_path()
        assert server is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            server,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.password:
            command += ["--requirepass", self.password]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_for_ping()
        return self

    def _wait_for_ping(self, timeout: float = 10.0) -> None:
        client = redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=0.5
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}")
                try:
                    if client.ping():
                        return
                except redis.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer PING in time")
                time.sleep(0.02)  # polling a process that is starting, with a deadline
        finally:
            client.close()

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections but answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """kill -9, and reap it."""
        assert self._process is not None
        if self._process.poll() is not None:
            return
        os.kill(self.pid, signal.SIGCONT)  # a stopped process must be able to die
        os.kill(self.pid, signal.SIGKILL)
        self._process.wait(timeout=10)

    def wipe(self) -> None:
        """Delete the data directory's contents (the server must be down)."""
        for path in self.directory.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def restart(self, *, keep_data: bool) -> None:
        """Kill -9 and start again on the same port, with the old AOF or empty."""
        self.kill()
        if not keep_data:
            self.wipe()
        self.start()

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        os.kill(self.pid, signal.SIGCONT)
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
