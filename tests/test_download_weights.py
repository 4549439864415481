"""scripts/download_weights.py against a local http server with small fake checkpoints in the real formats."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from src.errors import VQTError

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("download_weights", REPO / "scripts" / "download_weights.py")
dw = importlib.util.module_from_spec(_spec)
sys.modules["download_weights"] = dw
_spec.loader.exec_module(dw)

NAMES = {"sup_vitb16_imagenet1k": "imagenet1k_ViT-B_16.npz", "sup_vitb16_imagenet21k": "imagenet21k_ViT-B_16.npz",
         "mae_vitb16": "mae_pretrain_vit_base.pth"}
HTML = b"<!DOCTYPE html><html><body>Google Drive - quota exceeded</body></html>"


def _npz(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    np.savez(buf, **{"embedding/kernel": rng.normal(size=(16, 16, 3, 8)).astype(np.float32),
                     "cls": np.zeros((1, 1, 8), np.float32)})
    return buf.getvalue()


def _pth() -> bytes:
    buf = io.BytesIO()
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.ones(1, 5, 8)}}, buf)
    return buf.getvalue()


class Server:
    """Serves `files` (name -> bytes) with Range support; names in `truncate` get half a body once."""

    def __init__(self) -> None:
        self.files = {NAMES["sup_vitb16_imagenet1k"]: _npz(1), NAMES["sup_vitb16_imagenet21k"]: _npz(2),
                      NAMES["mae_vitb16"]: _pth()}
        self.truncate: set[str] = set()
        self.trickle: set[str] = set()  # names sent one byte every 0.2 s
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name, rng = self.path.lstrip("/"), self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if name in server.trickle:
                    for i in range(start, min(start + 50, len(data))):
                        time.sleep(0.2)
                        try:
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                        except OSError:  # the client gave up
                            return
                    return
                if name in server.truncate:
                    server.truncate.discard(name)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture(autouse=True)
def fake_checksums(monkeypatch):
    """The fake checkpoints served here are not the published ones: drop the published checksums."""
    monkeypatch.setattr(dw, "SOURCES", {f: replace(s, sha256=None, md5_prefix=None) for f, s in dw.SOURCES.items()})


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _sums(dest: Path) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in (dest / "SHA256SUMS").read_text().splitlines()}


def test_download_all_then_verify(server, tmp_path):
    dest = tmp_path / "pre-trained_weights"
    for feature, name in NAMES.items():
        assert dw.fetch(feature, dest, server.url).startswith(f"{name}: downloaded")
        assert (dest / name).read_bytes() == server.files[name]
    assert sorted(p.name for p in dest.iterdir()) == sorted([*NAMES.values(), "SHA256SUMS"])  # no .part left
    assert _sums(dest) == {n: hashlib.sha256(b).hexdigest() for n, b in server.files.items()}
    n_requests = len(server.requests)
    for feature, name in NAMES.items():
        assert dw.fetch(feature, dest, server.url) == f"{name}: present, sha256 matches SHA256SUMS"
    assert len(server.requests) == n_requests  # verified locally, nothing downloaded again


def test_corrupted_file_is_detected_and_force_repairs(server, tmp_path):
    dw.fetch("sup_vitb16_imagenet21k", tmp_path, server.url)
    target = tmp_path / NAMES["sup_vitb16_imagenet21k"]
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(VQTError, match=r"does not match .*SHA256SUMS .*corrupted.*--force"):
        dw.fetch("sup_vitb16_imagenet21k", tmp_path, server.url)
    assert dw.fetch("sup_vitb16_imagenet21k", tmp_path, server.url, force=True).startswith(
        "imagenet21k_ViT-B_16.npz: downloaded")
    assert target.read_bytes() == server.files[NAMES["sup_vitb16_imagenet21k"]]


@pytest.mark.parametrize(("feature", "body", "reason"), [
    ("sup_vitb16_imagenet1k", HTML, "HTML page"),
    ("mae_vitb16", HTML, "HTML page"),
    ("sup_vitb16_imagenet21k", b"PK\x03\x04 not really a zip" * 10, "not a readable .npz"),
    ("mae_vitb16", b"just some text, not a torch file\n" * 10, "neither a zip nor a pickle"),
], ids=["html-npz", "html-pth", "broken-zip", "text-pth"])
def test_non_checkpoint_is_rejected(server, tmp_path, feature, body, reason):
    server.files[NAMES[feature]] = body
    with pytest.raises(VQTError, match=f"{reason}.*download {NAMES[feature]} manually from {server.url}"):
        dw.fetch(feature, tmp_path, server.url)
    assert list(tmp_path.iterdir()) == []  # neither the file, nor a .part, nor a checksum


def test_npz_without_vit_weights_is_rejected(server, tmp_path):
    buf = io.BytesIO()
    np.savez(buf, weights=np.zeros(3))
    server.files[NAMES["sup_vitb16_imagenet1k"]] = buf.getvalue()
    with pytest.raises(VQTError, match="no 'embedding/kernel'"):
        dw.fetch("sup_vitb16_imagenet1k", tmp_path, server.url)


def test_interrupted_download_resumes(server, tmp_path):
    name = NAMES["mae_vitb16"]
    server.truncate.add(name)
    with pytest.raises(VQTError, match="rerun to resume"):
        dw.fetch("mae_vitb16", tmp_path, server.url)
    part = tmp_path / f"{name}.part"
    half = part.stat().st_size
    assert 0 < half < len(server.files[name]) and not (tmp_path / name).exists()
    dw.fetch("mae_vitb16", tmp_path, server.url)
    assert server.requests[-1] == (name, f"bytes={half}-")  # only the rest was fetched
    assert (tmp_path / name).read_bytes() == server.files[name] and not part.exists()


def test_stalled_download_fails_fast_with_instructions(server, tmp_path, capsys):
    name = NAMES["mae_vitb16"]
    server.trickle.add(name)
    t0 = time.monotonic()
    argv = ["--dest", str(tmp_path), "--features", "mae_vitb16", "--mirror", server.url, "--stall-timeout", "1"]
    assert dw.main(argv) == 1
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert (err.startswith(f"error: mae_vitb16: download of {server.url}/{name} stalled after ")
            and "Traceback" not in err)
    assert f"rerun to resume, use --mirror, or download {name} manually from {server.url}/{name}" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / name).exists()


def test_known_sha256_is_enforced(server, tmp_path, monkeypatch):
    src = dw.SOURCES["mae_vitb16"]
    monkeypatch.setitem(dw.SOURCES, "mae_vitb16", dw.Source(src.url, src.page, "0" * 64))
    with pytest.raises(VQTError, match="the published one is 0000"):
        dw.fetch("mae_vitb16", tmp_path, server.url)
    good = hashlib.sha256(server.files[NAMES["mae_vitb16"]]).hexdigest()
    monkeypatch.setitem(dw.SOURCES, "mae_vitb16", dw.Source(src.url, src.page, good))
    assert "downloaded" in dw.fetch("mae_vitb16", tmp_path, server.url)


def test_manually_placed_file_is_checked_and_recorded(tmp_path):
    (tmp_path / NAMES["sup_vitb16_imagenet21k"]).write_bytes(_npz(3))
    assert dw.fetch("sup_vitb16_imagenet21k", tmp_path, "http://127.0.0.1:9") == (
        "imagenet21k_ViT-B_16.npz: present, sha256 recorded in SHA256SUMS")
    assert _sums(tmp_path) == {NAMES["sup_vitb16_imagenet21k"]: hashlib.sha256(_npz(3)).hexdigest()}
    (tmp_path / NAMES["sup_vitb16_imagenet1k"]).write_bytes(HTML)
    with pytest.raises(VQTError, match="HTML page.*--force"):
        dw.fetch("sup_vitb16_imagenet1k", tmp_path)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mirror_fails_fast_with_instructions(tmp_path):
    port = _closed_port()
    t0 = time.monotonic()
    with pytest.raises(VQTError) as info:
        dw.fetch("sup_vitb16_imagenet21k", tmp_path / "w", f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert msg.startswith(f"cannot reach 127.0.0.1:{port}") and "offline?" in msg
    assert f"download imagenet21k_ViT-B_16.npz manually from http://127.0.0.1:{port}/imagenet21k_ViT-B_16.npz" in msg
    with pytest.raises(VQTError, match="no download source for 'mae_vitl16'"):
        dw.fetch("mae_vitl16", tmp_path)


def test_cli(server, tmp_path, capsys):
    dest = tmp_path / "weights"
    script = [sys.executable, "scripts/download_weights.py", "--dest", str(dest)]
    assert dw.main(["--dest", str(dest), "--mirror", server.url]) == 0  # in-process: with the fake checksums
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines()] == [f"[ok] {n}" for n in NAMES.values()]
    assert len(_sums(dest)) == 3
    t0 = time.monotonic()
    unreachable = f"http://127.0.0.1:{_closed_port()}"
    bad = subprocess.run([*script, "--force", "--features", "mae_vitb16", "--mirror", unreachable],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1 and time.monotonic() - t0 < 10
    assert bad.stderr.startswith("error: mae_vitb16: cannot reach 127.0.0.1:") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    unknown = subprocess.run([*script, "--features", "sup_vitb8_imagenet21k"], cwd=REPO, capture_output=True,
                             text=True, timeout=60, check=False)
    assert unknown.returncode == 2 and "invalid choice: 'sup_vitb8_imagenet21k'" in unknown.stderr


def test_published_md5_prefix_is_checked(server, tmp_path, monkeypatch):
    name, src = NAMES["mae_vitb16"], dw.SOURCES["mae_vitb16"]
    md5 = hashlib.md5(server.files[name]).hexdigest()
    wrong = f"{(int(md5[:6], 16) + 1) % 2**24:06x}"
    monkeypatch.setitem(dw.SOURCES, "mae_vitb16", replace(src, md5_prefix=wrong))
    with pytest.raises(VQTError, match=f"md5 {md5}, the published one starts with {wrong}.*download {name} manually"):
        dw.fetch("mae_vitb16", tmp_path, server.url)
    assert list(tmp_path.iterdir()) == []  # the wrong download is not kept
    (tmp_path / name).write_bytes(server.files[name])  # placed by hand: checked as well
    with pytest.raises(VQTError, match=f"{name}: md5 {md5}, the published one starts with {wrong}; delete it"):
        dw.fetch("mae_vitb16", tmp_path, server.url)
    (tmp_path / name).unlink()
    monkeypatch.setitem(dw.SOURCES, "mae_vitb16", replace(src, md5_prefix=md5[:6]))
    assert dw.fetch("mae_vitb16", tmp_path, server.url).startswith(f"{name}: downloaded")
    assert dw.fetch("mae_vitb16", tmp_path, server.url) == f"{name}: present, sha256 matches SHA256SUMS"


def test_sources_are_upstream_with_vpt_md5_prefixes(monkeypatch):
    monkeypatch.undo()  # the real SOURCES, not the fake_checksums ones
    src = dw.SOURCES
    assert src["sup_vitb16_imagenet21k"].md5_prefix == "d9715d" and src["mae_vitb16"].md5_prefix == "8cad7c"
    assert src["mocov3_vitb"].url == "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/linear-vit-b-300ep.pth.tar"
    assert src["mocov3_vitb"].md5_prefix == "8f39ce"
    for feature, name in (("sup_vitl16_imagenet21k", "ViT-L_16"), ("sup_vith14_imagenet21k", "ViT-H_14")):
        assert src[feature].url == f"https://storage.googleapis.com/vit_models/imagenet21k/{name}.npz"
    assert src["sup_vitb16_imagenet1k"].md5_prefix is None and all(s.sha256 is None for s in src.values())
    assert dw.parse_args([]).features == ["sup_vitb16_imagenet1k", "sup_vitb16_imagenet21k", "mae_vitb16"]
