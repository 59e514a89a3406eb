#!/usr/bin/env python3
"""UDP bulk the way QUIC stacks send it: super-datagrams with UDP_SEGMENT (46 datagrams of
1400 bytes per send), received with UDP_GRO. Used by the benchmark scripts.
  udp-bulk.py recv PORT SECONDS   -> prints received Gbit/s (first to last byte)
  udp-bulk.py send HOST PORT SECONDS
"""
import socket, sys, time

SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
SIZE, PER = 1400, 46

if sys.argv[1] == "send":
    host, port, secs = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(SOL_UDP, UDP_SEGMENT, SIZE)
    buf, end = bytes(SIZE * PER), time.time() + secs
    while time.time() < end:
        for _ in range(64):
            try:
                s.sendto(buf, (host, port))
            except OSError:  # ENOBUFS under load: the datagram is dropped, as on a NIC
                pass
else:
    port, secs = int(sys.argv[2]), float(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    s.setsockopt(SOL_UDP, UDP_GRO, 1)
    s.bind(("0.0.0.0", port))
    s.settimeout(2)
    buf, got, first, last = bytearray(65535), 0, None, None
    end = time.time() + secs + 5
    try:
        while time.time() < end:
            n = s.recv_into(buf)
            last = time.time()
            first = first or last
            got += n
    except socket.timeout:
        pass
    span = (last - first) if first and last and last > first else 1
    print("%.2f" % (got * 8 / span / 1e9))
