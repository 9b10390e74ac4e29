"""A small local web page over an index: a search box, a grid of thumbnails with their scores, and "more like
this" on every photo. Standard library only (``http.server``); photos are served by content key, never by
a path from the request, so the page can show only what the index holds."""
from __future__ import annotations

import io
import json
import logging
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

log = logging.getLogger(__name__)

THUMB = 256  # pixels, the longer side

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clip-distill photo search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 15px system-ui, sans-serif; margin: 1.5em; color: #222; }
form { display: flex; gap: .5em; margin-bottom: 1em; }
input[type=search] { flex: 1; font-size: 1.1em; padding: .4em; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: .8em; }
figure { margin: 0; cursor: pointer; }
figure img { width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 4px; background: #eee; }
figcaption { font-size: .8em; color: #555; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
#status { color: #666; margin-bottom: .6em; min-height: 1.2em; }
</style></head>
<body>
<h1>Photo search</h1>
<form id="form"><input id="q" type="search" name="q" placeholder="a dog running on the grass" autofocus>
<button type="submit">Search</button></form>
<div id="status">__STATUS__</div>
<div id="grid"></div>
<script>
const grid = document.getElementById("grid"), status = document.getElementById("status");
async function show(url, what) {
  status.textContent = "searching...";
  const r = await fetch(url), data = await r.json();
  grid.replaceChildren();
  if (!r.ok) { status.textContent = data.error; return; }
  status.textContent = data.hits.length + " photos for " + what + (data.notes.length ? " (" + data.notes.join("; ") + ")" : "");
  for (const h of data.hits) {
    const fig = document.createElement("figure"), img = document.createElement("img"), cap = document.createElement("figcaption");
    fig.className = "hit"; fig.dataset.path = h.path; fig.dataset.key = h.key; fig.title = h.path + "\\nclick: more like this";
    img.src = "/thumb/" + h.key; img.alt = h.name; img.loading = "lazy";
    cap.textContent = h.score.toFixed(3) + "  " + h.name;
    fig.append(img, cap); fig.onclick = () => show("/api/similar?key=" + h.key, "photos like " + h.name);
    grid.append(fig);
  }
}
document.getElementById("form").onsubmit = (e) => {
  e.preventDefault();
  const q = document.getElementById("q").value.trim();
  if (q) show("/api/search?q=" + encodeURIComponent(q), "\\u201c" + q + "\\u201d");
};
</script></body></html>
"""


def make_server(searcher: Any, host: str = "127.0.0.1", port: int = 8000, k: int = 24) -> ThreadingHTTPServer:
    """An HTTP server for ``searcher`` (a ``Searcher``); ``port`` 0 picks a free one (``server.server_port``)."""
    import os

    lock = threading.Lock()  # one query at a time: the model and the SQLite connection are not shared by threads
    index = searcher.index
    status = f"{len(index):,} photos indexed by {index.model.get('name')}"

    @lru_cache(maxsize=512)
    def thumbnail(key: str) -> bytes | None:
        from ..data import open_image, read_errors

        with lock:
            path = index.path_of(key)
        if path is None:
            return None
        try:
            im = open_image(path)
        except read_errors():
            return None
        im.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                if url.path == "/":
                    self._send(200, PAGE.replace("__STATUS__", status).encode(), "text/html; charset=utf-8")
                elif url.path in ("/api/search", "/api/similar"):
                    self._search(url.path, query)
                elif url.path.startswith("/thumb/"):
                    data = thumbnail(url.path[len("/thumb/"):])
                    self._send(200, data, "image/jpeg") if data else self._json(404, {"error": "no such photo"})
                else:
                    self._json(404, {"error": f"no page {url.path}"})
            except Exception as e:  # noqa: BLE001 - one failed request must not stop the page
                from ..errors import user_message

                message = user_message(e)
                if message is None:
                    log.exception("request %s failed", self.path)
                self._json(400 if message else 500, {"error": message or f"internal error ({type(e).__name__})"})

        def _search(self, path: str, query: dict[str, str]) -> None:
            k_ = max(1, min(200, int(query.get("k", k))))
            with lock:
                if path == "/api/search":
                    if not query.get("q", "").strip():
                        return self._json(400, {"error": "empty query"})
                    result = searcher.text(query["q"], k_)
                else:
                    key = query.get("key", "")
                    if index.vector_of(key) is None:
                        return self._json(404, {"error": "no such photo in the index"})
                    result = searcher.image(key, k_)
            self._json(200, {"notes": result.notes, "hits": [
                {"key": h.key, "path": h.path, "name": os.path.basename(h.path), "score": h.score}
                for h in result.hits]})

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store" if kind != "image/jpeg" else "max-age=3600")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug(fmt, *args)

    return ThreadingHTTPServer((host, port), Handler)


def serve(searcher: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the page until interrupted."""
    server = make_server(searcher, host, port)
    print(f"searching {searcher.index.folder} ({len(searcher.index):,} photos) at "
          f"http://{host}:{server.server_port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


__all__ = ["make_server", "serve", "PAGE"]
