#!/usr/bin/env python3
"""Holds N idle HTTP connections to HOST:PORT open (for benches/mesh-idle.sh).

Each connection is opened, sends one keep-alive request and reads its answer (so it is
carried end to end, through the proxy to a task), then stays silent. Opens in batches so
that no listen queue overflows. Prints "ready N" once all are idle, then holds them until
it is killed. One process holds at most a few thousand: the caller spreads
larger counts over several (the fd limit here is 20 000 per process).
Usage: idle-hold.py HOST PORT N
"""
import selectors
import signal
import socket
import sys
import time

BATCH = 256
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def open_batch(host, port, n, deadline):
    sel = selectors.DefaultSelector()
    pending = {}
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        sel.register(s, selectors.EVENT_WRITE)
        pending[s] = b""
    done = []
    while pending and time.monotonic() < deadline:
        for key, ev in sel.select(timeout=1.0):
            s = key.fileobj
            if ev & selectors.EVENT_WRITE:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    raise SystemExit("connect to %s:%d failed" % (host, port))
                s.send(REQUEST)
                sel.modify(s, selectors.EVENT_READ)
            else:
                data = s.recv(4096)
                if not data:
                    raise SystemExit("connection closed while opening")
                pending[s] += data
                # nginx's answer to GET / here is a few hundred bytes: headers and "ok\n".
                if pending[s].endswith(b"ok\n"):
                    sel.unregister(s)
                    del pending[s]
                    done.append(s)
    if pending:
        raise SystemExit("%d connections did not answer in time" % len(pending))
    sel.close()
    return done


def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    deadline = time.monotonic() + 60
    held = []
    while len(held) < n:
        held += open_batch(host, port, min(BATCH, n - len(held)), deadline)
    print("ready %d" % len(held), flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
