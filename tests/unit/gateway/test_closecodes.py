"""The close-code table (gateway/closecodes.py) is the one source: the docs are rendered from
it, the contract's codes are in it, the session's constants are its codes, and no other module
of the gateway writes a close code as a literal (no server needed)."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

import gateway.session
from gateway import closecodes
from gateway.closecodes import TABLE, SentBy

ROOT = Path(__file__).resolve().parents[3]
BEGIN = "<!-- close-codes:begin"
END = "<!-- close-codes:end -->"

#: The close codes CONTRACT.md names ("WebSocket"): 4001 unauthorized/expired token, 4003
#: forbidden, 4008 too slow, 4029 rate limited, 1003/1007 unacceptable or invalid frame, 1009
#: frame too big, 1001 server going away.
CONTRACT_CODES = {4001: "unauthorized", 4003: "forbidden", 4008: "too_slow", 4029: "rate_limited"}
CONTRACT_CODES |= {1003: "unsupported", 1007: "invalid_frame", 1009: "too_big", 1001: "going_away"}


def _docs_table(text: str) -> str:
    start = text.index(BEGIN)
    start = text.index("\n", start) + 1
    return text[start : text.index(END, start)]


def test_the_docs_table_is_the_rendered_table() -> None:
    """Fails when docs/gateway.md and the table differ: paste ``markdown_table()`` between the
    markers (``python -c 'from gateway.closecodes import markdown_table as t; print(t())'``)."""
    docs = (ROOT / "docs" / "gateway.md").read_text(encoding="utf-8")
    assert _docs_table(docs) == closecodes.markdown_table()


def test_the_readme_lists_every_code_a_server_sends() -> None:
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert closecodes.readme_list() in readme


def test_the_rendered_docs_name_every_code_of_the_table() -> None:
    table = closecodes.markdown_table()
    for entry in TABLE:
        assert f"`{entry.code}`" in table, entry
    readme = closecodes.readme_list()
    for entry in TABLE:
        sent = entry.sent_by in (SentBy.GATEWAY, SentBy.SERVER)
        assert (f" {entry.code} " in readme) == sent, entry


@pytest.mark.parametrize("code", sorted(CONTRACT_CODES))
def test_every_code_of_the_contract_is_in_the_table(code: int) -> None:
    entry = closecodes.by_code(code)
    assert entry.name == CONTRACT_CODES[code]
    assert entry.sent_by is SentBy.GATEWAY


def test_codes_1011_and_1013_are_documented() -> None:
    for code in (1011, 1013):
        entry = closecodes.by_code(code)
        assert entry.meaning and entry.client and entry.summary


def test_codes_and_names_are_unique_and_every_entry_is_advised() -> None:
    assert len({e.code for e in TABLE}) == len(TABLE)
    assert len({e.name for e in TABLE}) == len(TABLE)
    for entry in TABLE:
        assert entry.meaning and entry.client and entry.summary, entry
        # Application codes are 4000-4999 (RFC 6455, 7.4.2); the others are the protocol's.
        assert 1000 <= entry.code <= 1015 or 4000 <= entry.code <= 4999, entry


def test_the_session_constants_are_the_tables_codes() -> None:
    """gateway/session.py closes with its ``CLOSE_*`` constants: each is a code of the table
    that the gateway sends."""
    constants = {
        name: value
        for name, value in vars(gateway.session).items()
        if name.startswith("CLOSE_") and isinstance(value, int)
    }
    assert constants
    for name, value in constants.items():
        entry = closecodes.by_code(value)
        assert entry.sent_by is SentBy.GATEWAY, name
        assert name == "CLOSE_" + entry.name.upper(), (name, entry.name)


#: A constant of the session that names a close code: the only literals outside the table.
_SESSION_CONSTANT = re.compile(r"^CLOSE_[A-Z_]+ = \d+$")


def _literal_codes(source: str, codes: set[int], *, session: bool = False) -> list[str]:
    """Lines of ``source`` with one of ``codes`` as a number (not in a string or comment)."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.NUMBER or not token.string.isdigit():
            continue
        if int(token.string) in codes:
            line = token.line.strip()
            if session and _SESSION_CONSTANT.match(line):
                continue
            found.append(f"{token.start[0]}: {line}")
    return found


def test_no_module_of_the_gateway_writes_a_close_code_as_a_literal() -> None:
    sent = {e.code for e in TABLE if e.sent_by in (SentBy.GATEWAY, SentBy.SERVER)}
    found = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        if path.name == "closecodes.py":
            continue
        source = path.read_text(encoding="utf-8")
        lines = _literal_codes(source, sent, session=path.name == "session.py")
        found += [f"{path.relative_to(ROOT)}:{line}" for line in lines]
    assert not found, "\n".join(found)


def test_the_literal_check_finds_a_literal() -> None:
    """The check above can fail: a close with a literal code is found, one in a comment or a
    string is not."""
    source = "async def f(ws):\n    await ws.close(4029, 'not 4008')  # not 1013\n"
    assert _literal_codes(source, {4029, 4008, 1013}) == ["2: " + source.splitlines()[1].strip()]
