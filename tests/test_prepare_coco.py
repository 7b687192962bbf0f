"""prepare_coco.py: the resumable, verified COCO download, against a local HTTP server."""

import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tools import prepare_coco
from tools.prepare_coco import download_coco

# -----------------------------------------------------------------------------
# download

class Server:
    """Serves `files` on 127.0.0.1 with Range support; paths in `cut` are sent only half-way the
    first time (`always_cut`: every time), then the connection drops."""

    def __init__(self, files, cut=(), always_cut=False):
        self.files, self.cut, self.always_cut, self.requests = files, set(cut), always_cut, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.files[self.path])))
                self.end_headers()

            def do_GET(self):
                body, byte_range = server.files[self.path], self.headers.get("Range")
                server.requests.append((self.path, byte_range))
                start = (int(byte_range.removeprefix("bytes=").removesuffix("-")) if byte_range
                         else 0)
                self.send_response(206 if byte_range else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path in server.cut:
                    if not server.always_cut:
                        server.cut.discard(self.path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def tiny_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("val2017/000000000001.jpg", np.random.default_rng(0).bytes(50_000))
        z.writestr("annotations/captions_val2017.json", '{"images": [], "annotations": []}')
    return buf.getvalue()


def test_download_resumes_after_interruption(tmp_path):
    body = tiny_zip()
    server = Server({"/zips/val2017.zip": body}, cut=["/zips/val2017.zip"])
    files = {"val2017.zip": ("zips/val2017.zip", "md5:" + hashlib.md5(body).hexdigest())}
    try:
        download_coco(tmp_path, files=files, base_url=server.url)
        assert server.requests == [("/zips/val2017.zip", None),
                                   ("/zips/val2017.zip", f"bytes={len(body) // 2}-")]
        assert ((tmp_path / "val2017.zip").read_bytes() == body
                and not (tmp_path / "val2017.zip.part").exists())
        assert ((tmp_path / "val2017" / "000000000001.jpg").read_bytes()
                == np.random.default_rng(0).bytes(50_000))
        assert (tmp_path / "annotations" / "captions_val2017.json").exists()
        download_coco(tmp_path, files=files, base_url=server.url)
        # a good file is never fetched again
        assert len(server.requests) == 2
    finally:
        server.close()


def test_download_gives_up_keeping_the_partial_file(tmp_path):
    body = tiny_zip()
    server = Server({"/a.zip": body}, cut=["/a.zip"], always_cut=True)
    try:
        with pytest.raises(RuntimeError, match="incomplete.*run again to resume"):
            download_coco(tmp_path, files={"a.zip": ("a.zip", None)}, base_url=server.url,
                          retries=3)
        assert len(server.requests) == 3
        part = (tmp_path / "a.zip.part").read_bytes()
        assert len(body) // 2 < len(part) < len(body) and body.startswith(part)
    finally:
        server.close()


def test_download_checksum_mismatch_keeps_file(tmp_path):
    body = tiny_zip()
    server = Server({"/zips/val2017.zip": body})
    try:
        with pytest.raises(RuntimeError, match="sha256 is .*expected 0000.*val2017.zip.bad"):
            download_coco(tmp_path,
                          files={"val2017.zip": ("zips/val2017.zip", "sha256:" + "0" * 64)},
                          base_url=server.url)
        assert (tmp_path / "val2017.zip.bad").read_bytes() == body
        assert not (tmp_path / "val2017.zip").exists() and not (tmp_path / "val2017").exists()
    finally:
        server.close()


def test_never_downloads_into_a_folder_of_other_data(shapes_root, tmp_path):
    before = sorted(p.name for p in shapes_root.iterdir())
    with pytest.raises(SystemExit) as e:
        prepare_coco.main([str(shapes_root)])
    assert str(e.value) == (f"error: the COCO download into {shapes_root} stopped: {shapes_root} "
                            "holds shapes.json, zeroshot, which a COCO download does not write: "
                            "COCO is "
                            "downloaded only into a new or empty folder, or one of its own "
                            "(nothing was written)")
    assert sorted(p.name for p in shapes_root.iterdir()) == before
