"""The dashboard in a real headless Chromium: first paint, then a request appears live.

Uses the system Chromium (``/usr/bin/chromium``, or ``NEXUS_CHROMIUM``) through Playwright;
no browser is ever downloaded. Without Playwright or Chromium the test is skipped, except
in CI (``CI`` set), where it fails and says what is missing. The screenshot is written to
``test-artifacts/dashboard.png`` at the repository root.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nexus.testing import CHAT, BackendFactory, NexusFactory, backend_entry

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "test-artifacts" / "dashboard.png"
CHROMIUM = os.environ.get("NEXUS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"dashboard browser test cannot run in CI: {reason}")
    pytest.skip(reason)


def _async_playwright() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("Playwright is not installed (pip install playwright; no browser download is needed)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        _unavailable(f"Chromium not found at {CHROMIUM} (install it, or point NEXUS_CHROMIUM at it)")
    return async_playwright


async def test_dashboard_shows_backends_and_a_new_request_without_reload(
        fake_backend: BackendFactory, nexus: NexusFactory, http: aiohttp.ClientSession) -> None:
    async_playwright = _async_playwright()
    gpu = await fake_backend(name="gpu-box", models=["llama3.1:8b", "llava:13b"])
    laptop = await fake_backend(name="laptop", models=["llama3.1:8b", "nomic-embed-text"])
    gw = await nexus({"backends": [backend_entry(gpu, tier=3), backend_entry(laptop, zone="open")],
                      "routing": {"budget": {"monthly_limit_usd": 50.0, "local_usd_per_gpu_second": 0.5}}})
    async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "llava:13b"}) as resp:
        assert resp.status == 200  # one request already in the server-rendered history

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            await page.goto(f"{gw.url}/")

            cards = page.locator("#backends article.backend")
            await cards.first.wait_for()
            assert await cards.count() == 2
            assert await page.locator('article.backend[data-id="gpu-box"] .badge').inner_text() == "healthy"
            await page.locator("#conn[data-state=live]").wait_for(timeout=5000)

            async with http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "llama3.1:8b"},
                                 headers={"X-Request-Id": "from-the-test"}) as resp:
                assert resp.status == 200
            row = page.locator('#history-body tr[data-request-id="from-the-test"]')
            await row.wait_for(timeout=5000)  # pushed over /ws: no reload
            assert "llama3.1:8b" in await row.inner_text()
            assert await page.locator("#history-body tr").first.get_attribute("data-request-id") == "from-the-test"
            assert await page.locator("#history-body tr").count() == 2

            assert await page.locator("#sum-requests").inner_text() == "2"
            assert (await page.locator("#budget").inner_text()).count("$50.00") == 1
            assert "$" in await row.inner_text()  # the local energy cost of the request

            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)
            await page.emulate_media(color_scheme="dark")
            await page.set_viewport_size({"width": 420, "height": 900})
            await page.screenshot(path=str(SCREENSHOT.with_name("dashboard-dark-narrow.png")), full_page=True)
            assert not errors, errors
        finally:
            await browser.close()
    assert SCREENSHOT.stat().st_size > 0
