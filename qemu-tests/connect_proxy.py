"""An HTTP CONNECT proxy of the tests, on the host's loopback (the guest reaches it at 10.0.2.2).

It opens a tunnel for each `CONNECT HOST:PORT` (10.0.2.2, the guest's name for the host, is
reached at 127.0.0.1) or, with `refuse` set, answers that status line; every request line it
was sent is kept in `log`, so a test can tell that a client went through it."""

import socket
import socketserver
import threading


class ConnectProxy:
    def __init__(self, refuse=None):
        self.log = []
        self.refuse = refuse
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(60)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 8192:
                    got = self.request.recv(1024)
                    if not got:
                        return
                    head += got
                line = head.split(b"\r\n", 1)[0].decode(errors="replace")
                proxy.log.append(line)
                parts = line.split(" ")
                if proxy.refuse or len(parts) != 3 or parts[0] != "CONNECT":
                    status = proxy.refuse or "405 Method Not Allowed"
                    self.request.sendall(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
                    return
                host, port = parts[1].rsplit(":", 1)
                host = "127.0.0.1" if host == "10.0.2.2" else host
                try:
                    origin = socket.create_connection((host, int(port)), timeout=10)
                except OSError:
                    self.request.sendall(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                    return
                origin.settimeout(60)
                self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                rest = head.split(b"\r\n\r\n", 1)[1]
                if rest:
                    origin.sendall(rest)

                def pump(src, dst):
                    try:
                        while True:
                            data = src.recv(65536)
                            if not data:
                                break
                            dst.sendall(data)
                    except OSError:
                        pass
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass

                up = threading.Thread(target=pump, args=(self.request, origin), daemon=True)
                up.start()
                pump(origin, self.request)
                up.join(60)
                origin.close()

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self):
        """The proxy as the guest names it."""
        return f"http://10.0.2.2:{self.port}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
