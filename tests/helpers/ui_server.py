"""Start `cascade ui --config toy` on a free local port (for the tests that talk to a real server)."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def start(base: Path, **env_extra):
    """`cascade ui --config toy` on a free local port over base/runs; (process, url, log file)."""
    runs = base / "runs"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CASCADE_UI_AUTH", None)
    env.update(env_extra)
    log = open(base / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cascade", "ui", "--config", "toy", "--runs", str(runs),
                             "--port", str(port)], cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if get(url + "/") == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"cascade ui did not start: {(base / 'ui.log').read_text()[-2000:]}")
    return proc, url, log


def stop(proc, log):
    proc.terminate()
    proc.wait(20)
    log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `cascade ui --config toy` for a test module: (url, runs folder, its parent)."""
    base = tmp_path_factory.mktemp("ui")
    proc, url, log = start(base)
    yield url, base / "runs", base
    stop(proc, log)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none (PIL reads the size from the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
