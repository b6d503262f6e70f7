"""/v1/history: every request (routed, refused, streamed) as one entry, oldest first, the
last 100 kept, and written to the state store so it survives a restart."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from nexus.history import CAPACITY, MAX_ERROR_CHARS, MAX_MODEL_CHARS, History, entry_of
from nexus.record import RequestRecord
from nexus.state.base import HistoryEntry, MemoryStore
from nexus.testing import CHAT, BackendFactory, NexusFactory, backend_entry


def finished(request_id: str, **fields: object) -> RequestRecord:
    record = RequestRecord("/v1/chat/completions", "test-model", False, request_id=request_id)
    for name, value in fields.items():
        setattr(record, name, value)
    record.end()
    return record


async def test_history_lists_routed_refused_and_streamed_requests_oldest_first(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    backend = await fake_backend(name="gpu-1")
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "first"}) as resp:
        assert resp.status == 200
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "nope"},
                         headers={"X-Request-Id": "refused"}) as resp:
        assert resp.status == 404
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"X-Request-Id": "streamed"}) as resp:
        assert resp.status == 200
        await resp.read()
    async with http.get(f"{gw.url}/v1/history") as resp:
        assert resp.status == 200
        history = await resp.json()

    assert [e["request_id"] for e in history] == ["first", "refused", "streamed"]
    first, refused, streamed = history
    assert first["status"] == "Success" and first["status_code"] == 200
    assert first["backend_id"] == "gpu-1" and first["backend_type"] == "local"
    assert first["prompt_tokens"] == 3 and first["completion_tokens"] == 2 and not first["stream"]
    assert refused["backend_id"] == "none" and refused["status"] == "Error" and refused["status_code"] == 404
    assert "nope" in refused["error_message"] and refused["resolved_model"] is None
    assert streamed["stream"] and streamed["status"] == "Success" and streamed["ttft_ms"] is not None
    assert all(abs(e["timestamp"] - time.time()) < 60 for e in history)


def test_history_keeps_the_newest_hundred() -> None:
    history = History()
    for i in range(CAPACITY + 5):
        history.record(finished(f"r{i}", outcome="success", status=200, backend="b"))
    ids = [e.request_id for e in history.entries()]
    assert len(ids) == CAPACITY
    assert ids[0] == "r5" and ids[-1] == f"r{CAPACITY + 4}"


def test_entry_truncates_clamps_and_names_the_outcome() -> None:
    now = time.time()
    record = finished("x", outcome="interrupted", status=200, error="e" * 5000)
    record.model = "m" * 1000
    record.timestamp = now + 3600  # a clock jump must not put a request in the future
    entry = entry_of(record, now=now)
    assert len(entry.model) == MAX_MODEL_CHARS and len(entry.error_message or "") == MAX_ERROR_CHARS
    assert entry.timestamp == round(now, 3)
    assert entry.status == "Interrupted" and entry.backend_id == "none"
    assert entry_of(finished("c", outcome="cancelled")).status == "Cancelled"


async def test_history_survives_a_restart_through_the_store() -> None:
    store = MemoryStore()
    before = History()
    await before.load(store)
    for i in range(3):
        before.record(finished(f"r{i}", outcome="success", status=200, backend="b"))
    after = History()  # a new process, same store
    after.record(finished("early", outcome="error", status=503))  # recorded before the store was open
    await after.load(store)
    assert [e.request_id for e in after.entries()] == ["r0", "r1", "r2", "early"]
    assert after.entries()[0] == before.entries()[0]


async def test_gateway_writes_history_to_its_store(fake_backend: BackendFactory, nexus: NexusFactory,
                                                   http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    store = gw.gateway.store  # opened by Gateway.start, which handed it to the history
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "kept"}) as resp:
        assert resp.status == 200
    stored = await store.recent_history(10)
    assert stored[-1].request_id == "kept" and stored[-1].status == "Success"


async def test_a_failing_listener_does_not_lose_the_entry() -> None:
    history = History()
    seen: list[str] = []

    def broken(_: object) -> None:
        raise RuntimeError("boom")

    history.listeners += [broken, lambda e: seen.append(e.request_id)]
    history.record(finished("r", outcome="success", status=200))
    assert seen == ["r"] and len(history) == 1


async def test_history_survives_a_gateway_restart_with_sqlite(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession,
        tmp_path: Path) -> None:
    backend = await fake_backend()
    raw = {"backends": [backend_entry(backend)], "state": {"backend": "sqlite", "path": str(tmp_path / "state.db")}}
    first = await nexus(raw)
    for request_id in ("before-1", "before-2"):
        async with http.post(f"{first.url}/v1/chat/completions", json=CHAT,
                             headers={"X-Request-Id": request_id}) as resp:
            assert resp.status == 200
    await first.runner.cleanup()  # stops the gateway: the store writes out what is queued

    second = await nexus(raw)
    async with http.get(f"{second.url}/v1/history") as resp:
        history = await resp.json()
    assert [e["request_id"] for e in history] == ["before-1", "before-2"]
    assert history[0]["status"] == "Success" and history[0]["backend_id"] == "fake"


class UnreadableStore(MemoryStore):
    async def recent_history(self, limit: int) -> list[HistoryEntry]:
        raise OSError("disk I/O error")


async def test_a_store_that_cannot_be_read_starts_an_empty_history(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nexus.history")
    store = UnreadableStore()
    history = History()
    history.record(finished("early", outcome="success", status=200))
    await history.load(store)  # never raises because of the store
    assert [e.request_id for e in history.entries()] == ["early"]
    assert any("disk I/O error" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    history.record(finished("later", outcome="success", status=200))
    assert [e.request_id for e in store._history] == ["later"]  # still written to the store


async def test_an_undecodable_stored_row_does_not_block_start_up(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    backend = await fake_backend()
    path = tmp_path / "state.db"
    raw = {"backends": [backend_entry(backend)], "state": {"backend": "sqlite", "path": str(path)}}
    first = await nexus(raw)
    async with http.post(f"{first.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "kept"}) as resp:
        assert resp.status == 200
    await first.runner.cleanup()
    with sqlite3.connect(path) as conn:  # a damaged row, and one of a format this Nexus does not know
        conn.executemany("INSERT INTO history (entry) VALUES (?)", [(b"\xff{garbage",), (b'{"request_id": 7}',)])
    conn.close()

    second = await nexus(raw)
    async with http.get(f"{second.url}/v1/history") as resp:
        assert resp.status == 200
        history = await resp.json()
    assert [e["request_id"] for e in history] == ["kept"]
