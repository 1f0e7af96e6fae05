# Clients that send and never read, against a running echo server, then an honest client's
# round trips beside them: prints the median and worst, or that it got no answer in 10 s.
#   python3 bench/stall/nonreaders.py HOST PORT NONREADERS
import socket, sys, time
host, port, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
chunk = b"x" * 16384
stalled = []
for _ in range(k):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.setblocking(False)
    stalled.append(s)
last = {s: time.time() for s in stalled}
t0 = time.time()
while time.time() - t0 < 10:
    active = [s for s in stalled if time.time() - last[s] < 0.2]
    if not active:
        break
    for s in active:
        try:
            while True:
                s.send(chunk)
                last[s] = time.time()
        except BlockingIOError:
            pass
    time.sleep(0.005)
h = socket.create_connection((host, port))
h.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
h.settimeout(10)
times = []
try:
    for i in range(50):
        t = time.time()
        h.sendall(b"honest\n")
        got = b""
        while len(got) < 7:
            got += h.recv(7 - len(got))
        times.append(time.time() - t)
except socket.timeout:
    print(f"{k} non-readers: the honest client got no answer within 10 s")
    sys.exit(0)
times.sort()
print(f"{k} non-readers: honest round trips median {times[len(times)//2]*1000:.2f} ms, "
      f"worst {times[-1]*1000:.2f} ms")
