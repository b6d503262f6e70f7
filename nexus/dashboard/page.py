"""``GET /``: the dashboard page, rendered on the server with the data it starts from.

The first paint needs no JavaScript and no extra round trip: the same data is rendered as
HTML (so the page works, and refreshes itself every 5 s, without JavaScript) and embedded
as JSON for ``dashboard.js``, which then keeps it live over ``/ws``. Everything is escaped:
jinja2 autoescaping for the HTML, and ``<``, ``>``, ``&`` (plus the JavaScript line
separators) as ``\\uXXXX`` in the JSON, so no backend name, model or error message can
close the ``<script>`` element. A strict Content-Security-Policy (scripts and styles from
this origin only) is the second line of defence.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined, Template, TemplateError
from markupsafe import Markup, escape

from nexus import __version__
from nexus.api import GATEWAY
from nexus.dashboard.panels import DashboardPanel
from nexus.live import LIVE, backend_views
from nexus.plugins import PluginHost

log = logging.getLogger("nexus.dashboard")

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PREFIX = "/dashboard/static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_JSON_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                 ord("\u2028"): "\\u2028", ord("\u2029"): "\\u2029"}
_encode = msgspec.json.Encoder().encode


def script_json(data: object) -> Markup:
    """JSON that is safe inside ``<script type="application/json">``: it cannot contain
    ``</script>`` or ``<!--`` because no ``<`` survives (``JSON.parse`` reads the escapes back)."""
    return Markup(_encode(data).decode().translate(_JSON_ESCAPES))


def format_duration(ms: float | None) -> str:
    if ms is None:
        return "—"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def format_uptime(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def format_time(timestamp: float) -> str:
    """UTC on the server; the script re-renders in the viewer's local time."""
    return time.strftime("%H:%M:%S", time.gmtime(timestamp))


def format_percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"


def format_cost(value: float | None) -> str:
    return "—" if value is None else f"${value:.4f}"


def model_rows(backends: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model × backend matrix: each model once, its best-known context length, the
    capabilities any backend reports for it, and the backends (ids) that list it."""
    rows: dict[str, dict[str, Any]] = {}
    for backend in backends:
        for model in backend["models"]:
            row = rows.setdefault(model["id"], {
                "id": model["id"], "context_length": None, "vision": False, "tools": False,
                "json_mode": False, "embeddings": False, "backends": [],
            })
            if model["context_length"] is not None:
                row["context_length"] = max(row["context_length"] or 0, model["context_length"])
            for capability in ("vision", "tools", "json_mode", "embeddings"):
                row[capability] = row[capability] or model[capability]
            row["backends"].append(backend["id"])
    return [rows[k] for k in sorted(rows)]


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("nexus.dashboard", "templates"),
        autoescape=True,  # every template, whatever its name: plugin templates have none
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(duration=format_duration, uptime=format_uptime, clock=format_time,
                       percent=format_percent, cost=format_cost)
    return env


class Dashboard:
    """The page template and the plugins' panels, prepared once at start-up."""

    def __init__(self, host: PluginHost) -> None:
        self.env = _environment()
        self.page = self.env.get_template("index.html")
        self.panels: list[tuple[str, DashboardPanel, Template | None]] = []
        for plugin_name, panel in host.dashboard_panels():
            try:
                compiled = self.env.from_string(panel.template) if panel.template is not None else None
            except TemplateError as exc:
                host.report(plugin_name, f"dashboard panel {panel.title!r} skipped: template error: {exc}")
                continue
            self.panels.append((plugin_name, panel, compiled))

    def render_panels(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """Each panel's title and HTML; a failing panel shows a notice, never breaks the page."""
        rendered = []
        for plugin_name, panel, compiled in self.panels:
            try:
                if compiled is not None:
                    body = Markup(compiled.render(**data))
                else:
                    assert panel.render is not None
                    body = escape(panel.render(data))  # Markup passes through, plain text is escaped
            except Exception:
                log.exception("Dashboard panel %r of plugin %s failed", panel.title, plugin_name)
                body = Markup('<p class="muted">This panel failed to render; see the server log.</p>')
            rendered.append({"title": panel.title, "plugin": plugin_name, "html": body})
        return rendered

    async def handle(self, request: web.Request) -> web.Response:
        gateway = request.app[GATEWAY]
        hub = request.app[LIVE]
        stats = hub.stats_payload()
        backends = backend_views(gateway.registry)
        data: dict[str, Any] = {
            "stats": stats,
            "backends": backends,
            "models": model_rows(backends),
            "history": gateway.history.entries(),
        }
        page = self.page.render(
            data=data,
            initial_json=script_json(data),
            budget=stats.get("budget"),
            history=list(reversed(data["history"])),
            backend_names={b["id"]: b["name"] for b in backends},
            panels=self.render_panels(data),
            static=STATIC_PREFIX,
            version=__version__,
        )
        response = web.Response(text=page, content_type="text/html", charset="utf-8")
        response.headers.update({
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        })
        return response


DASHBOARD = web.AppKey("dashboard", Dashboard)


async def index(request: web.Request) -> web.Response:
    return await request.app[DASHBOARD].handle(request)


def setup(app: web.Application, host: PluginHost) -> None:
    """Add ``GET /`` and the static files (needs :func:`nexus.live.setup` first)."""
    app[DASHBOARD] = Dashboard(host)
    app.add_routes([web.get("/", index), web.static(STATIC_PREFIX, STATIC_DIR)])
