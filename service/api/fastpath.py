"""A direct path for the hot image routes, in front of FastAPI's router.

Profiled on a 1-image encode (py-spy, see README "Where the time goes"), FastAPI's routing,
dependency injection and its stack of Starlette middlewares took more of an HTTP worker than the
route itself. The routes that other services call for every image (encode, log-likelihood,
anomaly-score under /v1) are therefore dispatched here directly, to the very same operation bodies
the FastAPI routes call (v1.ImageOperations), with the same model resolution, admission, limits,
metrics labels and error bodies.

Only requests this layer can take without guessing come here: POST, a matching path, query
parameters that parse under strict rules (plain decimal integers and numbers within the documented
bounds), and a valid API key when keys are configured. Everything else (a bad parameter, a missing
key, an unusual form) goes to FastAPI, which gives its usual answer, so the two paths cannot
disagree on what is an error.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import ServiceError, error_response, from_engine_error, http_error_response
from service.api.models import resolve_model
from service.api.state import AppState
from service.api.v1 import MAX_SEED, ImageOperations
from service.engine.interface import EngineError

_PATH = re.compile(r"/v1/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                   r"/(?P<op>encode|log-likelihood|anomaly-score)")
_INT = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True)
class RouteLabel:
    """Stands in for scope["route"]: RequestMiddleware labels metrics with its `path` template."""

    path: str


class FastPath:
    """ASGI middleware: serve the hot routes directly, pass everything else to the app."""

    def __init__(self, app: ASGIApp, state: AppState, operations: ImageOperations) -> None:
        self.app = app
        self.state = state
        self.operations = operations
        settings = state.settings
        self.max_k = settings.max_k
        self.default_k = settings.default_k
        self.keys = [k.get_secret_value().encode() for k in settings.api_keys]
        # Route templates, so metrics and access logs label fast requests exactly as FastAPI's.
        self.templates = {
            (op, versioned): RouteLabel("/v1/models/{model}" + "/versions/{version}" * versioned + f"/{op}")
            for op in ("encode", "log-likelihood", "anomaly-score") for versioned in (False, True)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _PATH.fullmatch(scope["path"])
            if match is not None:
                params = self._params(match.group("op"), scope.get("query_string", b""))
                if params is not None and self._authorized(scope):
                    await self._serve(scope, receive, send, match, params)
                    return
        await self.app(scope, receive, send)

    def _params(self, op: str, query: bytes) -> dict[str, Any] | None:
        """The query parameters of `op`, or None when any of them needs FastAPI's validation."""
        given = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True)) if query else {}
        label = given.get("label")
        if label is not None and not 0 < len(label) <= 64:
            return None
        params: dict[str, Any] = {"label": label}
        if op == "encode":
            return params
        seed = given.get("seed")
        if seed is not None and not (_INT.fullmatch(seed) and int(seed) <= MAX_SEED):
            return None
        params["seed"] = None if seed is None else int(seed)
        k = given.get("k")
        if k is not None and not (_INT.fullmatch(k) and 1 <= int(k) <= self.max_k):
            return None
        if op == "log-likelihood":
            params["k"] = self.default_k if k is None else int(k)
            return params
        params["k"] = None if k is None else int(k)
        if "method" in given or "alpha" in given:
            return None  # rarer options: FastAPI validates them
        return params

    def _authorized(self, scope: Scope) -> bool:
        if not self.keys:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                matches = [hmac.compare_digest(given.strip(), key) for key in self.keys]
                return any(matches)
        return False

    async def _serve(self, scope: Scope, receive: Receive, send: Send, match: re.Match[str],
                     params: dict[str, Any]) -> None:
        op, version = match.group("op"), match.group("version")
        scope["route"] = self.templates[(op, version is not None)]  # read by RequestMiddleware._record
        request = Request(scope, receive)
        try:
            ref = resolve_model(self.state, request, match.group("model"), version)
            if op == "encode":
                response = await self.operations.encode(request, ref, params["label"])
            elif op == "log-likelihood":
                response = await self.operations.log_likelihood(request, ref, params["k"], params["seed"],
                                                                 params["label"])
            else:
                response = await self.operations.anomaly_score(request, ref, params["k"], params["seed"],
                                                               params["label"])
        except StarletteHTTPException as exc:  # e.g. too many multipart files: what FastAPI would answer
            response = http_error_response(exc, scope["path"])
        except EngineError as exc:
            error = from_engine_error(exc)
            response = error_response(error.status, error.code, error.message, error.headers, error.details)
        except ServiceError as error:
            response = error_response(error.status, error.code, error.message, error.headers, error.details)
        await response(scope, receive, send)
