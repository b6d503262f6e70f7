"""Durable state (CONTRACT §7): budget spend and reservations, request history, quality history.

:class:`StateStore` is the interface; :func:`open_store` picks the implementation from
``[state] backend``: ``sqlite`` (default, one file shared by the gateways of one machine),
``redis`` (shared by gateways on several machines) or ``memory`` (nothing survives a
restart). No method blocks the event loop: writes are queued to a background writer or
sent asynchronously, reads are awaited.
"""

from nexus.state.base import HistoryEntry, QualityBucket, StateStore, open_store

__all__ = ["HistoryEntry", "QualityBucket", "StateStore", "open_store"]
