"""The model explorer: a static page at /explore that shows a served model through the public /v1 API.

Plain HTML, CSS and JavaScript shipped in this package (no build step, nothing loaded from the
internet: the Content-Security-Policy allows only this origin), so the page doubles as an example
client. The files are read once when the router is built; the routes are operations paths
(service/api/ops.py): never refused while draining and not counted as model work.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Response
from starlette.exceptions import HTTPException

PREFIX = "/explore"
# name -> media type: the only files served, so metrics label them by one route template.
ASSETS = {"explorer.js": "text/javascript; charset=utf-8", "explorer.css": "text/css; charset=utf-8"}
# data: and blob: for the images the API returns (base64 PNG) and the canvases the page draws.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


def _read(name: str) -> bytes:
    return files(__package__).joinpath("static", name).read_bytes()


def build_explorer_router() -> APIRouter:
    page = _read("index.html")
    assets = {name: _read(name) for name in ASSETS}
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-cache"}
    router = APIRouter(include_in_schema=False)

    @router.get(PREFIX)
    async def explorer_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    @router.get(PREFIX + "/{asset}")
    async def explorer_asset(asset: str) -> Response:
        if asset not in assets:
            raise HTTPException(404, f"no explorer file {asset!r}; the page is at {PREFIX}")
        return Response(assets[asset], media_type=ASSETS[asset], headers=headers)

    return router
