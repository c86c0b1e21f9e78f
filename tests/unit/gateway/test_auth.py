"""User JWTs (HS256 only, sub+exp required, leeway) and the ingest token."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from feed.settings import Secret
from gateway.auth import (
    AuthError,
    bearer_token,
    ingest_authorized,
    mint_token,
    token_tenant,
    verify_user_token,
)

SECRET = Secret("s" * 48 + "-unit-test-secret")
OTHER = Secret("o" * 32 + "-another-secret!!")
LEEWAY = 30


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw_token(header: dict[str, object], payload: dict[str, object], signature: bytes) -> str:
    return ".".join(
        [
            _b64(json.dumps(header).encode()),
            _b64(json.dumps(payload).encode()),
            _b64(signature),
        ]
    )


def _encode(payload: dict[str, object], *, key: Secret = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(payload, key.reveal(), algorithm=alg)


def _verify(token: str, *, leeway: int = LEEWAY) -> str:
    return verify_user_token(token, SECRET, leeway_s=leeway).user


def _reason(token: str, *, leeway: int = LEEWAY) -> str:
    with pytest.raises(AuthError) as info:
        verify_user_token(token, SECRET, leeway_s=leeway)
    return info.value.reason


# --- valid tokens ---------------------------------------------------------------------------------
def test_minted_token_verifies() -> None:
    claims = verify_user_token(mint_token(SECRET, "alice", 60), SECRET, leeway_s=LEEWAY)
    assert claims.user == "alice"
    assert time.time() < claims.expires_at <= time.time() + 61


def test_minted_token_is_hs256() -> None:
    assert jwt.get_unverified_header(mint_token(SECRET, "alice", 60))["alg"] == "HS256"


def test_mint_accepts_plain_string_secret() -> None:
    assert _verify(mint_token(SECRET.reveal(), "bob", 60)) == "bob"


def test_token_with_extra_claims_verifies() -> None:
    token = _encode({"sub": "u1", "exp": int(time.time()) + 60, "iss": "someone", "x": [1]})
    assert _verify(token) == "u1"


def test_expired_within_leeway_is_accepted() -> None:
    token = _encode({"sub": "u1", "exp": int(time.time()) - 10})
    assert _verify(token, leeway=30) == "u1"


# --- expiry ---------------------------------------------------------------------------------------
def test_expired_token_is_rejected() -> None:
    token = _encode({"sub": "u1", "exp": int(time.time()) - 40})
    assert _reason(token, leeway=30) == "expired"


def test_expired_token_without_leeway_is_rejected() -> None:
    token = _encode({"sub": "u1", "exp": int(time.time()) - 2})
    assert _reason(token, leeway=0) == "expired"


def test_not_yet_valid_token_is_rejected() -> None:
    now = int(time.time())
    token = _encode({"sub": "u1", "exp": now + 600, "nbf": now + 300})
    assert _reason(token) == "invalid"


# --- signature and algorithm ----------------------------------------------------------------------
def test_wrong_secret_is_rejected() -> None:
    token = mint_token(OTHER, "alice", 60)
    assert _reason(token) == "bad_signature"


def test_tampered_payload_is_rejected() -> None:
    header, _, signature = mint_token(SECRET, "alice", 60).split(".")
    forged = _b64(json.dumps({"sub": "admin", "exp": int(time.time()) + 60}).encode())
    assert _reason(f"{header}.{forged}.{signature}") == "bad_signature"


def test_alg_none_is_rejected() -> None:
    token = _raw_token(
        {"alg": "none", "typ": "JWT"}, {"sub": "alice", "exp": int(time.time()) + 60}, b""
    )
    assert _reason(token) == "bad_algorithm"


def test_alg_none_uppercase_is_rejected() -> None:
    token = _raw_token({"alg": "NONE"}, {"sub": "alice", "exp": int(time.time()) + 60}, b"")
    assert _reason(token) in {"bad_algorithm", "invalid"}


def test_hs512_with_the_right_secret_is_rejected() -> None:
    token = _encode({"sub": "alice", "exp": int(time.time()) + 60}, alg="HS512")
    assert _reason(token) == "bad_algorithm"


def test_hs384_is_rejected() -> None:
    token = _encode({"sub": "alice", "exp": int(time.time()) + 60}, alg="HS384")
    assert _reason(token) == "bad_algorithm"


def test_rs256_header_is_rejected() -> None:
    token = _raw_token(
        {"alg": "RS256", "typ": "JWT"}, {"sub": "alice", "exp": int(time.time()) + 60}, b"x" * 64
    )
    assert _reason(token) == "bad_algorithm"


# --- required claims ------------------------------------------------------------------------------
def test_missing_sub_is_rejected() -> None:
    token = _encode({"exp": int(time.time()) + 60})
    assert _reason(token) == "missing_claim"


def test_missing_exp_is_rejected() -> None:
    token = _encode({"sub": "alice"})
    assert _reason(token) == "missing_claim"


def test_missing_claim_message_names_the_claim() -> None:
    with pytest.raises(AuthError) as info:
        verify_user_token(_encode({"sub": "alice"}), SECRET, leeway_s=LEEWAY)
    assert "exp" in info.value.message


def test_non_string_sub_is_rejected() -> None:
    token = _encode({"sub": 42, "exp": int(time.time()) + 60})
    assert _reason(token) in {"invalid", "bad_subject"}


def test_sub_with_whitespace_is_rejected() -> None:
    token = _encode({"sub": "al ice", "exp": int(time.time()) + 60})
    assert _reason(token) == "bad_subject"


@pytest.mark.parametrize("sub", ["alice\n", "alice\r\n", "al\x85ice", "alice\x7f"])
def test_sub_with_a_trailing_newline_or_control_character_is_rejected(sub: str) -> None:
    # "$" in the old rule matched before a trailing newline, so "alice\n" verified as a user id.
    token = _encode({"sub": sub, "exp": int(time.time()) + 60})
    assert _reason(token) == "bad_subject"


def test_empty_sub_is_rejected() -> None:
    token = _encode({"sub": "", "exp": int(time.time()) + 60})
    assert _reason(token) == "bad_subject"


def test_non_numeric_exp_is_rejected() -> None:
    token = _encode({"sub": "alice", "exp": "tomorrow"})
    assert _reason(token) == "invalid"


# --- malformed input ------------------------------------------------------------------------------
def test_garbage_is_rejected() -> None:
    assert _reason("not-a-jwt") == "invalid"


def test_empty_token_is_rejected() -> None:
    assert _reason("") == "malformed"


def test_oversized_token_is_rejected_without_decoding() -> None:
    assert _reason("a" * 5000) == "malformed"


def test_error_never_contains_the_token() -> None:
    token = mint_token(OTHER, "alice", 60)
    with pytest.raises(AuthError) as info:
        verify_user_token(token, SECRET, leeway_s=LEEWAY)
    assert token not in str(info.value)
    assert SECRET.reveal() not in str(info.value)


# --- minting --------------------------------------------------------------------------------------
def test_mint_rejects_bad_user_id() -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, "has space", 60)


def test_mint_rejects_non_positive_ttl() -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, "alice", 0)


def test_mint_uses_the_given_clock() -> None:
    token = mint_token(SECRET, "alice", 100, now=1_000_000)
    claims = jwt.decode(token, SECRET.reveal(), algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"sub": "alice", "iat": 1_000_000, "exp": 1_000_100}


# --- headers and the ingest token -----------------------------------------------------------------
def test_bearer_token_is_read_from_the_header() -> None:
    assert bearer_token({"authorization": "Bearer abc.def"}) == "abc.def"


def test_bearer_scheme_is_case_insensitive() -> None:
    assert bearer_token({"authorization": "bearer xyz"}) == "xyz"


@pytest.mark.parametrize("value", ["", "Bearer", "Bearer   ", "Basic dXNlcjpwdw==", "xyz"])
def test_bearer_token_absent_or_other_scheme(value: str) -> None:
    assert bearer_token({"authorization": value}) is None


def test_bearer_token_missing_header() -> None:
    assert bearer_token({}) is None


def test_ingest_token_matches() -> None:
    token = Secret("ingest-token-0123456789")
    assert ingest_authorized({"authorization": "Bearer ingest-token-0123456789"}, token)


def test_ingest_token_mismatch() -> None:
    token = Secret("ingest-token-0123456789")
    assert not ingest_authorized({"authorization": "Bearer ingest-token-012345678X"}, token)


def test_ingest_token_missing_header() -> None:
    assert not ingest_authorized({}, Secret("ingest-token-0123456789"))


def test_ingest_disabled_rejects_everything() -> None:
    assert not ingest_authorized({"authorization": "Bearer anything"}, None)


def test_user_jwt_is_not_an_ingest_token() -> None:
    jwt_token = mint_token(SECRET, "alice", 60)
    assert not ingest_authorized(
        {"authorization": f"Bearer {jwt_token}"}, Secret("ingest-token-0123456789")
    )


ACME = ["a" * 40 + "-acme-current", "b" * 40 + "-acme-previous"]


def test_a_tenants_token_verifies_with_its_own_secrets_only() -> None:
    now = time.time()
    token = mint_token(ACME[1], "u1", 600, now=now, tenant="acme")  # a grace-period secret
    claims = verify_user_token(token, ACME, leeway_s=LEEWAY, tenant="acme")
    assert (claims.user, claims.tenant) == ("u1", "acme")
    assert claims.principal == "acme\x1fu1"
    # the default tenant's secret, or another tenant's, never verifies it
    with pytest.raises(AuthError) as err:
        verify_user_token(token, SECRET, leeway_s=LEEWAY)
    assert err.value.reason == "bad_signature"
    with pytest.raises(AuthError) as err:
        verify_user_token(token, ["g" * 48], leeway_s=LEEWAY, tenant="globex")
    assert err.value.reason == "bad_signature"


def test_a_tid_that_does_not_match_the_signing_tenant_is_refused() -> None:
    # signed with acme's secret, claiming globex: the signature decides, not the claim
    forged = _encode({"sub": "u1", "exp": time.time() + 60, "tid": "globex"}, key=Secret(ACME[0]))
    with pytest.raises(AuthError) as err:
        verify_user_token(forged, ACME, leeway_s=LEEWAY, tenant="acme")
    assert err.value.reason == "wrong_tenant"
    # no tid, signed with a tenant's secret: a default token, which that secret cannot sign
    bare = _encode({"sub": "u1", "exp": time.time() + 60}, key=Secret(ACME[0]))
    with pytest.raises(AuthError) as err:
        verify_user_token(bare, ACME, leeway_s=LEEWAY, tenant="acme")
    assert err.value.reason == "wrong_tenant"
    # the default secret signing a token that names a tenant
    claiming = _encode({"sub": "u1", "exp": time.time() + 60, "tid": "acme"})
    with pytest.raises(AuthError) as err:
        verify_user_token(claiming, SECRET, leeway_s=LEEWAY)
    assert err.value.reason == "wrong_tenant"


@pytest.mark.parametrize("tid", [7, None, ["acme"], {"t": "acme"}, True])
def test_a_tid_that_is_not_a_string_is_refused(tid: object) -> None:
    token = _encode({"sub": "u1", "exp": time.time() + 60, "tid": tid})
    with pytest.raises(AuthError) as err:
        verify_user_token(token, SECRET, leeway_s=LEEWAY)
    assert err.value.reason == "invalid"
    assert token_tenant(token) is None


def test_the_unverified_tenant_is_read_from_any_jwt_and_nothing_else() -> None:
    assert token_tenant(mint_token(ACME[0], "u1", 60, tenant="acme")) == "acme"
    assert token_tenant(mint_token(SECRET, "u1", 60)) is None
    for junk in ("", "x", "a.b.c", "\udcff.\udcff.\udcff", "e" * 5000):
        assert token_tenant(junk) is None
