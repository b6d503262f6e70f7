"""The ``nexus`` command line. Errors are one line on stderr and exit status 1."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

import click

from nexus import __version__, config as config_mod, logs
from nexus.errors import ConfigError
from nexus.plugins import PluginHost, create_host

DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(click.ClickException):
    """Printed as ``Error: <message>`` on stderr, exit status 1."""


def _load_config(path: str | None, overrides: dict[tuple[str, str], Any] | None = None) -> config_mod.Config:
    try:
        return config_mod.load(path, overrides=overrides)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _fetch(url: str, path: str, *, method: str = "GET", body: Any = None, timeout: float = 5) -> Any:
    """Call a running Nexus and return its JSON answer (no proxies: it is usually on loopback).

    An error answer becomes one line carrying the gateway's own error message.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # e.g. an unclosed IPv6 bracket or a port that is not a number
        valid = False
    if not valid:
        raise CliError(f"--url {url!r} is invalid: expected an http:// or https:// URL such as {DEFAULT_URL}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    target = url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(target, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with opener.open(request, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"{target} answered HTTP {exc.code}"
        raise CliError(message) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"no Nexus answering at {url} ({reason}); is `nexus serve` running?") from None
    except ValueError:
        raise CliError(f"{target} did not return JSON; is that a Nexus server?") from None


def _emit(data: Any, as_json: bool, render: Any) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else render(data))


url_option = click.option("--url", default=DEFAULT_URL, show_default=True, help="Base URL of a running Nexus.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="nexus")
def cli() -> None:
    """Nexus: one OpenAI-compatible endpoint in front of your LLM backends."""


@cli.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), envvar="NEXUS_CONFIG",
              help="Config file (default: nexus.toml if present).")
@click.option("-p", "--port", type=int, help="Port to listen on [env NEXUS_PORT; default 8000].")
@click.option("-H", "--host", help="Address to bind [env NEXUS_HOST; default 127.0.0.1].")
@click.option("-l", "--log-level", type=click.Choice(["trace", "debug", "info", "warn", "warning", "error"],
              case_sensitive=False), help="Log level [env NEXUS_LOG_LEVEL; default info].")
@click.option("--no-discovery", is_flag=True, help="Do not run discovery sources (mDNS, port probing).")
@click.option("--no-health-check", is_flag=True, help="Do not probe backends; configured models count as healthy.")
def serve(config_path: str | None, port: int | None, host: str | None, log_level: str | None,
          no_discovery: bool, no_health_check: bool) -> None:
    """Run the gateway."""
    overrides: dict[tuple[str, str], Any] = {
        ("server", "port"): port,
        ("server", "host"): host,
        ("logging", "level"): log_level.lower() if log_level else None,
        ("discovery", "enabled"): False if no_discovery else None,
        ("health_check", "enabled"): False if no_health_check else None,
    }
    config = _load_config(config_path, overrides)
    plugin_host = _host()
    from nexus.app import create_app

    _check_backend_types(config, plugin_host)
    logs.setup(config.logging)
    plugin_host.flush_log()  # broken plugins are logged now, formatted, and never before a config error
    app = create_app(config, plugin_host)
    try:
        asyncio.run(_serve(app, config.server.host, config.server.port))
    except ConfigError as exc:  # found while starting: e.g. an unusable state file or Redis
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror or exc}") from None


async def _serve(app: Any, host: str, port: int) -> None:
    from aiohttp import web

    from nexus.app import NexusRunner

    runner = NexusRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=30)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"Nexus {__version__} listening on http://{shown}:{port}/v1", err=True)
        await stop.wait()
        click.echo("Shutting down: finishing in-flight requests", err=True)
    finally:
        await runner.cleanup()


@cli.command()
@click.option("--url", "backend_url", required=True, help="Base URL of the backend, e.g. http://127.0.0.1:11434.")
@click.option("-t", "--type", "backend_type", help="Backend type (default: detected by probing).")
@click.option("-z", "--zone", type=click.Choice(["restricted", "open"], case_sensitive=False),
              help="Privacy zone announced (default: the type's).")
@click.option("-n", "--name", help="Instance name (default: '<type> on <host name>').")
@click.option("-i", "--interface", "interfaces", multiple=True,
              help="Address of an interface to announce on (repeatable; default: all).")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=30, show_default=True,
              help="Seconds between re-probes of the backend.")
