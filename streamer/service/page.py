"""The browser page `streamer serve` answers at / on both transports: static files in streamer/assets/page.

Plain HTML, JS and CSS, no build step and nothing from a CDN (it works offline). index.html carries what the
page needs to know about this server (model, policies and defaults, whether a token or a root is needed) as a
JSON block filled in once per service. The page holds no data: it is served without the token; its websocket,
like every other, needs it (offered as the subprotocol `bearer.TOKEN`, since a browser cannot set headers).
"""

from __future__ import annotations

import json
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "assets" / "page"
FILES = {"/": "index.html", "/page.js": "page.js", "/page.css": "page.css"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}
SERVER_INFO = "{{SERVER_INFO}}"


class Page:
    """The page's files as (content type, bytes), read once."""

    def __init__(self, server_info: dict):
        self.files: dict[str, tuple[str, bytes]] = {}
        for route, name in FILES.items():
            text = (PAGE / name).read_text(encoding="utf-8")
            if name == "index.html":  # JSON inside <script>: no "<" may close the element early
                text = text.replace(SERVER_INFO, json.dumps(server_info).replace("<", "\\u003c"))
            self.files[route] = (TYPES[Path(name).suffix], text.encode("utf-8"))

    def get(self, path: str) -> tuple[str, bytes] | None:
        return self.files.get(path)
