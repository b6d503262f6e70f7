"""Structured logs: one line per event, request ids bound, levels per component, no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import aiohttp
import pytest

from nexus import config as config_mod, logs
from nexus.testing import CHAT, BackendFactory, NexusFactory, backend_entry


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    yield stream
    logs.flush()
    root = logging.getLogger("nexus")
    root.handlers[:] = []
    root.propagate = True
    root.setLevel(logging.NOTSET)
    for name in ("nexus.routing", "nexus.proxy"):
        logging.getLogger(name).setLevel(logging.NOTSET)


async def test_json_lines_carry_the_request_id(fake_backend: BackendFactory, nexus: NexusFactory,
                                               http: aiohttp.ClientSession, log_output: io.StringIO,
                                               monkeypatch) -> None:
    monkeypatch.setenv("BACKEND_KEY", "sk-never-in-logs")
    logs.setup(config_mod.LoggingConfig(format="json"), stream=log_output)
    backend = await fake_backend(mode="status:500")
    other = await fake_backend(name="ok")
    gw = await nexus({"backends": [backend_entry(backend, priority=1, api_key_env="BACKEND_KEY"),
                                   backend_entry(other, priority=2)]})
    async with http.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-me"}) as resp:
        assert resp.status == 200
    logs.flush()
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    mine = [line for line in lines if line.get("request_id") == "trace-me"]
    assert [line["message"] for line in mine][0].startswith("Backend fake failed")
    final = mine[-1]
    assert final["outcome"] == "success" and final["retries"] == 1 and final["backend"] == "ok"
    assert {"timestamp", "level", "target", "message"} <= set(final)
    assert "sk-never-in-logs" not in log_output.getvalue()


def test_pretty_format_and_component_levels(log_output: io.StringIO) -> None:
    logs.setup(config_mod.LoggingConfig(level="warn", component_levels={"routing": "debug"}), stream=log_output)
    logging.getLogger("nexus.routing").debug("routing detail %d", 1, extra={"stage": "scheduling"})
    logging.getLogger("nexus.proxy").info("hidden at warn")
    logging.getLogger("nexus.proxy").warning("multi\nline")
    logs.flush()
    lines = log_output.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("DEBUG   nexus.routing routing detail 1 stage=scheduling")
    assert lines[1].endswith("WARNING nexus.proxy multi\\nline")


def test_content_logging_prints_a_startup_warning(log_output: io.StringIO) -> None:
    logs.setup(config_mod.LoggingConfig(enable_content_logging=True), stream=log_output)
    assert log_output.getvalue().count("WARNING: logging.enable_content_logging") == 1
