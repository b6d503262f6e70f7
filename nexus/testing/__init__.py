"""Test support for Nexus and its plugins: fakes of backend APIs and pytest fixtures.

Each fake is a real aiohttp server on a random port that follows one backend's
documented API and records what it received.
"""

from nexus.testing.fakes import FakeBackend, Received, chunk, completion, free_port
from nexus.testing.fixtures import (
    CHAT,
    BackendFactory,
    NexusFactory,
    RunningNexus,
    backend_entry,
    installed_plugin,
    serve_app,
)

__all__ = [
    "CHAT",
    "BackendFactory",
    "FakeBackend",
    "NexusFactory",
    "Received",
    "RunningNexus",
    "backend_entry",
    "chunk",
    "completion",
    "free_port",
    "installed_plugin",
    "serve_app",
]
