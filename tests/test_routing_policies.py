"""Privacy zones and capability tiers end to end (reference §5.10, §5.11, §8 items 40-49;
CONTRACT §3 headers and errors, §4 routing, §10 "Tiers")."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from nexus import config as config_mod
from nexus.errors import ConfigError
from nexus.registry import Status
from nexus.routing.policy import Policies
from nexus.testing import CHAT, BackendFactory, NexusFactory, RunningNexus, backend_entry

STREAM = {**CHAT, "stream": True}
RESTRICT_TEST = {"model_pattern": "test-*", "privacy": "restricted"}
NO_QUEUE = {"enabled": False}


async def chat(http: aiohttp.ClientSession, gw: RunningNexus, body: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """POST a chat; returns (status, headers, JSON body)."""
    async with http.post(f"{gw.url}/v1/chat/completions", json=body or CHAT, headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


def mark(gw: RunningNexus, name: str, status: Status) -> None:
    backend = gw.gateway.registry.get(name)
    assert backend is not None
    backend.set_status(status)


def rejection_details(headers: Any) -> list[dict[str, Any]]:
    return json.loads(headers["X-Nexus-Rejection-Details"])


# -- privacy -------------------------------------------------------------------------------


async def test_restricted_policy_never_routes_to_an_open_backend(fake_backend: BackendFactory, nexus: NexusFactory,
                                                                 http: aiohttp.ClientSession) -> None:
    cloud = await fake_backend(name="a-cloud")
    local = await fake_backend(name="b-local")
    gw = await nexus({"routing": {"policies": [RESTRICT_TEST]},
                      # the open backend would win on priority if it were eligible
                      "backends": [backend_entry(cloud, zone="open", priority=1), backend_entry(local, priority=90)]})
    for _ in range(4):
        status, headers, _ = await chat(http, gw)
        assert status == 200
        assert headers["X-Nexus-Backend"] == "b-local"
        assert headers["X-Nexus-Privacy-Zone"] == "restricted"
        assert headers["X-Nexus-Route-Reason"] == "privacy-requirement"
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM) as resp:
        assert resp.headers["X-Nexus-Privacy-Zone"] == "restricted"
        assert resp.headers["X-Nexus-Route-Reason"] == "privacy-requirement"
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert cloud.chats == []


async def test_without_policies_both_zones_are_eligible(fake_backend: BackendFactory, nexus: NexusFactory,
                                                        http: aiohttp.ClientSession) -> None:
    cloud = await fake_backend(name="a-cloud")
    local = await fake_backend(name="b-local")
    gw = await nexus({"routing": {"strategy": "round_robin"},
                      "backends": [backend_entry(cloud, zone="open"), backend_entry(local)]})
    zones = set()
    for _ in range(4):
        status, headers, _ = await chat(http, gw)
        assert status == 200
        assert headers["X-Nexus-Route-Reason"] == "capability-match"
        zones.add((headers["X-Nexus-Backend"], headers["X-Nexus-Privacy-Zone"]))
    assert zones == {("a-cloud", "open"), ("b-local", "restricted")}
    assert len(cloud.chats) == len(local.chats) == 2


async def test_zone_is_parsed_case_insensitively(fake_backend: BackendFactory, nexus: NexusFactory,
                                                 http: aiohttp.ClientSession) -> None:
    cloud = await fake_backend(name="a-cloud")
    local = await fake_backend(name="b-local")
    gw = await nexus({"routing": {"policies": [RESTRICT_TEST]},
                      "backends": [backend_entry(cloud, zone="OPEN", priority=1),
                                   backend_entry(local, zone="Restricted", priority=90)]})
    status, headers, _ = await chat(http, gw)
    assert (status, headers["X-Nexus-Backend"]) == (200, "b-local")
    assert cloud.chats == []


async def test_restricted_backend_down_gives_503_not_a_cross_zone_route(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    """Item 40: the open backend is healthy, the restricted one is not: 503, never the open one."""
    cloud = await fake_backend(name="cloud")
    local = await fake_backend(name="local", models_status=500)  # fails its health check
    gw = await nexus({"routing": {"policies": [RESTRICT_TEST]}, "queue": NO_QUEUE,
                      "backends": [backend_entry(cloud, zone="open"), backend_entry(local, models=["test-model"])]})
    assert gw.gateway.registry.get("local").status is Status.UNHEALTHY  # type: ignore[union-attr]
    status, headers, body = await chat(http, gw)
    assert status == 503
    assert body["error"]["type"] == "service_unavailable"
    assert body["context"]["privacy_zone_required"] == "restricted"
    assert body["context"]["available_backends"] == ["cloud"]
    assert "required_tier" not in body["context"]
    details = {d["backend"]: d for d in rejection_details(headers)}
    assert details["cloud"]["reconciler"] == "privacy"
    assert "restricted" in details["cloud"]["reason"] and details["cloud"]["suggested_action"]
    assert details["local"]["reconciler"] == "scheduling"
    assert "unhealthy" in details["local"]["reason"].lower()
    assert "privacy" in headers["X-Nexus-Rejection-Reasons"]
    assert headers["X-Nexus-Rejection-Reasons"].startswith("2 ")
    assert cloud.chats == [] and local.chats == []


async def test_fallback_without_a_policy_cannot_reach_an_open_backend(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    """The primary's restricted policy binds its fallbacks too, even a fallback no policy matches."""
    primary = await fake_backend(name="primary", models=["secret-model"], models_status=500)
    cloud = await fake_backend(name="cloud", models=["public-model"])
    gw = await nexus({"routing": {"policies": [{"model_pattern": "secret-*", "privacy": "restricted"}],
                                  "fallbacks": {"secret-model": ["public-model"]}},
                      "queue": NO_QUEUE,
                      "backends": [backend_entry(primary, models=["secret-model"]),
                                   backend_entry(cloud, zone="open")]})
    status, headers, body = await chat(http, gw, {**CHAT, "model": "secret-model"})
    assert status == 503
    assert body["context"]["privacy_zone_required"] == "restricted"
    assert body["context"]["models_tried"] == ["secret-model", "public-model"]
    assert {(d["backend"], d["reconciler"]) for d in rejection_details(headers)} == {
        ("primary", "scheduling"), ("cloud", "privacy")}
    assert cloud.chats == []
    # the same public model asked for directly is not bound by the secret model's policy
    status, headers, _ = await chat(http, gw, {**CHAT, "model": "public-model"})
    assert (status, headers["X-Nexus-Backend"], headers["X-Nexus-Privacy-Zone"]) == (200, "cloud", "open")


