"""Nexus backend plugin for Ollama (``type = "ollama"``).

Follows Ollama's API documentation in the ollama/ollama repository: ``docs/api.md``
(``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/embed``, ``/api/generate`` load and
unload, ``/api/version``), ``docs/openapi.yaml`` (the same endpoints' schemas, incl.
``context_length`` in ``/api/ps``) and ``docs/api/openai-compatibility.mdx`` (formerly
``docs/openai.md``: ``/v1/chat/completions`` and ``/v1/completions``).
"""

from __future__ import annotations

from nexus import BackendAdapter, hookimpl

from nexus_plugin_ollama.adapter import OllamaAdapter

__version__ = "0.1.0"
__all__ = ["OllamaAdapter", "__version__"]


@hookimpl
def register_backend_types() -> list[type[BackendAdapter]]:
    return [OllamaAdapter]
