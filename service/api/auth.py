"""Bearer API keys (VAE_API_KEYS): one key check, used by the routers' dependency and the fast path."""


import hmac
from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.errors import Unauthorized
from service.config import Settings


def key_matches(given: bytes, keys: list[bytes]) -> bool:
    """Whether `given` is one of `keys`. Compares against every key (no early exit), so timing does not
    reveal which key nearly matched."""
    matches = [hmac.compare_digest(given, key) for key in keys]
    return any(matches)


def auth_dependencies(settings: Settings) -> list[Any]:
    """`dependencies=` for a router: the bearer-key check when keys are configured, else nothing."""
    if not settings.api_keys:
        return []
    keys = [k.get_secret_value().encode() for k in settings.api_keys]
    bearer = HTTPBearer(auto_error=False, description="one of the keys in VAE_API_KEYS")

    async def require_api_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if credentials is None:
            raise Unauthorized("missing header 'Authorization: Bearer <api key>'")
        if not key_matches(credentials.credentials.encode(), keys):
            raise Unauthorized("invalid API key")

    return [Depends(require_api_key)]
