"""Fast fake OpenAI-compatible backend for benchmarking.

Serves pre-encoded responses so that its own cost stays small and constant:

* ``GET /v1/models`` — a single model, ``bench-model``.
* ``POST /v1/chat/completions`` — a fixed ``chat.completion`` JSON, or, when the
  body contains ``"stream": true``, exactly 20 SSE ``chat.completion.chunk``
  events (one write each) followed by ``data: [DONE]``.

Usage: ``python bench/fake_backend.py --port 9001``
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web

MODEL = "bench-model"
STREAM_CHUNKS = 20
CREATED = 1_700_000_000

MODELS_BODY = json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}
).encode()

COMPLETION_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench backend."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }
).encode()


def _sse_event(index: int) -> bytes:
    last = index == STREAM_CHUNKS - 1
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "delta": {} if last else {"content": f"tok{index} "},
                "finish_reason": "stop" if last else None,
            }
        ],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


SSE_EVENTS = [_sse_event(i) for i in range(STREAM_CHUNKS)]
SSE_DONE = b"data: [DONE]\n\n"


async def models(_: web.Request) -> web.Response:
    return web.Response(body=MODELS_BODY, content_type="application/json")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if b'"stream":true' not in body and b'"stream": true' not in body:
        return web.Response(body=COMPLETION_BODY, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for event in SSE_EVENTS:
        await resp.write(event)
    await resp.write(SSE_DONE)
    await resp.write_eof()
    return resp


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=lambda _: print("ready", flush=True),
    )


if __name__ == "__main__":
    main()
