"""Closing a WebSocket through ``gateway.transport``: a client-chosen reason is cut to what the
protocol allows, and a close the protocol refuses drops the connection instead of raising."""

from __future__ import annotations


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, _name: str) -> None:
        return None


class _Protocol:
    """Where ``StreamSocket`` finds the transport: ``send`` is a method of the protocol."""

    def __init__(self, error: Exception | None) -> None:
        self.transport = _Transport()
        self.sent: list[dict[str, object]] = []
        self.error = error

    async def send(self, message: dict[str, object]) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append(message)


async def _no_receive() -> dict[str, object]:
    raise AssertionError("not read")


async def test_close_reason_is_cut_to_123_bytes_before_it_reaches_the_server() -> None:
    from gateway.transport import StreamSocket, close_quietly

    protocol = _Protocol(None)
    await close_quietly(StreamSocket(_no_receive, protocol.send), 1003, "\u20ac" * 100)
    (message,) = protocol.sent
    reason = str(message["reason"])
    assert 120 <= len(reason.encode()) <= 123 and set(reason) == {"\u20ac"}


async def test_a_close_the_protocol_refuses_drops_the_connection_instead_of_raising() -> None:
    """websockets refuses a close frame over 125 bytes with ProtocolError: the handler must not
    die with it (uvicorn logs "Exception in ASGI application" and the client gets 1006 only
    after its own timeout): the connection is dropped at once."""
    from websockets.exceptions import ProtocolError

    from gateway.transport import StreamSocket, close_quietly

    protocol = _Protocol(ProtocolError("control frame too long"))
    await close_quietly(StreamSocket(_no_receive, protocol.send), 1003, "any")
    assert protocol.transport.aborted
