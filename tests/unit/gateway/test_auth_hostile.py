"""Hostile tokens that reach ``gateway.auth``: every one is a clean AuthError, never an exception
the server turns into a 500 or a dropped connection (no server needed)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from feed.settings import Secret
from gateway.auth import MAX_EXP, AuthError, verify_user_token

KEY = "hostile-input-secret-" + "z" * 40


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signed(payload: bytes) -> str:
    """A JWT over the raw ``payload`` bytes, correctly signed (the holder of the secret)."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(payload)
    signature = _b64(hmac.new(KEY.encode(), head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + signature).decode()


@pytest.mark.parametrize(
    "payload",
    [
        b'{"sub":"u1","exp":1' + b"0" * 400 + b"}",  # int too large to convert to float
        b'{"sub":"u1","exp":' + str(MAX_EXP + 1).encode() + b"}",
        b'{"sub":"u1","exp":1e300}',
        b'{"sub":"u1","exp":Infinity}',
        b'{"sub":"u1","exp":NaN}',
    ],
    ids=["400-digit-exp", "past-year-9999", "1e300", "infinity", "nan"],
)
def test_exp_out_of_range_is_an_auth_error(payload: bytes) -> None:
    with pytest.raises(AuthError):
        verify_user_token(signed(payload), Secret(KEY), leeway_s=30)


@pytest.mark.parametrize("token", ["\ud800.a.b", "a.\udfff.b", "\x00.\x00.\x00", "é.é.é"])
def test_odd_characters_in_a_token_are_an_auth_error(token: str) -> None:
    with pytest.raises(AuthError):
        verify_user_token(token, Secret(KEY), leeway_s=30)


def test_a_far_but_valid_exp_is_accepted() -> None:
    claims = verify_user_token(
        signed(b'{"sub":"u1","exp":' + str(MAX_EXP).encode() + b"}"), Secret(KEY), leeway_s=30
    )
    assert claims.user == "u1" and claims.expires_at == MAX_EXP
