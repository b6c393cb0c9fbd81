"""Bearer API keys (VAE_API_KEYS): one key check, used by the routers' dependency and the fast path."""


import hmac
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from service.api.errors import Unauthorized
from service.config import Settings

MISSING = "missing header 'Authorization: Bearer <api key>'"
WRONG_SCHEME = "Authorization must be 'Bearer <api key>'"
WRONG_KEY = "invalid API key"


def key_matches(given: bytes, keys: list[bytes]) -> bool:
    """Whether `given` is one of `keys`. Compares against every key (no early exit), so timing does not
    reveal which key nearly matched."""
    matches = [hmac.compare_digest(given, key) for key in keys]
    return any(matches)


def authorization_problem(header: bytes | None, keys: list[bytes]) -> str | None:
    """What is wrong with an Authorization header value (None: absent), or None when it carries a key.

    The one check of every protocol (/v1 through FastAPI and the fast path, V2, and the operations
    paths under VAE_AUTH_OPS), so each gets the same message: the header is missing, it does not use
    the Bearer scheme (e.g. the bare key), or the key is wrong. The scheme is case-insensitive (RFC 9110).
    """
    if header is None or not header.strip():
        return MISSING
    scheme, _, given = header.strip().partition(b" ")
    given = given.strip()
    if scheme.lower() != b"bearer" or not given:
        return WRONG_SCHEME
    return None if key_matches(given, keys) else WRONG_KEY


def auth_dependencies(settings: Settings) -> list[Any]:
    """`dependencies=` for a router: the bearer-key check when keys are configured, else nothing."""
    if not settings.api_keys:
        return []
    keys = [k.get_secret_value().encode() for k in settings.api_keys]
    # Declares the scheme in the OpenAPI document ("Authorize" in /docs); the header is checked below.
    bearer = HTTPBearer(auto_error=False, description="one of the keys in VAE_API_KEYS")

    async def require_api_key(request: Request, _: Annotated[Any, Depends(bearer)]) -> None:
        value = request.headers.get("authorization")
        problem = authorization_problem(None if value is None else value.encode("latin-1"), keys)
        if problem is not None:
            raise Unauthorized(problem)

    return [Depends(require_api_key)]
