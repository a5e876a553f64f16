"""The request body as JSON: parsed, nesting bounded, every string valid Unicode.

JSON may spell a lone UTF-16 surrogate ("\\ud800"), which Python keeps in a str that
no tokenizer or encoder accepts; and a deeply nested document exhausts the parser's
recursion. Both are the client's error, so both are refused here, once for every route,
with the path of the offending field.
"""

from __future__ import annotations

import json

from .errors import invalid

MAX_DEPTH = 64          # objects and arrays inside each other; real requests stay under 10


def parse(data: bytes) -> dict:
    """The JSON object in `data`, or APIError 400 saying what is wrong and where."""
    try:
        body = json.loads(data)
    except RecursionError:
        raise invalid(f"the request body is nested too deeply (more than {MAX_DEPTH} levels)",
                      code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    check(body)
    return body


def check(body) -> None:
    """Walk `body` without recursion: nesting at most MAX_DEPTH, no lone surrogates in
    keys or strings."""
    todo = [(body, "", 1)]
    while todo:
        value, path, depth = todo.pop()
        if isinstance(value, str):
            _unicode(value, path)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise invalid(f"'{path}' is nested too deeply: at most {MAX_DEPTH} levels of objects and arrays",
                          path, code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                _unicode(key, f"{path}.<key>" if path else "<key>")
                sub = f"{path}.{key}" if path else key
                todo.append((item, sub, depth + 1))
        else:
            todo.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _unicode(s: str, path: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        where = path or "the request body"
        raise invalid(f"'{where}' contains a lone UTF-16 surrogate ({s[e.start]!r} at character {e.start}); "
                      f"strings must be valid Unicode", path or None, code="invalid_unicode") from None
