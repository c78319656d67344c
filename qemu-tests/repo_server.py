#!/usr/bin/env python3
"""Serve a directory (a TUF repository) over HTTP/1.1 or HTTPS to a QEMU guest, with faults on
demand.

The guest sees the host's loopback as 10.0.2.2, so the default bind is 127.0.0.1 on a free
port; once bound the server prints `listening PORT` on stdout for the harness to read.

    repo_server.py DIR [--port 0] [--bind 127.0.0.1] [--drop-after BYTES] [--drop-times N]
                       [--rate BYTES_PER_SEC] [--tls-cert PEM --tls-key PEM]

With `--tls-cert` and `--tls-key` it speaks HTTPS with that certificate (the handshake runs in
each connection's thread, so a client that refuses the certificate holds up no one else).

GET and HEAD of files under DIR (nothing outside it: no `..`, no links out), 404 otherwise.
Answers carry Content-Length, ETag and Last-Modified; a single `Range: bytes=N-` or `N-M` gets
206 with Content-Range (416 when it starts past the end), unless an `If-Range` does not match
the file's ETag or Last-Modified, which gets the whole file with 200.

Faults: with `--drop-after B`, the next N (`--drop-times`, default 1) responses whose body would
be longer than B bytes are cut after B bytes by closing the socket, as a network that drops
mid-transfer. `--rate` throttles every body. At run time:

    POST /_control/drop?after=B&times=N    re-arm the drop fault (e.g. once metadata is fetched)
    GET  /_control/stats                   {"requests": n, "range_requests": n, "dropped": n}

Control requests do not count in the stats. Run `repo_server.py --self-check` for a host-only
check of ranges, If-Range, the drop fault and TLS (which needs the openssl CLI).
"""

import argparse
import email.utils
import hashlib
import http.client
import http.server
import json
import os
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse


class State:
    """What the handlers share: the drop fault and the counters."""

    def __init__(self, root, drop_after, drop_times, rate):
        self.root = os.path.realpath(root)
        self.rate = rate
        self.lock = threading.Lock()
        self.drop_after = drop_after
        self.drops_left = drop_times if drop_after is not None else 0
        self.stats = {"requests": 0, "range_requests": 0, "dropped": 0}

    def arm(self, after, times):
        with self.lock:
            self.drop_after, self.drops_left = after, times

    def take_drop(self, body_length):
        """The byte count to cut this body at, or None; a cut uses up one of the armed drops."""
        with self.lock:
            if self.drops_left > 0 and body_length > self.drop_after:
                self.drops_left -= 1
                self.stats["dropped"] += 1
                return self.drop_after
            return None

    def count(self, ranged):
        with self.lock:
            self.stats["requests"] += 1
            self.stats["range_requests"] += int(ranged)


