"""Run by tests/test_discovery_probe.py inside a network namespace of its own, where only
loopback exists (so the well-known ports are free, and mDNS on "all interfaces" stays on
loopback): a fake Ollama on its well-known port 11434, and `nexus serve` with no config
file on its default port 8000. Prints what a client got, as one JSON object."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp

from nexus.testing import CHAT
from nexus.testing.ollama import FakeOllama, OllamaModel

GATEWAY = "http://127.0.0.1:8000"
MODEL = "zero-config:1b"


async def wait_for_model(http: aiohttp.ClientSession) -> None:
    while True:
        try:
            async with http.get(f"{GATEWAY}/v1/models") as resp:
                if MODEL in {m["id"] for m in (await resp.json())["data"]}:
                    return
        except aiohttp.ClientConnectionError:
            pass  # not listening yet
        await asyncio.sleep(0.05)


async def main() -> None:
    ollama = await FakeOllama(catalog=[OllamaModel(MODEL)]).start(port=11434)
    serve = await asyncio.create_subprocess_exec(sys.executable, "-m", "nexus", "serve",
                                                 stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    result: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as http:
            await asyncio.wait_for(wait_for_model(http), 15)
            async with http.post(f"{GATEWAY}/v1/chat/completions", json={**CHAT, "model": MODEL}) as resp:
                result.update(status=resp.status, backend=resp.headers.get("X-Nexus-Backend"))
            async with http.get(f"{GATEWAY}/v1/backends") as resp:
                result["backends"] = [[b["id"], b["type"], b["source"]] for b in (await resp.json())["backends"]]
    finally:
        serve.terminate()
        _, stderr = await serve.communicate()
        result["stderr"] = stderr.decode()
        await ollama.stop()
        print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
