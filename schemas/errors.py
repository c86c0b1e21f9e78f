"""The one validation error every decoder in :mod:`schemas` raises.

A bad input is reported with the field it concerns (a dotted path such as ``to[3]``; empty for the
whole document), a short machine-readable ``code`` and a human message that states the limit that
was broken. HTTP turns it into ``400 {"error": {...}}``; the fan-out worker puts it in the DLQ
headers; the WebSocket session turns it into a close code.
"""

from __future__ import annotations

import re

import msgspec

__all__ = ["ValidationError", "from_msgspec"]

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")


class ValidationError(ValueError):
    """Invalid input: names the field, the code and the limit it broke."""

    def __init__(self, field: str, code: str, message: str) -> None:
        super().__init__(f"{field or '<body>'}: {message}")
        self.field = field
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "field": self.field}


def _path(raw: str) -> str:
    path = raw[1:] if raw.startswith(".") else raw
    return path


def from_msgspec(exc: msgspec.MsgspecError, *, prefix: str = "") -> ValidationError:
    """Translate a msgspec decode/validation error into :class:`ValidationError`."""
    text = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
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
