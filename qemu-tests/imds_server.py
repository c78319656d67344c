"""A stand-in for EC2's instance metadata service, IMDSv2 only (as with `HttpTokens=required`),
on the host's loopback, for the EC2 look-alike cases.

The guest reaches it at 169.254.169.254:80 through QEMU user networking's guestfwd, which only
accepts a guest address inside the user network: hence `net=169.254.0.0/16` (the guest gets
169.254.2.15, the host side is 169.254.2.2), and `cmd:` starts one `socat` per connection to
this server's port. See `Imds.nic()`.

What it does as EC2 does: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`
(1-21600) issues a token (refused with 400 when the TTL is missing or out of range, and with
403 when the request carries `X-Forwarded-For`); every `GET` must carry a token it issued in
`X-aws-ec2-metadata-token`, else 401 (an IMDSv1 request is refused); known paths answer 200,
others 404. Every request is recorded, so a case can check what the guest asked and how.
"""

import http.client
import http.server
import secrets
import threading


class Imds:
    def __init__(self, answers):
        """answers: {path: bytes or str}; a path not in it answers 404."""
        self.answers = {k: v.encode() if isinstance(v, str) else v for k, v in answers.items()}
        self.tokens = set()
        self.log = []  # (method, path, status, token_ok)
        self.lock = threading.Lock()
        imds = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status, body=b""):
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def record(self, status, token_ok):
                with imds.lock:
                    imds.log.append((self.command, self.path, status, token_ok))

            def do_PUT(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(min(length, 4096))
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if self.path != "/latest/api/token":
                    status, body = 404, b""
                elif self.headers.get("X-Forwarded-For"):
                    status, body = 403, b""
                elif not (ttl.isdigit() and 1 <= int(ttl) <= 21600):
                    status, body = 400, b""
                else:
                    token = secrets.token_urlsafe(42)
                    with imds.lock:
                        imds.tokens.add(token)
                    status, body = 200, token.encode()
                self.record(status, None)
                self.reply(status, body)

            def do_GET(self):
                with imds.lock:
                    token_ok = self.headers.get("X-aws-ec2-metadata-token") in imds.tokens
                if not token_ok:
                    status, body = 401, b""
                elif self.path in imds.answers:
                    status, body = 200, imds.answers[self.path]
                else:
                    status, body = 404, b""
                self.record(status, token_ok)
                self.reply(status, body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def nic(self):
        """The `-nic` option that puts this server at 169.254.169.254:80 for the guest."""
        return (f"user,model=virtio-net-pci,net=169.254.0.0/16,"
                f"guestfwd=tcp:169.254.169.254:80-cmd:socat - TCP:127.0.0.1:{self.port}")

    def requests(self):
        with self.lock:
            return list(self.log)

    def get(self, path, token=None):
        """A GET from the host, with `token` or none (IMDSv1): (status, body)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body

    def token(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        r = c.getresponse()
        body = r.read()
        c.close()
        assert r.status == 200, r.status
        return body.decode()
