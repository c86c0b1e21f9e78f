"""The parsing of a stream connect (``gateway.admission.handshake``): origin, client address and
the token from the bearer header or the query (no server)."""

from __future__ import annotations

from gateway.admission import handshake


def _scope(headers: list[tuple[bytes, bytes]], query: bytes = b"") -> dict[str, object]:
    return {
        "type": "websocket",
        "headers": headers,
        "query_string": query,
        "client": ("10.1.2.3", 5555),
    }


def test_handshake_reads_origin_ip_and_the_bearer_token() -> None:
    scope = _scope([(b"Origin", b"http://a.example"), (b"authorization", b"Bearer  tok-1 ")])
    assert handshake(scope) == ("http://a.example", "10.1.2.3", "tok-1")


def test_handshake_token_from_the_query_when_no_bearer_header() -> None:
    scope = _scope([(b"authorization", b"Basic abc")], b"a=1&token=first&token=last")
    assert handshake(scope) == (None, "10.1.2.3", "last")
    scope = _scope([], b"token=t%2B1")
    assert handshake(scope)[2] == "t+1"


def test_handshake_without_credentials_or_client() -> None:
    scope = _scope([], b"tokens=x")
    scope["client"] = None
    assert handshake(scope) == (None, "unknown", "")
