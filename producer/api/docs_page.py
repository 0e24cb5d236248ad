"""``/docs``: Swagger UI served by this process, not from a CDN.

FastAPI's default page loads Swagger UI's script and CSS from jsDelivr: an API host without
internet access showed a blank page, and every visit handed that CDN the operator's browser with
the page able to run whatever it served. Here the assets come from the ``fastapi-offline``
package (Swagger UI 5, which reads OpenAPI 3.1), the page's own setup is a file too (no inline
script), and a Content-Security-Policy lets the page run only scripts of this origin and talk
only to it.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imgq API</title>
<link rel="stylesheet" href="{ASSETS}/swagger-ui.css"><link rel="icon" href="{ASSETS}/favicon.png">
</head><body><div id="swagger-ui"></div>
<script src="{ASSETS}/swagger-ui-bundle.js"></script><script src="/docs/setup.js"></script>
</body></html>
"""

_SETUP = """window.ui = SwaggerUIBundle({
  url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true, layout: "BaseLayout",
  presets: [SwaggerUIBundle.presets.apis], persistAuthorization: false
});
"""


def install(app: FastAPI) -> None:
    """Serve /docs, its setup script and Swagger UI's assets (create the app with docs_url=None)."""
    from importlib.resources import files

    assets = files("fastapi_offline") / "static"  # the package's own page would inline its setup script

    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(_PAGE, headers=headers)

    @app.get("/docs/setup.js", include_in_schema=False)
    def setup() -> Response:
        return Response(_SETUP, media_type="text/javascript", headers=headers)

    app.mount(ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")
