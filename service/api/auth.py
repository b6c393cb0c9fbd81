"""Bearer API keys (VAE_API_KEYS): one dependency, applied to every model router."""


import hmac
from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.errors import Unauthorized
from service.config import Settings


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
        given = credentials.credentials.encode()
        # Compare against every key (no early exit), so timing does not reveal which key nearly matched.
        matches = [hmac.compare_digest(given, key) for key in keys]
        if not any(matches):
            raise Unauthorized("invalid API key")

    return [Depends(require_api_key)]
