"""The browser side, in its own blueprint: the playground at / and the API documentation at /docs.

Both are static files shipped in the package (service/web/): no build step, nothing from a CDN.
The pages call the same JSON API as any client, with the API key the user typed, so they work
with API_KEYS on; their own files need no key (service.access lets every `ui.` endpoint through:
a browser opens a page before it can send a header).

/docs is Swagger UI 5 (it reads OpenAPI 3.1) from the flask-swagger-ui wheel, which ships the
swagger-ui-dist files with their licence. Only those files are used, not that package's
blueprint, so the page and its settings are ours (no validator badge calling out to swagger.io).
/docs is an operation of the API and is in the document; the playground and the files are not.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from flask import Flask, Response, send_from_directory

from .openapi import Api, add_routes

WEB = Path(__file__).with_name("web")
SWAGGER_UI = Path(str(files("flask_swagger_ui").joinpath("dist")))

# The browser may load only this server's files and call only this server: "no CDN" is enforced
# (and a page that tried would log a console error, which the browser tests fail on). Swagger UI
# sets inline styles and draws icons from data: URLs.
CSP = (
    "default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'self'; frame-ancestors 'self'"
)

ui = Api("ui")


@ui.route(
    "/docs",
    "GET",
    summary="Interactive API documentation",
    responses={200: None},
    tag="operations",
    content_type="text/html",
)
def docs() -> Response:
    """Swagger UI rendering /openapi.json (OpenAPI 3.1; every file served by this server)."""
    return send_from_directory(WEB / "docs", "index.html")


@ui.blueprint.route("/docs/assets/<path:filename>", methods=["GET"], endpoint="docs_asset")
def docs_asset(filename: str) -> Response:
    return send_from_directory(SWAGGER_UI, filename)


@ui.blueprint.route("/", methods=["GET"], endpoint="playground")
def playground() -> Response:
    """The playground: stream text, watch the next-token distribution, continue, fork, reset."""
    return send_from_directory(WEB / "playground", "index.html")


@ui.blueprint.route("/favicon.ico", methods=["GET"], endpoint="favicon")
def favicon() -> Response:
    # browsers ask every site for it; without a route, API keys on would answer 401 in their consoles
    return send_from_directory(WEB / "playground", "icon.svg", mimetype="image/svg+xml")


@ui.blueprint.route("/ui/<path:filename>", methods=["GET"], endpoint="asset")
def asset(filename: str) -> Response:
    return send_from_directory(WEB, filename)


@ui.blueprint.after_request
def _page_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def init_app(app: Flask) -> None:
    """The pages, and /docs added to the API's document (so after api.init_app, which builds it)."""
    if "OPENAPI_DOCUMENT" not in app.config:
        raise RuntimeError("service.ui.init_app must run after service.api.init_app: it documents /docs")
    app.register_blueprint(ui.blueprint)
    add_routes(app.config["OPENAPI_DOCUMENT"], ui)
