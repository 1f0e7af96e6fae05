#!/usr/bin/env python3
"""Echo server on Python's socketserver.ThreadingTCPServer, a contender in the benchmark.

    python3 python_echo.py [--addr 127.0.0.1:9000] [--auth-key KEY]

With --auth-key, each connection first runs the tutorial's handshake: the server sends
os.urandom(32) and the client answers with hmac.new(key, challenge, 'md5').hexdigest(); no
acknowledgement. Unlike the tutorial, the reply is read to its exact length (recv(1024) could
swallow the echo bytes that follow it) and compared with hmac.compare_digest.

Like the other contenders, each accepted connection gets TCP_NODELAY, and the echo reads with
sock.recv(16384), which allocates its 16 KiB result without zeroing it and shrinks it to the
bytes received: Python's ordinary way, and the same buffer strategy as the others.
"""

import argparse
import hmac
import os
import socket
import socketserver
import sys


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    # Python < 3.14 listens with a backlog of 5, which drops SYNs when clients connect in a burst
    # (1 s retransmits would dominate the figures); 128 is what std's TcpListener uses.
    request_queue_size = 128


class Echo(socketserver.BaseRequestHandler):
    key = None

    def setup(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self):
        sock = self.request
        if self.key is not None:
            challenge = os.urandom(32)
            sock.sendall(challenge)
            want = hmac.new(self.key, challenge, "md5").hexdigest().encode()
            got = b""
            while len(got) < len(want):
                chunk = sock.recv(len(want) - len(got))
                if not chunk:
                    return
                got += chunk
            if not hmac.compare_digest(got, want):
                return
        while True:
            data = sock.recv(16384)
            if not data:
                return
            sock.sendall(data)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:9000")
    p.add_argument("--auth-key")
    a = p.parse_args()
    host, port = a.addr.rsplit(":", 1)
    if a.auth_key:
        Echo.key = a.auth_key.encode()
    with Server((host, int(port)), Echo) as srv:
        print("python_echo on %s:%d" % srv.server_address[:2], file=sys.stderr, flush=True)
        srv.serve_forever()


if __name__ == "__main__":
    main()
