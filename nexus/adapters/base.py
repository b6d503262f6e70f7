"""The backend adapter contract, with the OpenAI-compatible behaviour as its default.

An adapter knows one backend *type*: how to probe it, list its models with their
capabilities, and address and authenticate proxied requests. Plugins subclass
:class:`BackendAdapter` (usually through :class:`nexus.adapters.generic.GenericAdapter`)
and register the class with the ``register_backend_types`` hook.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import aiohttp

from nexus.adapters.heuristics import model_from_name
from nexus.config import BackendConfig
from nexus.registry import ModelInfo


class ProbeFailed(Exception):
    """The backend did not answer its health probe correctly (counts as a failure)."""


class BackendLoading(ProbeFailed):
    """The backend is up but still loading its model (llama.cpp answers 503 on ``/health``).

    The backend is marked ``loading``: not routed to, and not counted as a failure.
    """


class UnsupportedOperation(Exception):
    """The backend type cannot do this (e.g. load or unload a model)."""


class BackendAdapter:
    """Base class of every adapter. One instance per backend, built once at registration.

    Class attributes:
        type_name: the config ``type`` this adapter serves (e.g. ``"ollama"``).
        default_port: the backend's well-known port (used by discovery and docs).
        cloud: ``True`` for cloud services (header ``X-Nexus-Backend-Type: cloud``,
            default zone ``open``, client ``Authorization`` never forwarded).
        translates: ``True`` when :meth:`translate_response` / :meth:`translate_event`
            change bytes; when ``False`` the proxy skips calling them.
        mdns_service_types: mDNS service types this backend announces itself as (e.g.
            ``("_ollama._tcp.local.",)``): browsed by mDNS discovery, which gives a service
            of one of them this type, and used by ``nexus advertise`` (the first one).
    """

    type_name: ClassVar[str] = ""
    default_port: ClassVar[int | None] = None
    cloud: ClassVar[bool] = False
    translates: ClassVar[bool] = False
    mdns_service_types: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        spec: BackendConfig,
        session: aiohttp.ClientSession,
        *,
        api_key: str | None = None,
        probe_timeout: float = 5.0,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.check_spec(spec)  # also for backends added at run time or discovered
        self.spec = spec
        self.session = session
        self.api_key = api_key
        self.base_url = normalise_base_url(spec.url)
        self.probe_timeout = aiohttp.ClientTimeout(total=probe_timeout)
        self.settings = settings or {}
        self._auth_header = {"Authorization": f"Bearer {api_key}"} if api_key else None

    @classmethod
    def check_spec(cls, spec: BackendConfig) -> None:
        """Validate a backend's config at start-up (``nexus serve``, ``nexus config check``).

        Raise ``ValueError`` with a one-line message (e.g. a required ``api_key_env`` is
        missing); it becomes the start-up error. The default accepts everything.
        """

    @classmethod
    def default_zone(cls) -> str:
        return "open" if cls.cloud else "restricted"

    # -- health and models -------------------------------------------------------------

    async def probe(self) -> list[ModelInfo] | None:
        """Check the backend and list its models.

        Returns the models (possibly empty), or ``None`` when the backend answered but
        its model list could not be parsed (healthy; the last known list is kept).
        Raises :class:`ProbeFailed` (or an ``aiohttp``/timeout error) when unhealthy.
        """
        raise NotImplementedError

    async def identify(self) -> bool:
        """Whether the server at ``base_url`` is of this type (``nexus backends add`` without
        ``--type``). The default accepts any server whose probe succeeds; an adapter whose
        probe also accepts other servers (a fallback path) must answer more strictly."""
        return await self.probe() is not None

    def describe_model(self, model_id: str) -> ModelInfo:
        """Capabilities of a model the config names (``models``) or the backend lists bare."""
        return model_from_name(model_id, embedding=model_id in self.spec.embedding_models)

    def count_tokens(self, model: str, text: str) -> int:
        """Tokens of ``text`` for ``model``, for cost estimates (called on the event loop, so
        it must be fast and do no I/O). The default is upstream's heuristic
        ``floor(max(len/4, 1) * 1.15)``; the OpenAI adapter counts exactly with tiktoken."""
        return heuristic_tokens(text)

    async def resource_usage(self) -> dict[str, object]:
        """What the backend uses now (loaded models, memory). Optional."""
        raise UnsupportedOperation(f"{self.type_name} backends do not report resource usage")

    async def load_model(self, model: str) -> None:
        """Load ``model`` into memory. Optional."""
        raise UnsupportedOperation(f"{self.type_name} backends cannot load models on request")

    async def unload_model(self, model: str) -> None:
        """Unload ``model`` from memory. Optional."""
        raise UnsupportedOperation(f"{self.type_name} backends cannot unload models on request")

    # -- proxying ----------------------------------------------------------------------

    def upstream_url(self, endpoint: str) -> str:
        """The URL for an OpenAI API path such as ``/v1/chat/completions``."""
        return self.base_url + endpoint

    def upstream_headers(self, client_authorization: str | None) -> dict[str, str]:
        """Outgoing headers. CONTRACT §10: a configured key always wins; the client's
        ``Authorization`` goes only to local backends without a configured key."""
        headers = {"Content-Type": "application/json"}
        if self._auth_header is not None:
            headers.update(self._auth_header)
        elif client_authorization and not self.cloud:
            headers["Authorization"] = client_authorization
        return headers

    def prepare_body(self, endpoint: str, body: bytes) -> bytes:
        """The body sent upstream (already model-rewritten). Identity unless ``translates``."""
        return body

    def translate_response(self, endpoint: str, body: bytes) -> bytes:
        """A non-streaming 2xx body as the client should see it. Identity unless ``translates``."""
        return body

    def translate_event(self, endpoint: str, event: bytes) -> bytes:
        """One SSE event, with its blank-line terminator (the last event of a stream that
        ends without one comes without it). Identity unless ``translates``. Raising ends
        the stream with an error event."""
        return event


def heuristic_tokens(text: str) -> int:
    """Upstream's estimate for models without a known tokenizer (reference §5.8)."""
    return int(max(len(text) / 4, 1) * 1.15) if text else 0


def normalise_base_url(url: str) -> str:
    """Strip a trailing slash and a trailing ``/v1`` so paths are never doubled."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url
