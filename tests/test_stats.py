"""/v1/stats: real counters for success, errors, cancellations, per backend and per model."""

from __future__ import annotations

import aiohttp

from nexus.testing import CHAT, BackendFactory, NexusFactory, backend_entry


async def test_stats_count_what_happened(fake_backend: BackendFactory, nexus: NexusFactory,
                                         http: aiohttp.ClientSession) -> None:
    good = await fake_backend(name="good")
    bad = await fake_backend(name="bad", models=["other"], mode="status:500")
    gw = await nexus({"backends": [backend_entry(good), backend_entry(bad, max_concurrent=4)]})
    for _ in range(3):
        async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        await resp.read()
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "other"}) as resp:
        assert resp.status == 502
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "nope"}) as resp:
        assert resp.status == 404
    async with http.get(f"{gw.url}/v1/stats") as resp:
        stats = await resp.json()
    assert stats["requests"] == {"total": 6, "success": 4, "errors": 2, "cancelled": 0, "interrupted": 0,
                                 "errors_by_status": {"404": 1, "502": 1},
                                 "errors_by_type": {"backend_error": 1, "model_not_found": 1}}
    by_id = {b["id"]: b for b in stats["backends"]}
    assert by_id["good"]["requests"] == 4 and by_id["good"]["pending"] == 0
    assert by_id["bad"]["max_concurrent"] == 4 and by_id["bad"]["zone"] == "restricted"
    assert set(by_id["good"]["quality"]) == {"error_rate_1h", "avg_ttft_ms", "success_rate_24h", "requests_1h",
                                             "excluded"}
    test_model = next(m for m in stats["models"] if m["model"] == "test-model")
    assert test_model["requests"] == 4 and test_model["prompt_tokens"] == 9  # 3 answers with usage, 1 stream
    assert stats["queue"]["depth"] == {"high": 0, "normal": 0}
    assert set(stats["routing"]["stage_seconds"]) == {"request_analysis", "privacy", "budget", "tier", "quality",
                                                       "scheduling"}


async def test_requests_refused_for_their_body_are_counted_and_in_history(
        nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw = await nexus({"server": {"max_body_bytes": 1000}})
    async with http.post(f"{gw.url}/v1/chat/completions", data=b"{not json",
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
    async with http.post(f"{gw.url}/v1/chat/completions", data=b"x" * 5000,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
    async with http.get(f"{gw.url}/v1/stats") as resp:
        stats = await resp.json()
    assert stats["requests"]["errors"] == 2
    assert stats["requests"]["errors_by_status"] == {"400": 1, "413": 1}
    assert stats["requests"]["errors_by_type"] == {"invalid_request": 1, "payload_too_large": 1}
    async with http.get(f"{gw.url}/v1/history") as resp:
        history = await resp.json()
    assert [(h["status_code"], h["backend_id"]) for h in history] == [(400, "none"), (413, "none")]
