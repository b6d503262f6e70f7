"""Model-name globs for routing policies (upstream §3.2: globset semantics).

``*`` matches any run of characters (``/`` and ``:`` included), ``?`` one character,
``[...]`` a class (``[!...]`` negated), ``{a,b}`` alternatives. Matching is
case-sensitive. A pattern that does not compile is an error at start-up.
"""

from __future__ import annotations

import re


class GlobError(ValueError):
    pass


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile ``pattern`` to an anchored regular expression, or raise :class:`GlobError`."""
    if not pattern:
        raise GlobError("the pattern is empty")
    out: list[str] = []
    depth = 0
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            if end < 0:
                raise GlobError(f"unclosed '[' at position {i}")
            body = pattern[i + 1:end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end
        elif c == "{":
            depth += 1
            out.append("(?:")
        elif c == "}":
            if depth == 0:
                raise GlobError(f"unmatched '}}' at position {i}")
            depth -= 1
            out.append(")")
        elif c == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(c))
        i += 1
    if depth:
        raise GlobError("unclosed '{'")
    try:
        return re.compile("".join(out) + r"\Z", re.DOTALL)
    except re.error as exc:
        raise GlobError(str(exc)) from None
