"""The ``ollama`` backend adapter.

One health cycle costs ``GET /api/tags`` + ``GET /api/ps`` when no model changed:
``POST /api/show`` runs only for models whose ``digest`` is new (``ShowCache``), and
``GET /api/version`` only at first contact (and again after the backend was unreachable).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import msgspec

from nexus import GenericAdapter, ModelInfo, ProbeFailed
from nexus.config import BackendConfig
from nexus.errors import BadGateway, GatewayTimeout, ModelNotFound

from nexus_plugin_ollama import embeddings
from nexus_plugin_ollama.api import (
    Running,
    RunningModel,
    Show,
    TagModel,
    decode_running,
    decode_show,
    decode_tags,
    decode_version,
    error_message,
)
from nexus_plugin_ollama.capabilities import ShowCache, describe, guess
from nexus_plugin_ollama.settings import OllamaSettings

log = logging.getLogger("nexus_plugin_ollama")
_encode = msgspec.json.Encoder().encode
_SHOW_CONCURRENCY = 4  # /api/show calls in flight at once for one backend


class OllamaAdapter(GenericAdapter):
    """Ollama: native ``/api/*`` for models, capabilities and lifecycle; its OpenAI-compatible
    ``/v1/chat/completions`` and ``/v1/completions`` for inference (bytes untouched);
    ``/v1/embeddings`` translated to the batch endpoint ``/api/embed``."""

    type_name = "ollama"
    default_port = 11434
    mdns_service_types = ("_ollama._tcp.local.",)  # browsed by mDNS discovery, used by `nexus advertise`
    translates = True  # only /v1/embeddings is changed; every other body passes through as is

    def __init__(
        self,
        spec: BackendConfig,
        session: aiohttp.ClientSession,
        *,
        api_key: str | None = None,
        probe_timeout: float = 5.0,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(spec, session, api_key=api_key, probe_timeout=probe_timeout, settings=settings)
        self.options = OllamaSettings.parse(self.settings)
        self.lifecycle_timeout = aiohttp.ClientTimeout(total=self.options.lifecycle_timeout_seconds)
        self.version: str | None = None  # from /api/version, at first contact
        self.running: list[RunningModel] = []  # the last /api/ps answer
        self._shows = ShowCache()

    # -- health and models -------------------------------------------------------------

    async def probe(self) -> list[ModelInfo]:
        try:
            listed = await self._tags()
        except BaseException:
            self.version = None  # re-read at the next contact: the server may have been upgraded
            raise
        running, infos, _ = await asyncio.gather(self._ps(), self._describe_all(listed), self._record_version())
        if running is None:  # /api/ps failed: what is loaded is unknown, so nothing is ranked down
            return infos
        self.running = running.models
        names = {m.name for m in running.models} | {m.model for m in running.models if m.model}
        digests = {m.digest for m in running.models if m.digest}
        return [
            info if (tag.name in names or tag.digest in digests) else msgspec.structs.replace(info, loaded=False)
            for tag, info in zip(listed, infos, strict=True)
        ]

    async def _tags(self) -> list[TagModel]:
        async with self.session.get(self.upstream_url("/api/tags"), headers=self.upstream_headers(None),
                                    timeout=self.probe_timeout) as resp:
            if resp.status >= 300:
                raise ProbeFailed(f"HTTP error: {resp.status} from /api/tags")
            body = await resp.read()
        try:
            return decode_tags(body).models
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProbeFailed(f"invalid response: /api/tags is not {{\"models\": [...]}} ({exc})") from None

    async def _describe_all(self, listed: list[TagModel]) -> list[ModelInfo]:
        self._shows.keep_only({tag.name for tag in listed})
        limit = asyncio.Semaphore(_SHOW_CONCURRENCY)

        async def one(tag: TagModel) -> ModelInfo:
            cached = self._shows.get(tag.name, tag.digest)
            if cached is not None:
                return cached
            async with limit:
                show = await self._show(tag.name)
            listed_as_embedding = tag.name in self.spec.embedding_models
            if show is None:
                return guess(tag.name, embedding_listed=listed_as_embedding)
            info = describe(tag.name, show, embedding_listed=listed_as_embedding)
            self._shows.put(tag.name, tag.digest, info)
            return info

        return list(await asyncio.gather(*(one(tag) for tag in listed)))

    async def _show(self, name: str) -> Show | None:
        """``POST /api/show``; ``None`` (and a debug line) when it fails."""
        try:
            async with self.session.post(self.upstream_url("/api/show"), data=_encode({"model": name}),
                                         headers=self.upstream_headers(None), timeout=self.probe_timeout) as resp:
                body = await resp.read()
                if resp.status >= 300:
                    log.debug("Ollama %s: /api/show %s -> HTTP %d: %s", self.spec.name, name, resp.status,
                              error_message(body))
                    return None
            return decode_show(body)
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.debug("Ollama %s: /api/show %s failed: %r", self.spec.name, name, exc)
            return None

    async def _ps(self) -> Running | None:
        try:
            async with self.session.get(self.upstream_url("/api/ps"), headers=self.upstream_headers(None),
                                        timeout=self.probe_timeout) as resp:
                body = await resp.read()
                if resp.status >= 300:
                    log.debug("Ollama %s: /api/ps -> HTTP %d", self.spec.name, resp.status)
                    return None
            return decode_running(body)
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.debug("Ollama %s: /api/ps failed: %r", self.spec.name, exc)
            return None

    async def _record_version(self) -> None:
        if self.version is not None:
            return
        try:
            async with self.session.get(self.upstream_url("/api/version"), headers=self.upstream_headers(None),
                                        timeout=self.probe_timeout) as resp:
                body = await resp.read()
                if resp.status >= 300:
                    return
            self.version = decode_version(body).version
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError):
            return
        log.info("Ollama backend %s at %s: version %s", self.spec.name, self.base_url, self.version)

    # -- resources and lifecycle -------------------------------------------------------

    async def resource_usage(self) -> dict[str, object]:
        """What ``GET /api/ps`` says is in memory now (VRAM total is not reported by Ollama)."""
        running = await self._ps()
        if running is None:
            raise BadGateway(f"Ollama backend {self.spec.name} did not answer /api/ps")
        self.running = running.models
        return {
            "version": self.version,
            "vram_used_bytes": sum(m.size_vram for m in running.models),
            "memory_used_bytes": sum(m.size for m in running.models),
            "loaded_models": [
                {"name": m.name, "size_bytes": m.size, "vram_bytes": m.size_vram,
                 "context_length": m.context_length, "expires_at": m.expires_at}
                for m in running.models
            ],
        }

    async def load_model(self, model: str) -> None:
        """``POST /api/generate {"model"}`` with no prompt loads the model (docs/api.md "Load a model")."""
        body: dict[str, object] = {"model": model}
        if self.options.keep_alive is not None:
            body["keep_alive"] = self.options.keep_alive
        await self._generate(body, "load", model)

    async def unload_model(self, model: str) -> None:
        """``POST /api/generate {"model", "keep_alive": 0}`` unloads it (docs/api.md "Unload a model")."""
        await self._generate({"model": model, "keep_alive": 0}, "unload", model)

    async def _generate(self, body: dict[str, object], action: str, model: str) -> None:
        try:
            async with self.session.post(self.upstream_url("/api/generate"), data=_encode(body),
                                         headers=self.upstream_headers(None), timeout=self.lifecycle_timeout) as resp:
                data = await resp.read()
        except TimeoutError:
            raise GatewayTimeout(f"Ollama backend {self.spec.name} did not {action} {model} in "
                                 f"{self.options.lifecycle_timeout_seconds:g}s") from None
        except aiohttp.ClientError as exc:
            raise BadGateway(f"Ollama backend {self.spec.name} unreachable: {exc}") from None
        if resp.status == 404:
            raise ModelNotFound(f"Ollama backend {self.spec.name} has no model {model!r}: {error_message(data)}")
        if resp.status >= 300:
            raise BadGateway(f"Ollama backend {self.spec.name} could not {action} {model}: "
                             f"HTTP {resp.status}: {error_message(data)}")
        log.info("Ollama backend %s: %sed %s", self.spec.name, action, model)

    # -- proxying ----------------------------------------------------------------------

    def upstream_url(self, endpoint: str) -> str:
        if endpoint == embeddings.ENDPOINT:
            return self.base_url + embeddings.NATIVE_PATH
        return super().upstream_url(endpoint)

    def prepare_body(self, endpoint: str, body: bytes) -> bytes:
        return embeddings.prepare_request(body) if endpoint == embeddings.ENDPOINT else body

    def translate_response(self, endpoint: str, body: bytes) -> bytes:
        return embeddings.translate_response(body) if endpoint == embeddings.ENDPOINT else body
