"""The UI's safety rules, without Gradio: who may connect, which files may be served, which uploads
are accepted, and text that is shown as text (never as HTML)."""
from __future__ import annotations

import html
import os
import warnings
from pathlib import Path

from stages.errors import InputError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
AUTH_ENV = "CASCADE_UI_AUTH"  # USER:PASS, so the password need not appear in the process list
MAX_UPLOAD_MB = 20  # per file
MAX_UPLOAD_PIXELS = 64_000_000  # per image: a phone photo is 12-50 MP; a 20 MB PNG can declare billions
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def parse_auth(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise InputError(f"{where}: expected USER:PASS with a non-empty user and password")
    return user, password


def resolve_auth(host: str, auth: str | None, env: dict | None = None) -> tuple[str, str] | None:
    """The login the server requires: --auth, else $CASCADE_UI_AUTH, else none. Listening on anything
    but this machine's loopback without a login is refused."""
    env = os.environ if env is None else env
    if auth:
        return parse_auth(auth, "--auth")
    if env.get(AUTH_ENV):
        return parse_auth(env[AUTH_ENV], f"${AUTH_ENV}")
    if host not in LOCAL_HOSTS:
        raise InputError(f"--host {host}: listening beyond this machine needs a login; give --auth USER:PASS "
                         f"or set {AUTH_ENV}=USER:PASS (or keep the default --host 127.0.0.1)")
    return None


def inside(path: Path | str, root: Path | str) -> bool:
    """`path` is `root` or lies below it, symlinks and `..` resolved."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def served(root: Path | str, rel: str) -> Path | None:
    """The file `rel` (relative to the runs folder, or absolute) names, or None when it is not a file
    inside the runs folder (traversal, a symlink out, a folder, nothing)."""
    p = Path(rel)
    p = p if p.is_absolute() else Path(root) / p
    return p.resolve() if inside(p, root) and p.resolve().is_file() else None


def check_upload(path: Path | str, max_mb: float = MAX_UPLOAD_MB) -> str | None:
    """None when `path` is an image PIL can open and within the size limit, else why not (one line)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    name = p.name
    if p.stat().st_size > max_mb * 1024 * 1024:
        return f"{name}: {p.stat().st_size / 2**20:.1f} MB, over the {max_mb:g} MB limit"
    try:
        with warnings.catch_warnings():  # PIL warns, then refuses, above its pixel limit: we say it once
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if im.width * im.height > MAX_UPLOAD_PIXELS:
                    return (f"{name}: {im.width}x{im.height} pixels, over the {MAX_UPLOAD_PIXELS / 1e6:g} "
                            f"megapixel limit; scale it down")
                im.verify()
    except Image.DecompressionBombError:  # beyond twice PIL's limit, refused while the header is read
        return f"{name}: far over the {MAX_UPLOAD_PIXELS / 1e6:g} megapixel limit; scale it down"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{name}: not an image ({e.__class__.__name__})"
    return None


def text(s: object) -> str:
    """User text (prompts, captions, paths) for a Markdown component: every HTML character escaped,
    so `<script>` shows as the characters typed."""
    return html.escape(str(s), quote=True)