def parse_range(value, size):
    """A single `bytes=N-` or `bytes=N-M` → (start, end inclusive); None if not of that form
    (the header is then ignored); "unsatisfiable" when it starts past the end."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d+)\s*-\s*(\d*)\s*", value)
    if not m:
        return None
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if m.group(2) and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "berth-repo-server"
    state = None  # set on the subclass made in serve()

    def log_message(self, fmt, *args):
        sys.stderr.write("repo_server: %s %s\n" % (self.address_string(), fmt % args))

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(30)
            self.request.do_handshake()
        super().setup()

    def do_GET(self):
        self.answer(send_body=True)

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if url.path != "/_control/drop":
            return self.plain(404, "not found\n")
        query = urllib.parse.parse_qs(url.query)
        try:
            after = int(query["after"][0])
            times = int(query.get("times", ["1"])[0])
        except (KeyError, ValueError):
            return self.plain(400, "usage: POST /_control/drop?after=BYTES&times=N\n")
        self.state.arm(after, times)
        self.plain(200, "armed: drop after %d bytes, %d times\n" % (after, times))

    def plain(self, status, text, content_type="text/plain"):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def resolve(self, url_path):
        """The file under the root that `url_path` names, or None."""
        rel = urllib.parse.unquote(url_path).lstrip("/")
        path = os.path.realpath(os.path.join(self.state.root, rel))
        if os.path.commonpath([path, self.state.root]) != self.state.root or not os.path.isfile(path):
            return None
        return path

    def answer(self, send_body):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/_control/stats":
            with self.state.lock:
                stats = dict(self.state.stats)
            return self.plain(200, json.dumps(stats) + "\n", "application/json")

        range_header = self.headers.get("Range")
        self.state.count(range_header is not None)
        path = self.resolve(url.path)
        if path is None:
            return self.plain(404, "not found\n")

        st = os.stat(path)
        size = st.st_size
        etag = '"%x-%x"' % (st.st_mtime_ns, size)
        modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range.strip() not in (etag, modified):
            range_header = None

        status, start, end = 200, 0, size - 1
        if range_header is not None:
            r = parse_range(range_header, size)
            if r == "unsatisfiable":
                self.send_response(416)
                self.send_header("Content-Range", "bytes */%d" % size)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if r is not None:
                status, (start, end) = 206, r

        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", modified)
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
        self.end_headers()
        if not send_body:
            return

        cut = self.state.take_drop(length)
        to_send = length if cut is None else cut
        with open(path, "rb") as f:
            f.seek(start)
            self.send_throttled(f, to_send)
        if cut is not None:
            self.log_message("dropped %s after %d of %d bytes", url.path, cut, length)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def send_throttled(self, f, count):
        began = time.monotonic()
        sent = 0
        while sent < count:
            data = f.read(min(64 * 1024, count - sent))
            if not data:
                break
            self.wfile.write(data)
            sent += len(data)
            if self.state.rate:
                ahead = sent / self.state.rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that refuses the certificate (as the bad-certificate tests want) is no news.
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            sys.stderr.write("repo_server: %s: %s\n" % (client_address[0], sys.exc_info()[1]))
            return
        super().handle_error(request, client_address)


def serve(root, port=0, bind="127.0.0.1", drop_after=None, drop_times=1, rate=None, tls=None):
    """A started server (in a thread); `.server_address[1]` is its port. `tls`: (cert, key)
    PEM files to serve HTTPS with."""
    state = State(root, drop_after, drop_times, rate)
    handler = type("BoundHandler", (Handler,), {"state": state})
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    server_class = type("BoundServer", (Server,), {"address_family": family})
    server = server_class((bind, port), handler)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, name="repo-server", daemon=True).start()
    return server


# ---------------------------------------------------------------- self-check

def _get(port, path, headers=None, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    try:
        body = resp.read()
    except http.client.IncompleteRead as e:
        body = e.partial
    conn.close()
    return resp.status, dict(resp.getheaders()), body


def self_check():
    with tempfile.TemporaryDirectory() as root:
        data = hashlib.sha256(b"seed").digest() * 4096  # 128 KiB
        with open(os.path.join(root, "target.img"), "wb") as f:
            f.write(data)
        server = serve(root)
        port = server.server_address[1]
        status, headers, body = _get(port, "/target.img")
        assert (status, body) == (200, data), status
        etag = headers["ETag"]
        assert _get(port, "/target.img", {"Range": "bytes=100-"})[::2] == (206, data[100:])
        status, headers, body = _get(port, "/target.img", {"Range": "bytes=10-19"})
        assert (status, headers["Content-Range"], body) == (206, "bytes 10-19/%d" % len(data), data[10:20])
        assert _get(port, "/target.img", {"Range": "bytes=999999-"})[0] == 416
        assert _get(port, "/target.img", {"Range": "bytes=5-", "If-Range": etag})[::2] == (206, data[5:])
        assert _get(port, "/target.img", {"Range": "bytes=5-", "If-Range": '"old"'})[::2] == (200, data)
        assert _get(port, "/target.img", method="HEAD")[::2] == (200, b"")
        assert _get(port, "/../etc/passwd")[0] == 404
        assert _get(port, "/missing")[0] == 404
        assert _get(port, "/_control/drop?after=1000&times=1", method="POST")[0] == 200
        assert _get(port, "/target.img")[::2] == (200, data[:1000])
        assert _get(port, "/target.img")[::2] == (200, data)
        stats = json.loads(_get(port, "/_control/stats")[2])
        assert stats == {"requests": 11, "range_requests": 5, "dropped": 1}, stats
        server.shutdown()

        from testpki import make_pki
        pki_dir = os.path.join(root, "pki")
        os.makedirs(pki_dir)
        pki = make_pki(pki_dir)
        tls = serve(root, tls=pki["good"])
        ctx = ssl.create_default_context(cafile=pki["ca"])
        conn = http.client.HTTPSConnection("127.0.0.1", tls.server_address[1], timeout=10, context=ctx)
        conn.request("GET", "/target.img", headers={"Range": "bytes=7-"})
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (206, data[7:]), resp.status
        conn.close()
        refused = serve(root, tls=pki["wrong-name"])
        conn = http.client.HTTPSConnection("127.0.0.1", refused.server_address[1], timeout=10, context=ctx)
        try:
            conn.request("GET", "/target.img")
            raise AssertionError("a certificate for repo.example was accepted for 127.0.0.1")
        except ssl.SSLCertVerificationError:
            pass
        conn.close()
        # The server goes on after a refused handshake.
        conn = http.client.HTTPSConnection("127.0.0.1", tls.server_address[1], timeout=10, context=ctx)
        conn.request("GET", "/missing")
        assert conn.getresponse().status == 404
        tls.shutdown()
        refused.shutdown()
    print("repo_server self-check: ok")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--drop-after", type=int, metavar="BYTES")
    p.add_argument("--drop-times", type=int, default=1, metavar="N")
    p.add_argument("--rate", type=int, metavar="BYTES_PER_SEC")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--self-check", action="store_true", help="check the server on the host and exit")
    args = p.parse_args()
    if args.self_check:
        return self_check()
    if not args.dir or not os.path.isdir(args.dir):
        p.error("DIR must be a directory")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    server = serve(args.dir, args.port, args.bind, args.drop_after, args.drop_times, args.rate, tls)
    print("listening %d" % server.server_address[1], flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
