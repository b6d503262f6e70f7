"""``nexus demo``: a tiny local llama.cpp model behind the gateway, with nothing else installed.

It assembles the demo model (:func:`nexus_plugin_llamacpp.local.demo_model`), starts
llama.cpp's server on it on a free port, starts ``nexus serve`` in front of it with a
``llamacpp`` backend, prints a curl and an openai-SDK example, and stops both on
Ctrl-C, SIGTERM or SIGHUP (the gateway first, so in-flight requests finish).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from nexus_plugin_llamacpp import local

READY = "Nexus demo ready:"
BACKEND = "llamacpp-demo"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Gateway(local.Child):
    """``nexus serve`` in a child process; its stderr (one line, or warnings) is the caller's."""

    @classmethod
    def start(cls, config: Path, port: int, *, log_level: str = "warn") -> Gateway:
        command = [sys.executable, "-m", "nexus", "serve", "-c", str(config), "--port", str(port),
                   "--no-discovery", "--log-level", log_level]
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, process_group=0)
        return cls(proc, f"http://127.0.0.1:{port}", "nexus serve")

    def healthy_backends(self) -> int:
        status, body = self.get("/health")
        return int(json.loads(body)["backends"]["healthy"]) if status == 200 else 0

    def wait_healthy(self, backends: int, timeout: float = 60.0, stop: threading.Event | None = None) -> bool:
        """Wait until ``/health`` counts ``backends`` healthy backends (the first probe is async)."""
        return self.poll_until(lambda: self.healthy_backends() >= backends, timeout, stop)


def config_toml(backends: dict[str, str], *, interval_seconds: float = 5.0) -> str:
    """A ``nexus.toml`` with one ``llamacpp`` backend per ``name = url``."""
    tables = "".join(f'\n[[backends]]\nname = "{name}"\nurl = "{url}"\ntype = "llamacpp"\n'
                     for name, url in backends.items())
    return f"[health_check]\ninterval_seconds = {interval_seconds}\n{tables}"


def examples(url: str, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    return f"""\
Try it with curl:

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{body}'

or with the openai SDK (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  reply = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=32)
  print(reply.choices[0].message.content)

The demo model is tiny (Gemma 3 270M, a base model): its answers are nonsense. It shows
the plumbing, not the prose. Also: {url}/ (dashboard), {url}/v1/models, `nexus models`."""


@click.command()
@click.option("-p", "--port", type=int, default=8000, show_default=True, help="Port of the gateway.")
def demo(port: int) -> None:
    """Run a tiny local llama.cpp model behind Nexus (needs the llamacpp plugin's demo extra)."""
    if missing := local.missing_demo_modules():
        raise click.ClickException(f"nexus demo needs {' and '.join(missing)}: {local.DEMO_EXTRA_HINT}")
    if not local.port_free(port):
        raise click.ClickException(f"port {port} is in use on 127.0.0.1: pick another with --port")
    interrupted, wake = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        interrupted.set()
        wake.set()

    handlers = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        with tempfile.TemporaryDirectory(prefix="nexus-demo-") as workdir:
            code = _run(port, Path(workdir), interrupted, wake)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    sys.exit(code)


def _say(message: str, *, err: bool = False) -> None:
    click.echo(message, err=err)  # click flushes: a pipe reader sees each line at once


def _wake_on_exit(child: local.Child, wake: threading.Event) -> None:
    child.proc.wait()
    wake.set()


def _run(port: int, workdir: Path, interrupted: threading.Event, wake: threading.Event) -> int:
    children: list[local.Child] = []
    try:
        started = time.monotonic()
        _say("Preparing the demo model (Gemma 3 270M, Q4_K_M; assembled once from the installed package) ...")
        model = local.demo_model()
        _say(f"  {model} ({model.stat().st_size / 1e6:.0f} MB, {time.monotonic() - started:.1f}s)")
        llama = local.LlamaServer.start(model, port=local.free_port(), log=local.cache_dir() / "demo-llama-server.log")
        children.append(llama)
        _say(f"Starting llama.cpp's server on {llama.url} ...")
        started = time.monotonic()
        if not llama.wait_ready(stop=interrupted, on_state=lambda state: _say(f"  llama.cpp server: {state}")):
            return 0
        _say(f"  model loaded and warmed up in {time.monotonic() - started:.1f}s")
        config = workdir / "nexus.toml"
        config.write_text(config_toml({BACKEND: llama.url}), encoding="utf-8")
        _say(f"Starting Nexus on http://127.0.0.1:{port} ...")
        gateway = Gateway.start(config, port)
        children.append(gateway)
        if not gateway.wait_healthy(1, stop=interrupted):
            return 0
        _say(f"\n{examples(gateway.url, local.DEMO_ALIAS)}\n")
        _say(f"{READY} {gateway.url}/v1  (model {local.DEMO_ALIAS!r} on backend {BACKEND!r}). Press Ctrl-C to stop.")
        for child in children:  # a child that dies ends the demo too
            threading.Thread(target=_wake_on_exit, args=(child, wake), daemon=True).start()
        wake.wait()
        if interrupted.is_set():
            return 0
        for child in children:
            if not child.running:
                _say(f"Error: {child.name} exited with status {child.proc.returncode}", err=True)
        return 1
    except (RuntimeError, OSError, ValueError) as exc:  # a child that failed, a model file that did not assemble
        if interrupted.is_set():
            return 0
        _say(f"Error: {exc}", err=True)
        return 1
    finally:
        if children:
            _say("Stopping Nexus and the llama.cpp server ...")
        for child in reversed(children):  # the gateway first: its in-flight requests finish
            child.stop()
        if children:
            _say("Stopped.")
