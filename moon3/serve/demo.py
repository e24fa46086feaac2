"""A small demo page served by the model server itself: type a query or drop an image, see the top products.

Routes (added to KServe's FastAPI app): ``GET /demo`` the page (no external resources), ``GET /demo/info`` the
served model and index, ``GET /demo/images/{product_id}`` a gallery thumbnail (read from the index's product
table, local or ``gs://``; only gallery products, never an arbitrary path). The page calls the search model's
own v1 endpoint, so what it shows is exactly what a client gets.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections import OrderedDict
from typing import Any

from PIL import Image

from moon3.data.io import decode_image, read_bytes
from moon3.serve.engine import Moon3Engine

THUMBNAIL = 256
_CACHE_SIZE = 512

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moon3 search demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
 h1 { font-size: 20px; margin: 0 0 4px; } #info { color: #666; font-size: 13px; margin-bottom: 16px; }
 form { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
 #q { flex: 1; min-width: 280px; font-size: 16px; padding: 8px; }
 #drop { border: 2px dashed #aaa; padding: 8px 12px; border-radius: 6px; color: #555; cursor: pointer; }
 #drop.over { border-color: #2a7; background: #efe; } #preview { height: 48px; vertical-align: middle; display: none; }
 button { font-size: 16px; padding: 8px 16px; }
 #status { margin: 12px 0; color: #555; min-height: 1em; } #status.error { color: #b00; }
 #trace { white-space: pre-wrap; background: #f0f0f0; padding: 8px; display: none; font-size: 13px; }
 #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 12px; }
 .result { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
 .result img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #eee; }
 .result figcaption { font-size: 12px; } .score { color: #2a7; font-weight: bold; }
</style></head>
<body>
<h1>moon3 product search</h1>
<div id="info">loading…</div>
<form id="form">
  <input id="q" type="text" placeholder="type a query, e.g. red cotton shirt" autocomplete="off">
  <label id="drop">drop an image or click<input id="file" type="file" accept="image/*" hidden></label>
  <img id="preview" alt="query image">
  <button id="go" type="submit">Search</button>
</form>
<div id="status"></div>
<pre id="trace"></pre>
<div id="results"></div>
<script>
const CFG = __CFG__;
let image = null;
const $ = (id) => document.getElementById(id);
function setStatus(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }
async function loadInfo() {
  const r = await fetch("/demo/info"); const info = await r.json();
  const idx = info.index ? `${info.index.products} products (${info.index.split}), ` : "no index, ";
  $("info").textContent = `${CFG.search}: ${idx}${info.reasoning_label || ""}, dim ${info.embed_dim || "?"}`;
  return info;
}
function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => {
    image = reader.result; $("preview").src = image; $("preview").style.display = "inline"; search();
  };
  reader.readAsDataURL(file);
}
async function search() {
  const text = $("q").value.trim();
  if (!text && !image) { setStatus("type a query or drop an image", true); return; }
  const instance = {}; if (text) instance.text = text; if (image) instance.image = image;
  setStatus("searching…"); $("results").innerHTML = "";
  const started = performance.now();
  const r = await fetch(`/v1/models/${CFG.search}:predict`, {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({instances: [instance], parameters: {top_k: CFG.top_k, return_trace: true}}),
  });
  const body = await r.json();
  if (!r.ok) { setStatus(`error ${r.status}: ${body.error || JSON.stringify(body)}`, true); return; }
  const p = body.predictions[0];
  $("trace").style.display = p.trace ? "block" : "none"; $("trace").textContent = p.trace ? `trace: ${p.trace}` : "";
  for (const hit of p.results) {
    const fig = document.createElement("figure"); fig.className = "result"; fig.dataset.productId = hit.product_id;
    const img = document.createElement("img"); img.src = `/demo/images/${encodeURIComponent(hit.product_id)}`;
    img.alt = hit.title || hit.product_id;
    const cap = document.createElement("figcaption");
    const score = document.createElement("span"); score.className = "score"; score.textContent = hit.score.toFixed(3);
    cap.append(score, " ", hit.title || hit.product_id);
    fig.append(img, cap); $("results").append(fig);
  }
  setStatus(`${p.results.length} results in ${Math.round(performance.now() - started)} ms`);
}
$("form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
$("file").addEventListener("change", (e) => { if (e.target.files[0]) readFile(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) readFile(e.dataTransfer.files[0]); });
loadInfo().then(() => { document.body.dataset.ready = "1"; },
                (err) => setStatus(`cannot reach the server: ${err}`, true));
</script>
</body></html>
"""


def render_page(search_name: str, top_k: int) -> str:
    """The page with its settings (JSON, ``<`` escaped so no value can close the script)."""
    cfg = json.dumps({"search": search_name, "top_k": top_k}).replace("<", "\\u003c")
    return PAGE.replace("__CFG__", cfg)


class Thumbnails:
    """PNG thumbnails of gallery images, at most :data:`THUMBNAIL` px, the last ``size`` kept in memory."""

    def __init__(self, size: int = _CACHE_SIZE):
        self.size = size
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, uri: str) -> bytes:
        """The thumbnail of the image at ``uri`` (raises OSError/ValueError if it cannot be read)."""
        with self._lock:
            if uri in self._cache:
                self._cache.move_to_end(uri)
                return self._cache[uri]
        image = decode_image(read_bytes(uri))
        image.thumbnail((THUMBNAIL, THUMBNAIL), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        with self._lock:
            self._cache[uri] = data
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return data


def add_demo_routes(app: Any, engine: Moon3Engine) -> None:
    """Add ``/demo``, ``/demo/info`` and ``/demo/images/{product_id}`` to a FastAPI app."""
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    page = render_page(engine.cfg.search_name, engine.cfg.default_top_k)
    thumbs = Thumbnails()

    async def demo_page() -> HTMLResponse:
        return HTMLResponse(page)

    async def demo_info() -> JSONResponse:
        return JSONResponse(engine.info())

    async def demo_image(product_id: str) -> Response:
        uri = engine.product_image(product_id)
        if uri is None:
            return JSONResponse({"error": f"no gallery image for product {product_id!r}"}, status_code=404)
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, thumbs.get, uri)
        except (OSError, ValueError):
            return JSONResponse({"error": f"image of product {product_id!r} cannot be read"}, status_code=404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    app.add_api_route("/demo", demo_page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/demo/info", demo_info, methods=["GET"], include_in_schema=False)
    app.add_api_route("/demo/images/{product_id:path}", demo_image, methods=["GET"], include_in_schema=False)
