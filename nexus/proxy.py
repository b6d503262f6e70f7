"""The forwarding engine: attempts in plan order, byte-exact bodies, event-by-event streams.

Rules (CONTRACT §3 "Streaming" and §10 "Retryable failures"):

* connection errors, timeouts, 429 and 5xx move to the next attempt; other 4xx are the
  client's and are returned as they are;
* a stream's headers are sent only once the backend produced its first body byte;
  before that a failure is retried like a non-streaming one;
* after the first byte, a failure ends the stream with one ``data: {"error": ...}``
  event and no ``data: [DONE]``;
* a client that goes away closes the upstream request at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from nexus.adapters.base import BackendAdapter
from nexus.budget import Budget
from nexus.body import rewrite_model
from nexus.config import ServerConfig
from nexus.errors import BadGateway, GatewayTimeout, InvalidRequest, NexusError, ServiceUnavailable
from nexus.logs import request_id_var
from nexus.record import RequestRecord
from nexus.routing.router import Attempt, RoutePlan, Unavailable

log = logging.getLogger("nexus.proxy")
_encode = msgspec.json.Encoder().encode
_SSE = "text/event-stream"
_EVENT = re.compile(rb".*?(?:\r\n\r\n|\n\n|$)", re.DOTALL)
_STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class _ErrorBody(msgspec.Struct):
    error: dict[str, Any]


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _ResponsePeek(msgspec.Struct):
    """Decoding into this validates the whole JSON body while building almost nothing."""

    usage: _Usage | None = None


class _Delta(msgspec.Struct):
    content: str | None = None


class _StreamChoice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None  # legacy completions


class _StreamChunk(msgspec.Struct):
    choices: list[_StreamChoice] = []
    usage: _Usage | None = None


_decode_error_body = msgspec.json.Decoder(_ErrorBody).decode
_decode_chunk = msgspec.json.Decoder(_StreamChunk).decode
_validate_json = msgspec.json.Decoder(_ResponsePeek).decode


class _Failed(Exception):
    """An attempt failed in a way the next candidate may fix."""

    def __init__(self, error: NexusError) -> None:
        super().__init__(error.message)
        self.error = error


class CapacityLost(Unavailable):
    """Every backend of the plan filled up before the request could be sent (e.g. a queued
    request was dispatched but another took the slot first): route or queue it again."""


def _error_event(message: str, code: str) -> bytes:
    payload = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + _encode(payload) + b"\n\n"


class _StreamMeter:
    """Reads what a relayed stream says about its size: the usage chunk (OpenAI sends one
    with ``stream_options.include_usage``; llama.cpp, vLLM and Ollama send one by default),
    and -- only for a priced backend, in case no usage comes -- the streamed text."""

    __slots__ = ("usage", "parts", "keep_text")

    def __init__(self, keep_text: bool) -> None:
        self.usage: _Usage | None = None
        self.parts: list[str] = []
        self.keep_text = keep_text

    def feed(self, chunk: bytes) -> None:
        if not self.keep_text and b'"usage"' not in chunk:
            return  # the common case for local backends: nothing to decode
        for event in _split_events(chunk):
            start = event.find(b"{")
            if start < 0 or not event.startswith(b"data:"):
                continue
            try:
                parsed = _decode_chunk(event[start:])
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if parsed.usage is not None:
                self.usage = parsed.usage
            if self.keep_text:
                for choice in parsed.choices:
                    text = choice.delta.content if choice.delta is not None else choice.text
                    if text:
                        self.parts.append(text)

    def text(self) -> str | None:
        return "".join(self.parts) if self.keep_text else None


def _events_end(buffer: bytes) -> int:
    """Index just past the last complete SSE event in ``buffer`` (0 if none)."""
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class Proxy:
    """Sends requests to backends over one shared ``ClientSession``."""

    def __init__(self, session: aiohttp.ClientSession, config: ServerConfig, budget: Budget) -> None:
        self.session = session
        self.budget = budget
        self.first_byte_timeout = config.request_timeout_seconds
        self.unary_timeout = aiohttp.ClientTimeout(total=config.request_timeout_seconds)
        self.stream_timeout = aiohttp.ClientTimeout(total=None, sock_read=config.stream_idle_timeout_seconds)
        self.shutting_down = False
        self._open_streams: set[aiohttp.ClientResponse] = set()
        self.on_release: Callable[[], None] = lambda: None  # capacity freed: the queue may dispatch

    def shutdown(self) -> None:
        """Cut every open upstream stream: each ends with an error event, never ``[DONE]``."""
        self.shutting_down = True
        for resp in list(self._open_streams):
            resp.close()

    async def forward(
        self,
        request: web.Request,
        endpoint: str,
        body: bytes,
        plan: RoutePlan,
        record: RequestRecord,
    ) -> web.StreamResponse:
        """Try each attempt of ``plan`` until one answers; raise the last failure otherwise.

        ``record`` is filled in as the attempts go; the caller hands it to the observers."""
        try:
            return await self._attempts(request, endpoint, body, plan, record)
        except CapacityLost:
            raise  # not an outcome yet: the caller routes it again
        except asyncio.CancelledError:
            record.outcome = "cancelled"
            raise
        except NexusError as exc:
            record.outcome, record.status, record.error = "error", exc.status, exc.message
            raise

    async def _attempts(self, request: web.Request, endpoint: str, body: bytes, plan: RoutePlan,
                        record: RequestRecord) -> web.StreamResponse:
        client_auth = request.headers.get("Authorization")
        request_id = request_id_var.get() or ""
        bodies: dict[str, bytes] = {}
        last: NexusError | None = None
        over_budget: str | None = None  # the model whose cloud hold the budget refused
        for attempt in plan:
            backend = attempt.candidate.backend
            if backend.at_capacity:  # filled up since routing: not a failure, just not this one
                continue
            quality = backend.quality
            if quality.excluded and quality.blocks(time.monotonic()):  # only its one half-open trial may pass
                continue
            if not await self.budget.hold(attempt, record, body):
                over_budget = attempt.model
                continue
            if backend.at_capacity:  # the hold may have waited on the state store
                continue
            if quality.excluded:
                quality.start_trial()
            record.attempt(attempt)
            adapter = backend.adapter
            out = body
            if attempt.model != record.model:
                out = bodies.get(attempt.model) or bodies.setdefault(attempt.model, rewrite_model(body, attempt.model))
            if adapter.translates:
                out = adapter.prepare_body(endpoint, out)
            url = adapter.upstream_url(endpoint)
            headers = adapter.upstream_headers(client_auth)
            headers["X-Request-Id"] = request_id
            backend.pending += 1
            backend.total_requests += 1
            started = record.attempt_started = time.monotonic()
            try:
                if record.stream:
                    response = await self._stream(request, attempt, url, out, headers, record)
                else:
                    response = await self._unary(attempt, url, out, headers, record)
            except _Failed as failed:
                record.retries += 1
                last = failed.error
                backend.quality.record(False, None)
                log.warning("Backend %s failed: %s", backend.id, last.message, extra={"attempt": record.retries})
                continue
            finally:
                backend.pending -= 1
                self.on_release()
            if record.outcome != "cancelled":  # this backend's own time to first byte
                first_byte = record.first_byte_at or time.monotonic()
                backend.quality.record(record.outcome != "interrupted", (first_byte - started) * 1000)
            return response
        if last is None and over_budget is not None:
            raise self.budget.refuse(over_budget)
        if last is None:  # every candidate filled up between routing and sending
            raise CapacityLost(ServiceUnavailable("All backends for this model are at capacity",
                                                  headers={"Retry-After": "1"}), None)
        record.retries -= 1  # the last failure is not a retry
        raise last

    # -- one attempt ---------------------------------------------------------------------

    async def _send(self, url: str, body: bytes, headers: dict[str, str], timeout: aiohttp.ClientTimeout
                    ) -> aiohttp.ClientResponse:
        """POST, retrying once when a pooled connection turns out dead before any response byte.

        Some servers (llama.cpp) close a keep-alive connection after a stream; aiohttp may
        reuse it before noticing. That failure is invisible to the client.
        """
        try:
            return await self.session.post(url, data=body, headers=headers, timeout=timeout)
        except _STALE_CONNECTION as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise
            log.debug("Stale pooled connection to %s (%s); retrying on a fresh one", url, exc)
            return await self.session.post(url, data=body, headers=headers, timeout=timeout)

    async def _open(self, url: str, body: bytes, headers: dict[str, str], timeout: aiohttp.ClientTimeout,
                    ) -> aiohttp.ClientResponse:
        """Send and classify transport failures as retryable."""
        try:
            return await self._send(url, body, headers, timeout)
        except asyncio.TimeoutError:
            raise _Failed(GatewayTimeout("Backend request timed out")) from None
        except aiohttp.ClientError as exc:
            raise _Failed(BadGateway(f"Network error: {exc}")) from None

    def _error_response(self, attempt: Attempt, resp: aiohttp.ClientResponse, data: bytes,
                        record: RequestRecord) -> web.Response:
        """A non-2xx answer: retryable (429, 5xx) or the client's own 4xx, passed through."""
        status = resp.status
        text = data[:500].decode(errors="replace")
        if status == 429 or status >= 500:
            backend = attempt.candidate.backend
            retry_after = _retry_after_seconds(resp.headers.get("Retry-After"))
            if retry_after:
                backend.retry_after_until = time.monotonic() + retry_after
                log.warning("Backend %s asked to wait %gs (HTTP %d)", backend.id, retry_after, status)
            raise _Failed(BadGateway(f"Backend returned {status}: {text}"))
        if status in (401, 403) and attempt.candidate.backend.adapter.api_key:
            # Nexus's own configured key was refused: not the client's fault, and the body
            # may quote part of that key. Try elsewhere; never pass it through.
            raise _Failed(BadGateway(f"Backend {attempt.candidate.backend.id} rejected the key configured "
                                     f"for it (HTTP {status}); check its api_key_env"))
        record.status = status
        record.cost_usd = record.cost_source = None  # a refused request costs nothing
        headers = self._headers(attempt, record)
        try:
            _decode_error_body(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise InvalidRequest(f"Backend returned {status}: {text}", status=status, code="backend_error",
                                 headers=headers) from None
        headers["Content-Type"] = "application/json"
        return web.Response(body=data, status=status, headers=headers)

    async def _unary(self, attempt: Attempt, url: str, body: bytes, headers: dict[str, str],
                     record: RequestRecord) -> web.Response:
        resp = await self._open(url, body, headers, self.unary_timeout)
        try:
            data = await resp.read()
        except asyncio.TimeoutError:
            raise _Failed(GatewayTimeout("Backend request timed out")) from None
        except aiohttp.ClientError as exc:
            raise _Failed(BadGateway(f"Network error while reading the response: {exc}")) from None
        finally:
            resp.release()
        return self._complete(attempt, resp, data, record)

    def _complete(self, attempt: Attempt, resp: aiohttp.ClientResponse, data: bytes,
                  record: RequestRecord) -> web.Response:
        if resp.status >= 300:
            return self._error_response(attempt, resp, data, record)
        usage = _usage(data)
        adapter = attempt.candidate.backend.adapter
        if adapter.translates:
            data = adapter.translate_response(record.endpoint, data)
            usage = _usage(data)  # the client's view: the translated body carries the OpenAI usage
        if usage is not None:
            record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        record.status, record.outcome = resp.status, "success"
        self.budget.price_response(attempt, record, time.monotonic() - record.attempt_started)
        headers = self._headers(attempt, record)
        headers["Content-Type"] = resp.headers.get("Content-Type", "application/json")
        return web.Response(body=data, status=resp.status, headers=headers)

    async def _stream(self, request: web.Request, attempt: Attempt, url: str, body: bytes,
                      headers: dict[str, str], record: RequestRecord) -> web.StreamResponse:
        resp: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                resp = await self._open(url, body, headers, self.stream_timeout)
                if resp.status >= 300 or not resp.headers.get("Content-Type", "").startswith(_SSE):
                    data = await resp.read()  # an error, or a backend that ignored stream=true
                    resp.release()
                    return self._complete(attempt, resp, data, record)
                first = await resp.content.readany()
        except asyncio.TimeoutError:
            if resp is not None:
                resp.close()
            raise _Failed(GatewayTimeout("Backend sent no data before the request timeout")) from None
        except aiohttp.ClientError as exc:
            if resp is not None:
                resp.close()
            raise _Failed(BadGateway(f"Network error before the stream started: {exc}")) from None
        if not first:
            resp.close()
            raise _Failed(BadGateway("Backend closed the stream before sending any event"))
        record.first_byte_at = time.monotonic()
        record.ttft_ms = round((record.first_byte_at - record.started) * 1000, 1)
        return await self._relay(request, attempt, resp, first, record)

    async def _relay(self, request: web.Request, attempt: Attempt, resp: aiohttp.ClientResponse,
                     buffer: bytes, record: RequestRecord) -> web.StreamResponse:
        endpoint = record.endpoint
        record.status = resp.status
        headers = self._headers(attempt, record)
        headers["Content-Type"] = resp.headers["Content-Type"]
        headers["Cache-Control"] = "no-cache"
        response = web.StreamResponse(status=resp.status, headers=headers)
        adapter = attempt.candidate.backend.adapter
        translate = _event_translator(adapter, endpoint) if adapter.translates else None
        done = False
        last_chunk = b""
        failure: str | None = None
        backend = attempt.candidate.backend
        meter = _StreamMeter(keep_text=backend.cloud and self.budget.prices.price(attempt.model) is not None)
        self._open_streams.add(resp)
        try:
            await response.prepare(request)
            while True:
                cut = _events_end(buffer)
                if cut:
                    chunk, buffer = buffer[:cut], buffer[cut:]
                    if translate is not None:
                        chunk = translate(chunk)
                    done = done or b"[DONE]" in chunk
                    last_chunk = chunk
                    meter.feed(chunk)
                    await response.write(chunk)
                try:
                    data = await resp.content.readany()
                except asyncio.TimeoutError:
                    failure = "Backend stream stalled: no event within the idle timeout"
                    break
                except aiohttp.ClientError as exc:
                    failure = f"Backend stream broke: {exc}"
                    break
                if not data:
                    break
                buffer += data
            if buffer:  # a last event without its blank line
                if translate is not None:
                    buffer = translate(buffer)
                done = done or b"[DONE]" in buffer
                last_chunk = buffer
                meter.feed(buffer)
                await response.write(buffer)
            if self.shutting_down and not done:
                failure = "Nexus is shutting down; the stream was cut"
            if done:
                record.outcome = "success"
            else:
                record.outcome, record.error = "interrupted", failure or "Backend closed the stream early"
                if not _last_event(last_chunk).startswith(b'data: {"error"'):  # the backend said nothing
                    await response.write(_error_event(record.error, "stream_interrupted"))
            await response.write_eof()
        except _TranslationFailed as exc:
            record.outcome, record.error = "interrupted", str(exc)
            await response.write(_error_event(str(exc), "stream_interrupted"))
            await response.write_eof()
        except ConnectionResetError:
            record.outcome = "cancelled"
        finally:
            self._open_streams.discard(resp)
            resp.close()
            if meter.usage is not None:
                record.prompt_tokens, record.completion_tokens = meter.usage.prompt_tokens, meter.usage.completion_tokens
            self.budget.price_response(attempt, record, time.monotonic() - record.attempt_started, meter.text())
        return response

    def _headers(self, attempt: Attempt, record: RequestRecord) -> dict[str, str]:
        """The ``X-Nexus-*`` headers, with the cost (the real one for a complete body, the
        reserved worst case for a stream) and the budget's status when it is not Normal."""
        headers = nexus_headers(attempt, record.retries)
        cost = record.cost_usd
        if cost is not None and cost >= 0.00005:  # shown with 4 decimals, only when > 0
            headers["X-Nexus-Cost-Estimated"] = f"{cost:.4f}"
        budget_headers = self.budget.headers()
        if budget_headers:
            headers.update(budget_headers)
        return headers


class _TranslationFailed(Exception):
    pass


def _event_translator(adapter: BackendAdapter, endpoint: str) -> Callable[[bytes], bytes]:
    """Translate each SSE event of a chunk on its own; a failing adapter ends the stream."""

    def translate(chunk: bytes) -> bytes:
        try:
            return b"".join(adapter.translate_event(endpoint, event) for event in _split_events(chunk))
        except Exception as exc:
            log.exception("Adapter %s failed to translate a stream event", adapter.type_name)
            raise _TranslationFailed(f"Backend adapter {adapter.type_name} failed: {exc}") from exc

    return translate


def _split_events(chunk: bytes) -> list[bytes]:
    """Complete SSE events with their terminators (``\n\n`` or ``\r\n\r\n``)."""
    return [event for m in _EVENT.finditer(chunk) if (event := m.group(0))]


def _usage(data: bytes) -> _Usage | None:
    """The ``usage`` of a JSON body; raises a retryable failure when the body is not JSON."""
    try:
        return _validate_json(data).usage
    except msgspec.ValidationError:
        return None  # valid JSON of an unexpected shape: the client's SDK will judge it
    except msgspec.DecodeError as exc:
        raise _Failed(BadGateway(f"Invalid backend response: {exc}")) from None


def _last_event(chunk: bytes) -> bytes:
    return chunk.rstrip(b"\r\n").rsplit(b"\n\n", 1)[-1].lstrip(b"\r\n")


def _retry_after_seconds(value: str | None) -> float:
    """Seconds from a ``Retry-After`` header (delta-seconds form; dates are ignored), capped at 1 h."""
    if not value:
        return 0.0
    try:
        return min(max(float(value), 0.0), 3600.0)
    except ValueError:
        return 0.0


def nexus_headers(attempt: Attempt, failures: int) -> dict[str, str]:
    backend = attempt.candidate.backend
    reason = "failover" if failures or attempt.fallback else attempt.intent.annotations.get(
        "route_reason", "capability-match")
    headers = {
        "X-Nexus-Backend": backend.id,
        "X-Nexus-Backend-Type": "cloud" if backend.cloud else "local",
        "X-Nexus-Route-Reason": reason,
        "X-Nexus-Privacy-Zone": backend.zone,
        "X-Request-Id": request_id_var.get() or "",
    }
    if attempt.fallback:
        headers["X-Nexus-Fallback-Model"] = attempt.model
    if failures:
        headers["X-Nexus-Retries"] = str(failures)
    return headers
