"""An ASGI middleware in front of Gradio's routes: what may be served, and who may post.

Gradio serves any file under `allowed_paths` inline with the type its name suggests (an .html file
as text/html, script and all, from this app's own origin), and it stores whatever is posted to
/gradio_api/upload, from any origin (its CORS layer only withholds the answer's header; a form
post from another site still lands). So, before Gradio sees a request:

- a file route (/gradio_api/file=PATH, /gradio_api/file/PATH) answers only for images, CSV and
  JSON (`SERVED`); an .html file inside the runs folder (a run's report.html) comes back as a
  download, never as a page; anything else is 403. Every file answer also carries `nosniff` and a
  sandboxing CSP, so even a mislabelled upload cannot become a page;
- a request that can change something (any method but GET, HEAD, OPTIONS) coming from a page of
  another origin (its Origin header, or the browser's Sec-Fetch-Site) is 403: uploads and queued
  jobs come only from this app's own page (or from a client that is no browser, which no other
  site can drive);
- on loopback (no login), a request whose Host is not a loopback name is 403: a page of evil.example
  whose name an attacker points at 127.0.0.1 (DNS rebinding) is then same-origin to the browser,
  but its requests name evil.example as their Host.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

SERVED = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
          ".gif": "image/gif", ".csv": "text/csv", ".json": "application/json"}
DOWNLOADS = {".html", ".htm"}  # inside the runs folder only, and only as attachments
_FILE_ROUTE = re.compile(r"/gradio_api/file(?:=|/)(?P<path>.*)$")
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
_CSP = b"default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox"


def file_rule(path: str, runs: Path) -> str:
    """What a file route may do with `path` (as Gradio reads it: relative to this process's working
    folder, symlinks resolved): "serve", "download" (an HTML file in the runs folder) or "refuse"."""
    if "://" in path:  # Gradio would fetch a URL for the caller: never
        return "refuse"
    p = Path(os.path.abspath(path)).resolve()
    suffix = p.suffix.lower()
    if suffix in SERVED:
        return "serve"
    if suffix in DOWNLOADS and (p == runs or runs in p.parents):
        return "download"
    return "refuse"


def cross_origin(headers: dict[bytes, bytes]) -> bool:
    """A browser request from a page of another origin (or an opaque one: a sandboxed frame, a file)."""
    site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
    if site in ("cross-site", "same-site"):
        return True
    origin = headers.get(b"origin")
    if origin is None:
        return False
    origin_s = origin.decode("latin-1").strip()
    if origin_s.lower() == "null":
        return True
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    return urlsplit(origin_s).netloc.lower() != host


def host_name(host: str) -> str:
    """The name of a Host header: without its port, IPv6 brackets kept off."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware: the rules above, around the Gradio app `app`; `local_hosts`: the Host names
    accepted (None: any, for a server behind a login)."""

    def __init__(self, app, runs: str | Path, local_hosts: set[str] | None = None):
        self.app, self.runs, self.local_hosts = app, Path(runs).resolve(), local_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.local_hosts is not None and host_name(headers.get(b"host", b"").decode("latin-1")) not in self.local_hosts:
            return await _refuse(send, "this server answers only to a loopback host name")
        if scope["method"] not in _SAFE_METHODS and cross_origin(headers):
            return await _refuse(send, "cross-origin request refused")
        m = _FILE_ROUTE.search(scope.get("path", ""))
        if m is None:
            return await self.app(scope, receive, send)
        rule = file_rule(m.group("path"), self.runs)
        if rule == "refuse":
            return await _refuse(send, "only images, CSV and JSON are served")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", [])
                        if rule == "serve" or k.lower() not in (b"content-type", b"content-disposition")]
                kept += [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", _CSP)]
                if rule == "download":
                    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(m.group("path")).name).encode()
                    kept += [(b"content-type", b"application/octet-stream"),
                             (b"content-disposition", b'attachment; filename="' + name + b'"')]
                message = {**message, "headers": kept}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


async def _refuse(send, why: str):
    body = f"403: {why}".encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": body})
