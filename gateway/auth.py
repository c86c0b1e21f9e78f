"""Authentication: user JWTs (HS256 only) and the ingest token.

* A **user token** is a JWT signed with ``FEED_JWT_SECRET`` using HS256 and nothing else: ``none``,
  other HMAC sizes and every asymmetric algorithm are rejected, so a token cannot choose how it is
  checked. ``sub`` (the user id) and ``exp`` are required; ``exp``/``nbf``/``iat`` are checked with
  ``jwt_leeway_s`` of clock skew.
* The **ingest token** (``FEED_INGEST_TOKEN``) is compared in constant time
  (:meth:`feed.settings.Secret.matches`).
* Tokens come from ``Authorization: Bearer <token>``. Only the WebSocket route also accepts
  ``?token=`` (browsers cannot set headers on a WebSocket); HTTP routes never read it.

Nothing here logs: callers log the *reason* of a failure (:attr:`AuthError.reason`), never a token
or the secret.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from feed.settings import Secret
from feed.tenants import DEFAULT, scoped
from schemas.activity import is_valid_id
from schemas.errors import FeedError

__all__ = [
    "ALGORITHM",
    "AuthError",
    "UserClaims",
    "bearer_token",
    "ingest_authorized",
    "mint_token",
    "token_tenant",
    "verify_user_token",
]

ALGORITHM = "HS256"
_ALGORITHMS = [ALGORITHM]
_REQUIRED = ["exp", "sub"]
#: A bearer token longer than this is not one of ours (and is not worth decoding).
MAX_TOKEN_CHARS = 4096
#: Latest ``exp`` accepted: 9999-12-31T23:59:59Z (a larger number is no date; a huge integer
#: would not even convert to a float).
MAX_EXP = 253_402_300_799


class AuthError(FeedError):
    """A missing, malformed, expired or forged credential. ``reason`` is safe to log."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class UserClaims:
    """The verified claims the gateway uses."""

    user: str
    expires_at: float
    #: The user's tenant (claim ``tid``; absent: ``default``): ``docs/tenants.md``.
    tenant: str = DEFAULT

    @property
    def principal(self) -> str:
        """The user across tenants: the user id for ``default``, else ``<tenant>\x1f<user>``
        (``gateway.tenancy``): what the hub and the delivery streams are keyed by."""
        return scoped(self.tenant, self.user)


def _key(secret: Secret | str) -> str:
    return secret.reveal() if isinstance(secret, Secret) else secret


def token_tenant(token: str) -> str | None:
    """The ``tid`` claim of a token, *not verified*: only to choose the keys to verify it with
    (:func:`verify_user_token` checks it again once verified). None without one, or for
    anything that is no JWT with a string ``tid``."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except Exception:  # whatever a hostile string makes the decoder raise: no tenant
        return None
    tid = claims.get("tid") if isinstance(claims, dict) else None
    return tid if isinstance(tid, str) else None


def verify_user_token(
    token: str,
    secret: Secret | Sequence[str],
    *,
    leeway_s: int,
    tenant: str = DEFAULT,
) -> UserClaims:
    """Verify a user JWT of ``tenant`` and return its claims; raise :class:`AuthError`
    otherwise. ``secret``: the default tenant's (``FEED_JWT_SECRET``), or a tenant's secrets
    (current first, then those of a rotation's grace period): a token verifies with its own
    tenant's secrets only, and its ``tid`` claim must name that tenant (absent: ``default``)."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise AuthError("malformed", "the token is missing or too long")
    keys = [_key(secret)] if isinstance(secret, Secret) else list(secret)
    if not keys:
        raise AuthError("bad_signature", "the token signature does not verify")
    claims = None
    for n, key in enumerate(keys):
        try:
            claims = _decode(token, key, leeway_s)
            break
        except AuthError as exc:
            if exc.reason != "bad_signature" or n == len(keys) - 1:
                raise
    assert claims is not None
    tid = claims.get("tid", DEFAULT)
    if not isinstance(tid, str):
        raise AuthError("invalid", "the `tid` claim is not a string")
    if tid != tenant:
        # signed with this tenant's secret, but naming another tenant: never honoured
        raise AuthError("wrong_tenant", "the token's `tid` does not match its signature")
    user = claims.get("sub")
    if not isinstance(user, str) or not is_valid_id(user):  # the one user-id rule
        raise AuthError("bad_subject", "the `sub` claim is not a valid user id")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AuthError("invalid", "the `exp` claim is not a number")
    if not 0 < exp <= MAX_EXP:  # also keeps float(exp) from overflowing on a huge integer
        raise AuthError("invalid", f"the `exp` claim is out of range (at most {MAX_EXP})")
    return UserClaims(user=user, expires_at=float(exp), tenant=tenant)


def _decode(token: str, key: str, leeway_s: int) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=_ALGORITHMS,
            options={"require": _REQUIRED},
            leeway=leeway_s,
        )
        return claims
    except jwt.ExpiredSignatureError:
        raise AuthError("expired", "the token has expired") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError("missing_claim", f"the token has no `{exc.claim}` claim") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError("bad_algorithm", f"only {ALGORITHM} tokens are accepted") from None
    except jwt.InvalidSignatureError:
        raise AuthError("bad_signature", "the token signature does not verify") from None
    except jwt.InvalidTokenError:
        raise AuthError("invalid", "the token is not a valid JWT") from None
    except (ValueError, TypeError, OverflowError):
        # Whatever else a hostile string makes the decoder raise (a lone surrogate, a number
        # that does not convert): still just an invalid token, never a server error.
        raise AuthError("invalid", "the token is not a valid JWT") from None


def mint_token(
    secret: Secret | str,
    user: str,
    ttl_s: int,
    *,
    now: float | None = None,
    tenant: str = DEFAULT,
) -> str:
    """A user JWT for ``user`` valid for ``ttl_s`` seconds (``feed token``, dev page, tests),
    of ``tenant`` (claim ``tid``, left out for ``default``), signed with ``secret``: that
    tenant's."""
    if not is_valid_id(user):
        raise ValueError("user id must be 1-128 printable characters without whitespace")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {"sub": user, "iat": issued, "exp": issued + int(ttl_s)}
    if tenant != DEFAULT:
        payload["tid"] = tenant
    return jwt.encode(payload, _key(secret), algorithm=ALGORITHM)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def ingest_authorized(headers: Mapping[str, str], ingest_token: Secret | None) -> bool:
    """True if the request carries the ingest token (compared in constant time)."""
    if ingest_token is None:
        return False
    token = bearer_token(headers)
    if token is None or len(token) > MAX_TOKEN_CHARS:
        return False
    return ingest_token.matches(token)
