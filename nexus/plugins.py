"""The plugin host: one pluggy manager per app, entry points loaded one by one.

Nothing else in Nexus calls ``pm.hook.*``: the typed accessors below turn hook results
into what the app needs, reporting (never raising) what a broken plugin got wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from nexus import hookspecs

if TYPE_CHECKING:
    import click
    from aiohttp import web

    from nexus.adapters.base import BackendAdapter
    from nexus.dashboard import DashboardPanel
    from nexus.discovery import DiscoverySource
    from nexus.routing.intent import Reconciler, ReconcilerContext

ENTRY_POINT_GROUP = "nexus.plugins"
log = logging.getLogger("nexus.plugins")


@dataclass
class PluginInfo:
    """One registered plugin, as ``nexus plugins`` shows it."""

    name: str
    version: str
    source: str  # "builtin" or the distribution name
    hooks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class PluginHost:
    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo]
    # Reports held back until logging is configured (see create_host(defer_log=True)).
    held: list[tuple[str, str]] | None = None
    # backend type -> the plugin that registered it (whose [plugins.<name>] it reads)
    type_plugins: dict[str, str] = field(default_factory=dict)
    _types: dict[str, type[BackendAdapter]] | None = None

    def report(self, plugin_name: str, message: str) -> None:
        """Record a plugin problem once (accessors may run more than once) and log it.

        Multi-line messages (pluggy's validation errors) become one line: one log line per
        event, one table row per plugin.
        """
        message = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
        errors = self.plugins.setdefault(plugin_name, PluginInfo(plugin_name, "?", "?")).errors
        if message in errors:
            return
        errors.append(message)
        if self.held is not None:
            self.held.append((plugin_name, message))
        else:
            log.error("plugin %s: %s", plugin_name, message)

    def flush_log(self) -> None:
        """Log the held reports, and from now on log reports as they happen."""
        held, self.held = self.held or [], None
        for plugin_name, message in held:
            log.error("plugin %s: %s", plugin_name, message)

    def _results(self, hook_name: str, *, many: bool = True, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call a hook implementation by implementation, so one failure skips only its plugin.

        With ``many`` the hook must return a list (or tuple); anything else is reported.
        """
        results: list[tuple[str, Any]] = []
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            name = self.pm.get_name(impl.plugin) or "?"
            if inspect.iscoroutinefunction(impl.function):
                self.report(name, f"{hook_name} must be a plain function, not async (hooks run once, at start-up)")
                continue
            try:
                result = impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:  # a broken plugin is reported and skipped
                self.report(name, f"{hook_name} failed: {type(exc).__name__}: {exc}")
                continue
            if result is None:
                continue
            if many and not isinstance(result, list | tuple):
                self.report(name, f"{hook_name} returned {result!r}, expected a list")
                continue
            results.append((name, result))
        return results

    def backend_types(self) -> dict[str, type[BackendAdapter]]:
        """Adapter classes by type name (the hook runs once; the CLI and the gateway share it)."""
        if self._types is None:
            self._types = self._collect_backend_types()
        return self._types

    def _collect_backend_types(self) -> dict[str, type[BackendAdapter]]:
        from nexus.adapters.base import BackendAdapter

        types: dict[str, type[BackendAdapter]] = {}
        for name, classes in self._results("register_backend_types"):
            for cls in classes:
                if not (isinstance(cls, type) and issubclass(cls, BackendAdapter)) or not getattr(cls, "type_name", ""):
                    self.report(name, f"register_backend_types returned {cls!r}, not a BackendAdapter subclass")
                elif cls.type_name in types:
                    self.report(name, f"backend type '{cls.type_name}' is already registered; skipped")
                else:
                    types[cls.type_name] = cls
                    self.type_plugins[cls.type_name] = name
        return types

    def discovery_sources(self) -> list[tuple[str, type[DiscoverySource]]]:
        """``(plugin name, source class)`` pairs; a source reads ``[plugins.<plugin name>]``."""
        return [(name, cls) for name, classes in self._results("register_discovery_sources") for cls in classes]

    def reconcilers(self, context: ReconcilerContext) -> list[Reconciler]:
        """Build the reconcilers; a class gets the context with its plugin's ``[plugins.<name>]``."""
        built: list[Reconciler] = []
        for name, items in self._results("register_reconcilers"):
            own = dataclasses.replace(context, settings=context.config.plugins.get(name, {}))
            for item in items:
                try:
                    reconciler = item(own) if isinstance(item, type) else item
                    if not (isinstance(reconciler.name, str) and isinstance(reconciler.order, int)):
                        raise TypeError("needs str 'name' and int 'order'")
                    if not callable(reconciler.reconcile):
                        raise TypeError("needs a reconcile(intent) method")
                except Exception as exc:
                    self.report(name, f"reconciler {item!r} skipped: {exc}")
                    continue
                built.append(reconciler)
        return sorted(built, key=lambda r: (r.order, r.name))

    def add_commands(self, cli: click.Group) -> None:
        self._results("register_commands", many=False, cli=cli)

    def routes(self) -> list[web.AbstractRouteDef]:
        return [route for _, routes in self._results("register_routes") for route in routes]

    def dashboard_panels(self) -> list[tuple[str, DashboardPanel]]:
        """``(plugin name, panel)`` pairs; a malformed panel is reported and skipped."""
        from nexus.dashboard.panels import as_panel

        panels: list[tuple[str, DashboardPanel]] = []
        for name, items in self._results("register_dashboard_panels"):
            for item in items:
                try:
                    panels.append((name, as_panel(item)))
                except (TypeError, ValueError) as exc:
                    self.report(name, f"dashboard panel skipped: {exc}")
        return panels

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Add each plugin's routes to ``router``; a route that cannot be added (for example
        one that clashes with a built-in route) is reported and skipped, never a crash."""
        taken = {(r.method, r.resource.canonical) for r in router.routes() if r.resource is not None}
        for name, routes in self._results("register_routes"):
            for route in routes:
                key = (getattr(route, "method", None), getattr(route, "path", None))
                if key in taken or ("GET", key[1]) in taken and key[0] == "HEAD":
                    self.report(name, f"route {key[0]} {key[1]} skipped: it clashes with an existing route")
                    continue
                try:
                    route.register(router)
                    taken.add(key)
                except Exception as exc:
                    self.report(name, f"route {route!r} skipped: {exc}")


def _hook_names(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    return sorted(impl.name for impl in pm.get_hookcallers(plugin) or [])


def _unknown_hook(exc: pluggy.PluginValidationError, pm: pluggy.PluginManager) -> str:
    """The validation error, with the nearest hook name when it looks like a typo."""
    unknown = [name for name in _hook_names(pm, exc.plugin) if not getattr(pm.hook, name).has_spec()]
    known = [name for name, caller in vars(pm.hook).items() if caller.has_spec()]
    hints = [f"; did you mean '{close[0]}'?"
             for name in unknown if (close := difflib.get_close_matches(name, known, 1))]
    return f"implements an unknown hook: {exc}" + "".join(hints)


def create_host(
    *,
    load_entry_points: bool = True,
    extra: list[tuple[str, object]] | None = None,
    defer_log: bool = False,
) -> PluginHost:
    """Build a plugin manager: built-ins first, then each ``nexus.plugins`` entry point.

    Tests pass ``load_entry_points=False`` and their own ``extra`` plugins. The CLI
    passes ``defer_log=True`` and calls :meth:`PluginHost.flush_log` once logging is set
    up, so that nothing is logged before a config error and the lines are formatted.
    """
    from nexus import __version__, builtins

    pm = pluggy.PluginManager("nexus")
    pm.add_hookspecs(hookspecs)
    host = PluginHost(pm, {}, [] if defer_log else None)
    pm.register(builtins, name="builtin")
    host.plugins["builtin"] = PluginInfo("builtin", __version__, "nexus-orchestrator", _hook_names(pm, builtins))
    candidates: list[tuple[str, object]] = []

    def claim(info: PluginInfo) -> bool:
        """A second plugin of the same name is skipped (and said so), never a silent replacement."""
        if info.name in host.plugins:
            host.report(info.name, f"{info.source} {info.version} also provides a plugin named "
                                   f"'{info.name}'; that one was skipped")
            return False
        host.plugins[info.name] = info
        return True

    for name, plugin in extra or []:
        if claim(PluginInfo(name, getattr(plugin, "__version__", "?"), "in-process")):
            candidates.append((name, plugin))
    if load_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            if not claim(PluginInfo(ep.name, version, dist)):
                continue
            try:
                module: ModuleType | object = ep.load()
            except Exception as exc:  # broken plugin: logged, listed, skipped
                host.report(ep.name, f"failed to load {ep.value} from {dist} {version}: {type(exc).__name__}: {exc}")
                continue
            candidates.append((ep.name, module))
    for name, plugin in candidates:
        try:
            pm.register(plugin, name=name)
        except Exception as exc:
            host.report(name, f"failed to register: {exc}")
            continue
        host.plugins[name].hooks = _hook_names(pm, plugin)
        if not host.plugins[name].hooks:
            host.report(name, "implements no nexus hooks (does the entry point name the module "
                              "that holds the @hookimpl functions?)")
    while True:
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            # A misspelt hook fails loudly (log and listing); only that plugin is dropped.
            name = pm.get_name(exc.plugin) or "?"
            message = _unknown_hook(exc, pm)
            pm.unregister(exc.plugin)
            if name in host.plugins:
                host.plugins[name].hooks = []  # dropped: none of its hooks run
            host.report(name, message)
            continue
        return host
