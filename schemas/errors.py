"""The product's one exception base, :class:`FeedError`, and the one validation error every
decoder in :mod:`schemas` raises.

Every error the product raises on purpose derives from :class:`FeedError` (``feed``, ``fanout``,
``gateway`` and ``schemas`` alike; a class that also is a ``ValueError`` or ``RuntimeError`` keeps
that base too), so a caller can tell "the product refused or could not do this" from a bug or a
library's exception, and the gateway turns all of them into responses and close codes in one
place (:mod:`gateway.errors`). This module is at the bottom of the import graph (it imports no
other package of the product), so every package can derive from it.

A bad input is reported with the field it concerns (a dotted path such as ``to[3]``; empty for the
whole document), a short machine-readable ``code`` and a human message that states the limit that
was broken. HTTP turns it into ``400 {"error": {...}}``; the fan-out worker puts it in the DLQ
headers; the WebSocket session turns it into a close code.
"""

from __future__ import annotations

import re

import msgspec

__all__ = ["DECODE_ERRORS", "FeedError", "ValidationError", "from_decode_error", "from_msgspec"]

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_INVALID_UTF8 = re.compile(r"invalid utf-?8", re.IGNORECASE)
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")


class FeedError(Exception):
    """The base of every exception the product raises on purpose."""


class ValidationError(FeedError, ValueError):
    """Invalid input: names the field, the code and the limit it broke."""

    def __init__(self, field: str, code: str, message: str) -> None:
        super().__init__(f"{field or '<body>'}: {message}")
        self.field = field
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "field": self.field}


#: Every exception a msgspec JSON decoder can raise on hostile input: its own errors, RecursionError
#: (nesting deeper than the interpreter's recursion limit) and UnicodeError (invalid UTF-8 inside a
#: string; a ``str`` input holding lone surrogates).
DECODE_ERRORS: tuple[type[Exception], ...] = (msgspec.MsgspecError, RecursionError, UnicodeError)


def from_decode_error(exc: Exception, *, prefix: str = "") -> ValidationError:
    """Translate any of :data:`DECODE_ERRORS` into :class:`ValidationError`."""
    if isinstance(exc, RecursionError):
        return ValidationError(prefix, "too_deep", "JSON nesting is too deep")
    if isinstance(exc, UnicodeError):
        where = getattr(exc, "start", None)
        at = f" (offset {where})" if isinstance(where, int) else ""
        return ValidationError(prefix, "invalid_utf8", f"text is not valid UTF-8{at}")
    if isinstance(exc, msgspec.MsgspecError):
        return from_msgspec(exc, prefix=prefix)
    raise TypeError(f"not a decode error: {type(exc).__name__}") from exc


def _path(raw: str) -> str:
    path = raw[1:] if raw.startswith(".") else raw
    return path


def from_msgspec(exc: msgspec.MsgspecError, *, prefix: str = "") -> ValidationError:
    """Translate a msgspec decode/validation error into :class:`ValidationError`."""
    text = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        if _INVALID_UTF8.search(text):
            # msgspec >= 0.23 reports invalid UTF-8 inside a string as a DecodeError; older
            # releases raised UnicodeDecodeError (handled above). Same answer either way.
            return ValidationError(prefix, "invalid_utf8", "text is not valid UTF-8")
        return ValidationError(prefix, "malformed_json", f"body is not valid JSON ({text})")
    path = ""
    at = _AT.search(text)
    if at:
        path = _path(at.group("path"))
        text = text[: at.start()]
    missing = _MISSING.match(text)
    if missing:
        name = missing.group("name")
        field = f"{path}.{name}" if path else name
        return ValidationError(_join(prefix, field), "missing", f"`{name}` is required")
    code = "invalid"
    if "length" in text:
        code = "too_long" if "<=" in text else "too_short"
    elif text.startswith("Expected `") and ", got `" in text:
        code = "wrong_type"
    elif "matching regex" in text:
        code = "invalid_chars"
        text = "must be non-empty and contain no whitespace or control characters"
    elif "Object contains unknown field" in text:
        code = "unknown_field"
    return ValidationError(_join(prefix, path), code, text)


def _join(prefix: str, field: str) -> str:
    if not prefix:
        return field
    if not field:
        return prefix
    return f"{prefix}{field}" if field.startswith("[") else f"{prefix}.{field}"