def advertise(backend_url: str, backend_type: str | None, zone: str | None, name: str | None,
              interfaces: tuple[str, ...], interval: float) -> None:
    """Announce a backend over mDNS so gateways on the LAN discover it (until Ctrl-C)."""
    from nexus.announce import AdvertiseError, AdvertiseRequest, advertise_backend

    types = _host().backend_types()
    if backend_type is not None and backend_type not in types:
        raise CliError(f"--type {backend_type!r} is not an installed backend type (installed: {', '.join(sorted(types))})")
    try:
        parts = urllib.parse.urlsplit(backend_url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        valid = False
    if not valid:
        raise CliError(f"--url {backend_url!r} is invalid: expected an http:// or https:// URL such as "
                       "http://127.0.0.1:11434")
    for address in interfaces:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise CliError(f"--interface {address!r} is invalid: expected an interface address such as "
                           "127.0.0.1") from None
    request = AdvertiseRequest(backend_url, backend_type, zone.lower() if zone else None, name, interfaces, interval)

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await advertise_backend(request, types, stop, lambda line: click.echo(line, err=True))

    try:
        asyncio.run(run())
    except AdvertiseError as exc:
        raise CliError(str(exc)) from None


@cli.group()
def backends() -> None:
    """Backends of a running Nexus."""


@backends.command("list")
@url_option
@json_option
@click.option("-s", "--status", type=click.Choice(["healthy", "unhealthy", "unknown", "draining"]),
              help="Only backends with this status.")
def backends_list(url: str, as_json: bool, status: str | None) -> None:
    """List backends with status, models and latency."""
    data = _fetch(url, "/v1/backends")
    if status:
        data["backends"] = [b for b in data["backends"] if b["status"] == status]

    def render(d: dict[str, Any]) -> str:
        if not d["backends"]:
            return "No backends."
        rows = [[b["name"], b["url"], b["type"], b["status"], b["source"], b["zone"], str(len(b["models"])),
                 f"{b['avg_latency_ms']:.0f}ms"] for b in d["backends"]]
        return _table(["NAME", "URL", "TYPE", "STATUS", "SOURCE", "ZONE", "MODELS", "LATENCY"], rows)

    _emit(data, as_json, render)


@backends.command("add")
@click.argument("backend_url")
@click.option("-n", "--name", help="Backend name and id (default: the URL's host).")
@click.option("-t", "--type", "backend_type", help="Backend type (default: detected by probing).")
@click.option("-p", "--priority", type=int, default=50, show_default=True, help="Lower is preferred.")
@url_option
@json_option
def backends_add(backend_url: str, name: str | None, backend_type: str | None, priority: int, url: str,
                 as_json: bool) -> None:
    """Add a backend to a running Nexus (until it restarts; put it in nexus.toml to keep it)."""
    body: dict[str, Any] = {"url": backend_url, "priority": priority}
    if name:
        body["name"] = name
    if backend_type:
        body["type"] = backend_type
    data = _fetch(url, "/v1/backends", method="POST", body=body, timeout=30)
    _emit(data, as_json, lambda b: f"Added backend '{b['name']}' ({b['type']}, {b['status']}, "
                                   f"{len(b['models'])} models)")


@backends.command("remove")
@click.argument("backend_id")
@url_option
@json_option
def backends_remove(backend_id: str, url: str, as_json: bool) -> None:
    """Remove a backend from a running Nexus."""
    data = _fetch(url, f"/v1/backends/{urllib.parse.quote(backend_id, safe='')}", method="DELETE")
    _emit(data, as_json, lambda d: f"Removed backend: {d['removed']}")


@cli.command()
@url_option
@json_option
def models(url: str, as_json: bool) -> None:
    """List models with the backends serving them."""
    listing = _fetch(url, "/v1/models")
    grouped: dict[str, dict[str, Any]] = {}
    for entry in listing["data"]:
        item = grouped.setdefault(entry["id"], {"id": entry["id"], "backends": [], "context_length": None})
        item["backends"].append(entry["owned_by"])
        item["context_length"] = entry.get("context_length") or item["context_length"]
    data = {"models": list(grouped.values())}

    def render(d: dict[str, Any]) -> str:
        if not d["models"]:
            return "No models available (no healthy backend lists any)."
        rows = [[m["id"], ", ".join(m["backends"]), str(m["context_length"] or "?")] for m in d["models"]]
        return _table(["MODEL", "BACKENDS", "CONTEXT"], rows)

    _emit(data, as_json, render)


@cli.command()
@url_option
@json_option
def health(url: str, as_json: bool) -> None:
    """Show the health of a running Nexus."""
    data = _fetch(url, "/health")

    def render(d: dict[str, Any]) -> str:
        b = d["backends"]
        return "\n".join([
            f"Status:   {d['status']}",
            f"Uptime:   {d['uptime_seconds']}s",
            f"Backends: {b['healthy']}/{b['total']} healthy",
            f"Models:   {d['models']} available",
        ])

    _emit(data, as_json, render)


@cli.group("config")
def config_group() -> None:
    """Create or check a config file."""


@config_group.command("init")
@click.option("-o", "--output", default="nexus.toml", show_default=True, type=click.Path(dir_okay=False))
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing file.")
def config_init(output: str, force: bool) -> None:
    """Write a commented example config."""
    target = Path(output)
    if target.exists() and not force:
        raise CliError(f"file already exists: {target}; use --force to overwrite")
    example = resources.files("nexus").joinpath("nexus.example.toml").read_text(encoding="utf-8")
    try:
        target.write_text(example, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror}") from None
    click.echo(f"Configuration file created: {target}")


@config_group.command("check")
@click.option("-c", "--config", "config_path", default="nexus.toml", show_default=True, envvar="NEXUS_CONFIG",
              type=click.Path(dir_okay=False), help="Config file [env NEXUS_CONFIG].")
def config_check(config_path: str) -> None:
    """Validate a config file (keys, values, installed backend types)."""
    try:
        config = config_mod.build(config_mod.read_file(Path(config_path)), source=config_path)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    host = _host()
    _check_backend_types(config, host)
    _check_plugin_settings(config, host)
    click.echo(f"{config_path} is valid: {len(config.backends)} backends, strategy {config.routing.strategy}")


def _check_plugin_settings(config: config_mod.Config, host: PluginHost) -> None:
    """Build the routing stages as ``serve`` would: a plugin that refuses its
    ``[plugins.<name>]`` table is an error here (``serve`` reports it and runs without it)."""
    from nexus.registry import Registry
    from nexus.routing.intent import ReconcilerContext

    before = {name: len(info.errors) for name, info in host.plugins.items()}
    host.reconcilers(ReconcilerContext(config=config, registry=Registry()))
    for name, info in host.plugins.items():
        new = info.errors[before.get(name, 0):]
        if new and name in config.plugins:
            raise CliError(f"[plugins.{name}]: {new[0]}")


@cli.command()
@json_option
def plugins(as_json: bool) -> None:
    """List plugins with version, hooks and load errors."""
    host = _host()
    data = [
        {"name": p.name, "version": p.version, "source": p.source, "hooks": p.hooks, "errors": p.errors}
        for p in host.plugins.values()
    ]

    def render(d: list[dict[str, Any]]) -> str:
        rows = [[p["name"], p["version"], p["source"], ", ".join(p["hooks"]) or "-",
                 "; ".join(p["errors"]) or "ok"] for p in d]
        return _table(["NAME", "VERSION", "SOURCE", "HOOKS", "STATUS"], rows)

    _emit(data, as_json, render)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completions(shell: str) -> None:
    """Print a shell completion script (e.g. `nexus completions bash >> ~/.bashrc`)."""
    from click.shell_completion import get_completion_class

    completion_cls = get_completion_class(shell)
    assert completion_cls is not None
    click.echo(completion_cls(cli, {}, "nexus", "_NEXUS_COMPLETE").source())


def _check_backend_types(config: config_mod.Config, host: PluginHost) -> None:
    """Every configured backend type is installed; an installed but broken plugin says so."""
    from nexus.gateway import check_backend_types

    types = host.backend_types()
    for i, spec in enumerate(config.backends):
        plugin = host.plugins.get(spec.type)
        if spec.type not in types and plugin is not None and plugin.errors:
            raise CliError(f"backends[{i}].type = {spec.type!r}: plugin {spec.type} ({plugin.source} {plugin.version}) "
                           f"is installed but broken: {plugin.errors[0]}")
    try:
        check_backend_types(config, types)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _host() -> PluginHost:
    """The plugin host made by :func:`main` (or a fresh one when ``cli`` is invoked directly)."""
    ctx = click.get_current_context()
    root = ctx.find_root()
    if not isinstance(root.obj, PluginHost):
        root.obj = create_host()
    return root.obj


def main() -> None:
    host = create_host(defer_log=True)
    host.add_commands(cli)
    cli.main(prog_name="nexus", obj=host)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
