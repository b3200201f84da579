"""What a running `cascade ui` serves and accepts, over plain HTTP on 127.0.0.1: files only from
the runs folder and only as images, CSV or JSON (a report.html as a download), uploads kept outside
the runs folder and never served back as a page, no post from another site's page."""
from __future__ import annotations

import importlib.util

import pytest

from tests.helpers.ui_server import server  # noqa: F401 (the module's server fixture)
from tests.helpers.ui_server import ROOT, get, start, stop

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                reason="gradio is not installed (pip install -e '.[ui]' or '.[dev]')")
EVIL = b"<html><script>window.__xss=1</script></html>"


def _fetch(url: str):
    import httpx

    return httpx.get(url, timeout=10)


def _upload(url: str, name: str, data: bytes, **headers):
    import httpx

    return httpx.post(f"{url}/gradio_api/upload", files={"files": (name, data)}, headers=headers, timeout=10)


def test_files_are_served_from_the_runs_folder_only(server):
    url, runs, base = server
    (base / "secret.txt").write_text("outside")
    inside = runs / "note.json"
    inside.write_text("{}")
    assert get(f"{url}/gradio_api/file={inside}") == 200
    for bad in (f"{runs}/../secret.txt", f"{runs}/%2e%2e/secret.txt", str(base / "secret.txt"), "/etc/passwd",
                "../secret.txt", str(ROOT / "pyproject.toml"), f"{runs}/../secret.png", "https://example.com/a.png"):
        assert get(f"{url}/gradio_api/file={bad}") in (403, 404), bad


def test_runs_folder_serves_images_csv_json_and_reports_only_as_downloads(server):
    from PIL import Image

    url, runs, _ = server
    run = runs / "00042-stage1-toy"
    run.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(run / "loss.png")
    (run / "results.csv").write_text("a,b\n1,2\n")
    (run / "report.html").write_bytes(EVIL)
    (run / "log.txt").write_text("a log line")
    (run / "page.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>")
    r = _fetch(f"{url}/gradio_api/file={run / 'loss.png'}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff" and "sandbox" in r.headers["content-security-policy"]
    r = _fetch(f"{url}/gradio_api/file={run / 'results.csv'}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    for path in (f"/gradio_api/file={run / 'report.html'}", f"/gradio_api/file/{run / 'report.html'}"):
        r = _fetch(url + path)
        assert r.status_code == 200 and r.content == EVIL, path
        assert r.headers["content-type"] == "application/octet-stream", path
        assert r.headers["content-disposition"].startswith("attachment"), path
        assert "sandbox" in r.headers["content-security-policy"]
    for name in ("log.txt", "page.svg"):
        assert _fetch(f"{url}/gradio_api/file={run / name}").status_code == 403, name


def test_an_upload_is_kept_outside_the_runs_folder_and_never_served_as_a_page(server):
    from pathlib import Path

    url, runs, _ = server
    r = _upload(url, "evil.html", EVIL)
    assert r.status_code == 200, r.text
    stored = Path(r.json()[0])
    assert stored.read_bytes() == EVIL and runs.resolve() not in stored.resolve().parents
    assert _fetch(f"{url}/gradio_api/file={stored}").status_code == 403
    # HTML named as an image comes back as an image that a browser will not sniff into a page
    stored = Path(_upload(url, "evil.png", EVIL).json()[0])
    r = _fetch(f"{url}/gradio_api/file={stored}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff" and "sandbox" in r.headers["content-security-policy"]


def test_no_post_from_another_sites_page(server):
    url, _, _ = server
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": url.replace("127.0.0.1", "localhost")}):
        r = _upload(url, "photo.png", b"x", **headers)
        assert r.status_code == 403, headers
    assert _upload(url, "photo.png", b"x", Origin=url, **{"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert _upload(url, "photo.png", b"x").status_code == 200  # no browser: no other site drove it


def test_the_upload_cache_is_private_and_removed_when_the_ui_ends(tmp_path):
    from pathlib import Path

    proc, url, log = start(tmp_path)
    try:
        stored = Path(_upload(url, "photo.png", b"x").json()[0])
        cache = next(p for p in stored.parents if p.name.startswith("cascade-ui-uploads-"))
        assert cache.stat().st_mode & 0o777 == 0o700
    finally:
        stop(proc, log)  # SIGTERM
    assert not cache.exists()


def test_without_a_login_only_loopback_host_names_are_answered(server):
    """A page of evil.example whose name is pointed at 127.0.0.1 (DNS rebinding) is same-origin to the
    browser; its requests still say Host: evil.example."""
    import httpx

    url, runs, _ = server
    (runs / "seen.png").write_bytes(b"x")
    for host in ("evil.example", "evil.example:7860", "127.0.0.1.evil.example"):
        assert httpx.get(f"{url}/config", headers={"Host": host}, timeout=10).status_code == 403, host
        assert httpx.get(f"{url}/gradio_api/file={runs / 'seen.png'}", headers={"Host": host}, timeout=10).status_code == 403
    port = url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert httpx.get(f"{url}/config", headers={"Host": host}, timeout=10).status_code == 200, host
