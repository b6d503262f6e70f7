"""The web dashboard at ``GET /`` (upstream §9.1): a server-rendered page, kept live over ``/ws``.

This package only exports what plugins need (:class:`DashboardPanel`); the page itself is
built in :mod:`nexus.dashboard.page`, which the app imports. Keeping this module free of
the web layer lets :mod:`nexus.plugins` import it without an import cycle.
"""

from nexus.dashboard.panels import DashboardPanel

__all__ = ["DashboardPanel"]
