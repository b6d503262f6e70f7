"""Exact OpenAI token counts with tiktoken, with no network access at all.

tiktoken downloads its encoding files on first use. This plugin ships the two it needs
(``encodings/cl100k_base.tiktoken.gz`` and ``encodings/o200k_base.tiktoken.gz``,
byte-identical to OpenAI's published files) and builds each :class:`tiktoken.Encoding`
in memory from them: no download, no write to tiktoken's cache, no dependence on
``TIKTOKEN_CACHE_DIR``. Each file is checked against the SHA-256 that tiktoken itself
expects (``tiktoken_ext/openai_public.py``) before it is used.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import tiktoken
from tiktoken.model import encoding_name_for_model

_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"


@dataclass(frozen=True)
class _EncodingSpec:
    """What tiktoken's own constructor in ``tiktoken_ext/openai_public.py`` uses."""

    sha256: str
    pat_str: str
    special_tokens: tuple[tuple[str, int], ...]


_SPECS: dict[str, _EncodingSpec] = {
    "cl100k_base": _EncodingSpec(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        special_tokens=((_ENDOFTEXT, 100257), (_FIM_PREFIX, 100258), (_FIM_MIDDLE, 100259),
                        (_FIM_SUFFIX, 100260), (_ENDOFPROMPT, 100276)),
    ),
    "o200k_base": _EncodingSpec(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str="|".join([
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]),
        special_tokens=((_ENDOFTEXT, 199999), (_ENDOFPROMPT, 200018)),
    ),
}

SHIPPED_ENCODINGS: frozenset[str] = frozenset(_SPECS)
DEFAULT_ENCODING = "o200k_base"  # every OpenAI model since gpt-4o, and the best guess for new ones


def encoding_name(model: str) -> str:
    """The shipped encoding for an OpenAI model id.

    Uses tiktoken's own model table (``tiktoken.model``), so it follows tiktoken upgrades.
    A fine-tune (``ft:gpt-4.1-mini-2025-04-14:org::id``) counts like its base model.
    ``o200k_harmony`` (gpt-oss) shares o200k_base's ranks and pattern, so plain text
    counts the same. Unknown models, and models retired from the API whose encoding is
    not shipped (r50k/p50k), use ``o200k_base``.
    """
    base = model.strip().lower()
    if base.startswith("ft:"):
        base = base.split(":")[1]
    try:
        name = encoding_name_for_model(base)
    except KeyError:
        return DEFAULT_ENCODING
    if name == "o200k_harmony":
        return "o200k_base"
    return name if name in _SPECS else DEFAULT_ENCODING


@cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """``cl100k_base`` or ``o200k_base``, built from the shipped file (once per process)."""
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(f"encoding {name!r} is not shipped (shipped: {', '.join(sorted(_SPECS))})")
    packed = (files(__package__) / "encodings" / f"{name}.tiktoken.gz").read_bytes()
    data = gzip.decompress(packed)
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        raise RuntimeError(f"the shipped {name} file is damaged (SHA-256 mismatch); reinstall nexus-plugin-openai")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name=name, pat_str=spec.pat_str, mergeable_ranks=ranks,
                             special_tokens=dict(spec.special_tokens))


def count_tokens(model: str, text: str) -> int:
    """Exact number of tokens of ``text`` for an OpenAI ``model``.

    Special-token strings in ``text`` (``<|endoftext|>``) count as ordinary text, as they
    do in a user's message. The first call per encoding loads it (a few hundred ms);
    call :func:`get_encoding` at start-up, off the event loop, to pay that early.
    """
    return len(get_encoding(encoding_name(model)).encode_ordinary(text))
