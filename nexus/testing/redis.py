"""A real, throw-away ``redis-server`` for tests of the Redis state store.

A real server rather than a fake: the store's atomicity rests on Lua scripts running
inside Redis, which only Redis itself can show.
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
import time

from dataclasses import dataclass, field

from nexus.testing.processes import stop_process

STARTUP_TIMEOUT = 10.0


class RedisUnavailable(RuntimeError):
    """``redis-server`` is not installed (or would not start)."""


def find_redis_server() -> str | None:
    return shutil.which("redis-server") or ("/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK)
                                           else None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int
    directory: tempfile.TemporaryDirectory[str]
    log_reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_process(self.process, timeout=10)
        if self.log_reader is not None:
            self.log_reader.join()  # ends at EOF, now that the server is gone
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.directory.cleanup()


def start_redis_server(binary: str | None = None) -> RedisServer:
    """Start ``redis-server`` on a free port of 127.0.0.1, nothing persisted; returns once it
    answers PING. Raises :class:`RedisUnavailable` when it is not installed or does not start."""
    binary = binary or find_redis_server()
    if binary is None:
        raise RedisUnavailable("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
    last_output = b""
    for _ in range(3):  # the free port can be taken between choosing and binding it
        port = _free_port()
        directory = tempfile.TemporaryDirectory(prefix="nexus-redis-")
        process = subprocess.Popen(
            [binary, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--port", str(port),
             "--dir", directory.name],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = RedisServer(process, port, directory)
        ready, last_output = _wait_ready(server)
        if ready:
            return server
        server.stop()
    raise RedisUnavailable(f"redis-server did not start: {last_output.decode(errors='replace')[-500:]}")


def _wait_ready(server: RedisServer) -> tuple[bool, bytes]:
    """Ping until it answers; between tries wait for its next log line rather than a fixed time."""
    assert server.process.stdout is not None
    output = b""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(server.process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if _answers_ping(server.port):
                selector.unregister(server.process.stdout)
                # Nobody reads its log from now on: let it go nowhere rather than fill the pipe.
                _drain_in_background(server)
                return True, output
            if server.process.poll() is not None:
                return False, output + server.process.stdout.read()
            if selector.select(timeout=0.05):
                chunk = os.read(server.process.stdout.fileno(), 65536)
                output += chunk
    return False, output


def _drain_in_background(server: RedisServer) -> None:
    stream = server.process.stdout
    assert stream is not None

    def drain() -> None:
        while os.read(stream.fileno(), 65536):
            pass

    server.log_reader = threading.Thread(target=drain, name=f"redis-{server.port}-log", daemon=True)
    server.log_reader.start()
