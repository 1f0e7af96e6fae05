# A client for bench/syscalls/run.sh: N connections, each doing R 64-byte round trips, in
# threads; prints how many messages it sent.
import socket, sys, threading
host, port, n, r = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
msg = b"x" * 64
def run():
    s = socket.create_connection((host, port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(r):
        s.sendall(msg); got = 0
        while got < 64: got += len(s.recv(64 - got))
    s.close()
ts = [threading.Thread(target=run) for _ in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
print(n * r)