async def test_fallback_under_a_restricted_primary_uses_only_restricted_backends(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    primary = await fake_backend(name="primary", models=["secret-model"], models_status=500)
    cloud = await fake_backend(name="a-cloud", models=["public-model"])
    local = await fake_backend(name="b-local", models=["public-model"])
    gw = await nexus({"routing": {"policies": [{"model_pattern": "secret-*", "privacy": "restricted"}],
                                  "fallbacks": {"secret-model": ["public-model"]}},
                      "backends": [backend_entry(primary, models=["secret-model"]),
                                   backend_entry(cloud, zone="open", priority=1),
                                   backend_entry(local, priority=90)]})
    for _ in range(3):
        status, headers, _ = await chat(http, gw, {**CHAT, "model": "secret-model"})
        assert status == 200
        assert headers["X-Nexus-Backend"] == "b-local"
        assert headers["X-Nexus-Fallback-Model"] == "public-model"
        assert headers["X-Nexus-Route-Reason"] == "failover"
        assert headers["X-Nexus-Privacy-Zone"] == "restricted"
    assert cloud.chats == []
    assert json.loads(local.chats[0].body)["model"] == "public-model"


async def test_client_sent_privacy_zone_header_is_ignored(fake_backend: BackendFactory, nexus: NexusFactory,
                                                          http: aiohttp.ClientSession) -> None:
    """Item 43: privacy belongs to the backend, never to the request, in both directions."""
    cloud = await fake_backend(name="a-cloud", models=["test-model", "free-model"])
    local = await fake_backend(name="b-local")
    gw = await nexus({"routing": {"policies": [RESTRICT_TEST]}, "queue": NO_QUEUE,
                      "backends": [backend_entry(cloud, zone="open", priority=1),
                                   backend_entry(local, priority=90)]})
    # asking for "open" does not relax the policy
    status, headers, _ = await chat(http, gw, headers={"X-Nexus-Privacy-Zone": "open"})
    assert (status, headers["X-Nexus-Backend"]) == (200, "b-local")
    # asking for "restricted" does not restrict a model no policy covers
    status, headers, _ = await chat(http, gw, {**CHAT, "model": "free-model"},
                                    headers={"X-Nexus-Privacy-Zone": "restricted"})
    assert (status, headers["X-Nexus-Backend"], headers["X-Nexus-Privacy-Zone"]) == (200, "a-cloud", "open")
    assert headers["X-Nexus-Route-Reason"] == "capability-match"
    # and with the restricted backend down, the header cannot open a way to the cloud
    mark(gw, "b-local", Status.UNHEALTHY)
    status, _, body = await chat(http, gw, headers={"X-Nexus-Privacy-Zone": "open"})
    assert status == 503 and body["context"]["privacy_zone_required"] == "restricted"
    assert [json.loads(c.body)["model"] for c in cloud.chats] == ["free-model"]


@pytest.mark.parametrize(("policies", "expected"), [
    ([{"model_pattern": "test-*", "privacy": "unrestricted"}, {"model_pattern": "test-model", "privacy": "restricted"}],
     "a-cloud"),
    ([{"model_pattern": "test-model", "privacy": "restricted"}, {"model_pattern": "test-*", "privacy": "unrestricted"}],
     "b-local"),
    ([{"model_pattern": "other-*", "privacy": "unrestricted"},
      {"model_pattern": "t?st-{model,x}", "privacy": "restricted"}], "b-local"),
])
async def test_first_matching_policy_wins(policies: list[dict[str, Any]], expected: str, fake_backend: BackendFactory,
                                          nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    cloud = await fake_backend(name="a-cloud")
    local = await fake_backend(name="b-local")
    gw = await nexus({"routing": {"policies": policies},
                      "backends": [backend_entry(cloud, zone="open", priority=1), backend_entry(local, priority=90)]})
    status, headers, _ = await chat(http, gw)
    assert (status, headers["X-Nexus-Backend"]) == (200, expected)


def test_policy_matching_is_first_match_by_glob() -> None:
    policies = Policies([
        config_mod.PolicyConfig(model_pattern="llama3:*", privacy="unrestricted", min_tier=2),
        config_mod.PolicyConfig(model_pattern="llama*", privacy="restricted"),
        config_mod.PolicyConfig(model_pattern="{gpt,o1}-*", min_tier=4),
    ])
    assert policies.match("llama3:70b").min_tier == 2  # type: ignore[union-attr]
    assert policies.match("llama2").privacy == "restricted"  # type: ignore[union-attr]
    assert policies.match("gpt-4o").min_tier == 4  # type: ignore[union-attr]
    assert policies.match("o1-mini").min_tier == 4  # type: ignore[union-attr]
    assert policies.match("Llama3") is None  # case-sensitive, like globset
    assert policies.match("mistral") is None


@pytest.mark.parametrize("pattern", ["llama-[3", "{a,b", "a}b", ""])
def test_invalid_glob_fails_start_up_naming_the_key(pattern: str) -> None:
    raw = {"routing": {"policies": [{"model_pattern": pattern, "privacy": "restricted"}]}}
    with pytest.raises(ConfigError) as caught:
        config_mod.build(raw, source="nexus.toml")
    message = str(caught.value)
    assert "routing.policies[0].model_pattern" in message
    assert repr(pattern) in message
    assert "\n" not in message


def test_invalid_glob_in_a_later_policy_is_named_by_its_index() -> None:
    raw = {"routing": {"policies": [{"model_pattern": "ok-*"}, {"model_pattern": "bad-[x"}]}}
    with pytest.raises(ConfigError, match=r"routing\.policies\[1\]\.model_pattern"):
        config_mod.build(raw)


def test_policy_min_tier_and_backend_tier_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"routing\.policies\[0\]\.min_tier = 0 is invalid.*1-5"):
        config_mod.build({"routing": {"policies": [{"model_pattern": "*", "min_tier": 0}]}})
    with pytest.raises(ConfigError) as caught:  # item 49
        config_mod.build({"backends": [{"name": "b", "url": "http://127.0.0.1:1", "type": "generic", "tier": 10}]})
    message = str(caught.value)
    assert "tier" in message and "10" in message and "1-5" in message and "invalid" in message
    with pytest.raises(ConfigError, match=r"routing\.policies\[0\]\.privacy"):
        config_mod.build({"routing": {"policies": [{"model_pattern": "*", "privacy": "secret"}]}})


async def test_backend_without_zone_or_tier_gets_the_type_defaults(fake_backend: BackendFactory, nexus: NexusFactory,
                                                                   http: aiohttp.ClientSession) -> None:
    """Item 48 for the built-in local type: restricted, tier 1."""
    backend = await fake_backend()
    gw = await nexus({"backends": [backend_entry(backend)]})
    async with http.get(f"{gw.url}/v1/backends") as resp:
        (view,) = (await resp.json())["backends"]
    assert (view["zone"], view["tier"]) == ("restricted", 1)


# -- tiers ---------------------------------------------------------------------------------

MIN_TIER_3 = {"model_pattern": "test-*", "min_tier": 3}


async def tiered(fake_backend: BackendFactory, nexus: NexusFactory, *, low_tier: int = 1, high_tier: int = 3,
                 high: dict[str, Any] | None = None, low: dict[str, Any] | None = None,
                 **raw: Any) -> tuple[RunningNexus, Any, Any]:
    """A lower-tier backend that would win on priority, and a backend at ``high_tier``."""
    fast = await fake_backend(name="a-small", **(low or {}))
    big = await fake_backend(name="b-big", **(high or {}))
    config = {"routing": {"policies": [MIN_TIER_3]}, "queue": NO_QUEUE, **raw}
    config["backends"] = [backend_entry(fast, tier=low_tier, priority=1),
                          backend_entry(big, tier=high_tier, priority=90, **config.pop("big_entry", {}))]
    return await nexus(config), fast, big


async def test_strict_is_the_default_and_never_routes_below_min_tier(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    """Item 44."""
    gw, small, big = await tiered(fake_backend, nexus, low_tier=2)
    for _ in range(3):
        status, headers, _ = await chat(http, gw)
        assert (status, headers["X-Nexus-Backend"]) == (200, "b-big")
        assert headers["X-Nexus-Route-Reason"] == "capability-match"
    assert small.chats == [] and len(big.chats) == 3


async def test_strict_with_only_lower_tiers_available_is_503_with_required_tier(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw, small, big = await tiered(fake_backend, nexus, low_tier=2)
    mark(gw, "b-big", Status.UNHEALTHY)
    status, headers, body = await chat(http, gw)
    assert status == 503
    assert body["context"]["required_tier"] == 3
    assert body["context"]["available_backends"] == ["a-small"]
    assert "privacy_zone_required" not in body["context"]
    details = {d["backend"]: d for d in rejection_details(headers)}
    assert details["a-small"]["reconciler"] == "tier"
    assert "2" in details["a-small"]["reason"] and "3" in details["a-small"]["reason"]
    assert "X-Nexus-Flexible" in details["a-small"]["suggested_action"]
    assert details["b-big"]["reconciler"] == "scheduling"
    assert small.chats == [] and big.chats == []


async def test_a_higher_tier_than_required_is_acceptable_in_both_modes(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    """Item 45: only a tier-4 backend for a min_tier 3 model."""
    big = await fake_backend(name="big")
    gw = await nexus({"routing": {"policies": [MIN_TIER_3]}, "backends": [backend_entry(big, tier=4)]})
    for headers in ({}, {"X-Nexus-Flexible": "true"}, {"X-Nexus-Strict": "true"}):
        status, got, _ = await chat(http, gw, headers=headers)
        assert (status, got["X-Nexus-Backend"], got["X-Nexus-Route-Reason"]) == (200, "big", "capability-match")


@pytest.mark.parametrize("headers", [
    {"X-Nexus-Strict": "true", "X-Nexus-Flexible": "true"},
    {"X-Nexus-Strict": "false", "X-Nexus-Flexible": "true"},  # present with any value: strict
    {"X-Nexus-Strict": "", "X-Nexus-Flexible": "true"},
    {"X-Nexus-Flexible": "yes"},
    {"X-Nexus-Flexible": "1"},
    {"X-Nexus-Flexible": "false"},
])
async def test_strict_applies_unless_flexible_is_exactly_true_without_strict(
        headers: dict[str, str], fake_backend: BackendFactory, nexus: NexusFactory,
        http: aiohttp.ClientSession) -> None:
    """Items 46, 47: the tier-3 backend is down, so only flexible could route to tier 1."""
    gw, small, _ = await tiered(fake_backend, nexus)
    mark(gw, "b-big", Status.UNHEALTHY)
    status, _, body = await chat(http, gw, headers=headers)
    assert status == 503 and body["context"]["required_tier"] == 3
    assert small.chats == []


async def test_flexible_value_is_case_sensitive(fake_backend: BackendFactory, nexus: NexusFactory,
                                                http: aiohttp.ClientSession) -> None:
    gw, small, _ = await tiered(fake_backend, nexus)
    mark(gw, "b-big", Status.UNHEALTHY)
    status, _, _ = await chat(http, gw, headers={"X-Nexus-Flexible": "TRUE"})
    assert status == 503
    assert small.chats == []


async def test_flexible_with_an_available_min_tier_backend_uses_only_min_tier(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw, small, big = await tiered(fake_backend, nexus)
    flexible = {"X-Nexus-Flexible": "true"}
    for _ in range(3):
        status, headers, _ = await chat(http, gw, headers=flexible)
        assert (status, headers["X-Nexus-Backend"]) == (200, "b-big")
        assert headers["X-Nexus-Route-Reason"] == "capability-match"
    # a failing min-tier backend is still "available": its failure is not retried on a lower tier
    big.mode = "status:500"
    status, _, body = await chat(http, gw, headers=flexible)
    assert status == 502 and "500" in body["error"]["message"]
    assert small.chats == []


async def test_flexible_overflows_to_a_lower_tier_when_min_tier_is_unhealthy(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw, small, big = await tiered(fake_backend, nexus)
    mark(gw, "b-big", Status.UNHEALTHY)
    status, headers, _ = await chat(http, gw, headers={"X-Nexus-Flexible": "true"})
    assert (status, headers["X-Nexus-Backend"]) == (200, "a-small")
    assert headers["X-Nexus-Route-Reason"] == "capacity-overflow"
    # without the header the same request is refused (strict default)
    status, _, _ = await chat(http, gw)
    assert status == 503
    assert len(small.chats) == 1 and big.chats == []


async def test_flexible_overflows_to_a_lower_tier_when_min_tier_is_at_its_cap(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw, small, big = await tiered(fake_backend, nexus, high={"mode": "slow"}, big_entry={"max_concurrent": 1})
    flexible = {"X-Nexus-Flexible": "true"}
    async with http.post(f"{gw.url}/v1/chat/completions", json=STREAM, headers=flexible) as held:
        assert held.headers["X-Nexus-Backend"] == "b-big"
        await held.content.readuntil(b"\n\n")  # b-big is now busy at its cap of 1
        status, headers, _ = await chat(http, gw, headers=flexible)
        assert (status, headers["X-Nexus-Backend"]) == (200, "a-small")
        assert headers["X-Nexus-Route-Reason"] == "capacity-overflow"
        big.release.set()
        assert (await held.read()).endswith(b"data: [DONE]\n\n")
    status, headers, _ = await chat(http, gw, headers=flexible)  # capacity is back: no overflow
    assert (status, headers["X-Nexus-Backend"], headers["X-Nexus-Route-Reason"]) == (200, "b-big", "capability-match")


async def test_flexible_overflows_when_the_min_tier_backend_is_excluded_by_quality(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    gw, small, big = await tiered(fake_backend, nexus)
    quality = gw.gateway.registry.get("b-big").quality  # type: ignore[union-attr]
    for _ in range(4):
        quality.record(False, None)
    quality.recompute(0.5)
    assert quality.excluded
    status, headers, _ = await chat(http, gw, headers={"X-Nexus-Flexible": "true"})
    assert (status, headers.get("X-Nexus-Backend")) == (200, "a-small")
    assert headers["X-Nexus-Route-Reason"] == "capacity-overflow"


async def test_tier_and_privacy_policies_combine(fake_backend: BackendFactory, nexus: NexusFactory,
                                                 http: aiohttp.ClientSession) -> None:
    """One policy may set both; an open tier-5 backend is no way around a restricted policy."""
    cloud = await fake_backend(name="a-cloud")
    small = await fake_backend(name="b-small")
    big = await fake_backend(name="c-big")
    gw = await nexus({"routing": {"policies": [{"model_pattern": "test-*", "privacy": "restricted", "min_tier": 3}]},
                      "queue": NO_QUEUE,
                      "backends": [backend_entry(cloud, zone="open", tier=5, priority=1),
                                   backend_entry(small, tier=1, priority=2),
                                   backend_entry(big, tier=3, priority=90)]})
    status, headers, _ = await chat(http, gw)
    assert (status, headers["X-Nexus-Backend"], headers["X-Nexus-Privacy-Zone"]) == (200, "c-big", "restricted")
    mark(gw, "c-big", Status.UNHEALTHY)
    status, headers, body = await chat(http, gw)
    assert status == 503
    assert body["context"]["required_tier"] == 3
    assert body["context"]["privacy_zone_required"] == "restricted"
    assert {(d["backend"], d["reconciler"]) for d in rejection_details(headers)} == {
        ("a-cloud", "privacy"), ("b-small", "tier"), ("c-big", "scheduling")}
    status, headers, _ = await chat(http, gw, headers={"X-Nexus-Flexible": "true"})
    assert (status, headers["X-Nexus-Backend"]) == (200, "b-small")  # overflow, but still restricted
    assert cloud.chats == []


async def test_unknown_model_stays_404_with_policies_active(fake_backend: BackendFactory, nexus: NexusFactory,
                                                            http: aiohttp.ClientSession) -> None:
    backend = await fake_backend()
    gw = await nexus({"routing": {"policies": [{"model_pattern": "*", "privacy": "restricted", "min_tier": 3}]},
                      "backends": [backend_entry(backend, zone="open")]})
    for headers in ({}, {"X-Nexus-Flexible": "true"}):
        status, got, body = await chat(http, gw, {**CHAT, "model": "no-such-model"}, headers=headers)
        assert status == 404
        assert body["error"]["code"] == "model_not_found"
        assert body["error"]["param"] == "model"
        assert body["error"]["message"].startswith("Model 'no-such-model' not found")
        assert "X-Nexus-Rejection-Details" not in got
    assert gw.gateway.queue.dispatched == 0 and len(gw.gateway.queue) == 0
