"""Byte-level edits of JSON request bodies: replace the top-level ``model`` and nothing else.

The gateway forwards the client's bytes. When an alias or fallback changes the model,
only the value of the top-level ``"model"`` key is replaced; every other byte (key order,
whitespace, unknown fields, tools, images) stays as the client sent it.
"""

from __future__ import annotations

import json

import msgspec

_WS = b" \t\r\n"
_encode = msgspec.json.Encoder().encode


def _skip_ws(body: bytes, i: int) -> int:
    n = len(body)
    while i < n and body[i] in _WS:
        i += 1
    return i


def _string_end(body: bytes, i: int) -> int:
    """``body[i]`` is an opening quote; return the index just past the closing quote."""
    j = i + 1
    while True:
        j = body.index(b'"', j)
        backslashes = 0
        k = j - 1
        while body[k] == 0x5C:  # backslash
            backslashes += 1
            k -= 1
        if backslashes % 2 == 0:
            return j + 1
        j += 1


def _value_end(body: bytes, i: int) -> int:
    """Return the index just past the JSON value starting at ``body[i]``."""
    first = body[i]
    if first == 0x22:  # "
        return _string_end(body, i)
    if first in b"{[":
        depth = 0
        n = len(body)
        while i < n:
            c = body[i]
            if c == 0x22:
                i = _string_end(body, i)
                continue
            if c in b"{[":
                depth += 1
            elif c in b"}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise ValueError("unterminated JSON value")
    n = len(body)
    while i < n and body[i] not in b",}" and body[i] not in _WS:
        i += 1
    return i


def rewrite_model(body: bytes, model: str) -> bytes:
    """Return ``body`` with the top-level ``model`` value replaced by ``model``.

    The body must already have been validated as a JSON object with a string ``model``.
    """
    replacement = _encode(model)
    out: list[bytes] = []
    last = 0
    i = _skip_ws(body, 0) + 1  # past "{"
    while True:
        i = _skip_ws(body, i)
        if body[i] == 0x7D:  # }
            break
        key_end = _string_end(body, i)
        raw_key = body[i + 1 : key_end - 1]
        key = json.loads(body[i:key_end]) if b"\\" in raw_key else raw_key.decode()
        i = _skip_ws(body, key_end) + 1  # past ":"
        i = _skip_ws(body, i)
        end = _value_end(body, i)
        if key == "model":
            out += (body[last:i], replacement)
            last = end
        i = _skip_ws(body, end)
        if body[i] == 0x2C:  # ,
            i += 1
        else:
            break
    out.append(body[last:])
    return b"".join(out)
