"""A direct path for the hot image routes, in front of FastAPI's router.

Profiled on a 1-image encode (py-spy, docs/benchmarks.md), FastAPI's routing, dependency injection
and query validation took more of an HTTP worker than the route itself (a 1-image reconstruct through
FastAPI cost its worker ~650 us, three times an encode on this path). The routes that other services
call for every image (encode, reconstruct, log-likelihood, anomaly-score under /v1) are therefore
dispatched here directly, to the very same operation bodies the FastAPI routes call
(v1.ImageOperations), with the same model resolution, admission, limits, metrics labels and error
bodies.

Only requests this layer can take without guessing come here: POST, a matching path, query
parameters that pass their one definition (api/params.py, the same bounds FastAPI's routes are built
from), and a valid API key when keys are configured. Everything else (a bad parameter, a missing
key, an unusual form) goes to FastAPI, which gives its usual answer, so the two paths cannot
disagree on what is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.auth import authorization_problem
from service.api.errors import ServiceError, error_response, from_engine_error, http_error_response
from service.api.model_ref import resolve_model
from service.api.params import Params
from service.api.state import AppState
from service.api.v1 import ImageOperations
from service.engine.interface import EngineError

_PATH = re.compile(r"/v1/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                   r"/(?P<op>encode|reconstruct|log-likelihood|anomaly-score)")
# The query parameters each hot route takes; their bounds come from api/params.py, as FastAPI's do.
_ACCEPTS = {"encode": ("label", "include"), "reconstruct": ("label", "format", "include_input"),
            "log-likelihood": ("label", "seed", "k"),
            "anomaly-score": ("label", "seed", "k", "method", "alpha")}


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
        self.params = Params.from_settings(settings)
        self.default_k = settings.default_k
        self.keys = [k.get_secret_value().encode() for k in settings.api_keys]
        # Route templates, so metrics and access logs label fast requests exactly as FastAPI's.
        self.templates = {
            (op, versioned): RouteLabel("/v1/models/{model}" + "/versions/{version}" * versioned + f"/{op}")
            for op in _ACCEPTS for versioned in (False, True)}

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
        """The query parameters of `op`, checked by their one definition (api/params.py), or None when
        any of them is invalid or unknown here: then FastAPI answers, with its usual error."""
        given = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True)) if query else {}
        accepted = _ACCEPTS[op]
        params: dict[str, Any] = dict.fromkeys(accepted)
        for name, text in given.items():
            if name not in params:
                continue  # FastAPI ignores unknown query parameters too
            try:
                params[name] = self.params.get(name).parse(text)
            except ServiceError:
                return None
        if op == "log-likelihood" and params["k"] is None:
            params["k"] = self.default_k
        if op == "reconstruct":
            params["format"] = params["format"] or "png"
            params["include_input"] = params["include_input"] or "false"
        return params

    def _authorized(self, scope: Scope) -> bool:
        """A valid key, by the check FastAPI's routes use (api/auth.py); any problem goes to FastAPI,
        which answers 401 with that check's message."""
        if not self.keys:
            return True
        header = next((value for name, value in scope.get("headers", ()) if name == b"authorization"), None)
        return authorization_problem(header, self.keys) is None

    async def _serve(self, scope: Scope, receive: Receive, send: Send, match: re.Match[str],
                     params: dict[str, Any]) -> None:
        op, version = match.group("op"), match.group("version")
        scope["route"] = self.templates[(op, version is not None)]  # read by RequestMiddleware._record
        request = Request(scope, receive)
        try:
            ref = resolve_model(self.state, request, match.group("model"), version)
            if op == "encode":
                response = await self.operations.encode(request, ref, params["label"], params["include"])
            elif op == "reconstruct":
                response = await self.operations.reconstruct(request, ref, params["label"], params["format"],
                                                             params["include_input"] == "true")
            elif op == "log-likelihood":
                response = await self.operations.log_likelihood(request, ref, params["k"], params["seed"],
                                                                 params["label"])
            else:
                response = await self.operations.anomaly_score(request, ref, params["k"], params["seed"],
                                                               params["label"], params["method"],
                                                               params["alpha"])
        except StarletteHTTPException as exc:  # e.g. too many multipart files: what FastAPI would answer
            response = http_error_response(exc, scope["path"])
        except EngineError as exc:
            error = from_engine_error(exc)
            response = error_response(error.status, error.code, error.message, error.headers, error.details)
        except ServiceError as error:
            response = error_response(error.status, error.code, error.message, error.headers, error.details)
        await response(scope, receive, send)
