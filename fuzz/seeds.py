#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/TARGET/): a few small, well-formed
inputs each, so a short run starts from frames and messages that reach deep paths (a TCP
SYN to a VIP, a backend's reply, a sealed datagram, a DNS query, an API body). Run it
again after changing a target's input layout: python3 fuzz/seeds.py"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def mac(last):
    """The MAC overlay gives 10.0.0.LAST: 02:42 then the address."""
    return bytes([2, 0x42, 10, 0, 0, last])


def eth(dst, src, ethertype, payload):
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src, dst, proto, payload):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
                    bytes(src), bytes(dst))
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def l4_csum(src, dst, proto, seg):
    pseudo = bytes(src) + bytes(dst) + struct.pack("!BBH", 0, proto, len(seg))
    return csum(pseudo + seg)


def tcp(src, dst, sport, dport, flags, payload=b"", seq=1000, ack=0):
    h = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    seg = h + payload
    c = l4_csum(src, dst, 6, seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp(src, dst, sport, dport, payload):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = l4_csum(src, dst, 17, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def icmp_echo(payload=b"ping"):
    h = struct.pack("!BBHHH", 8, 0, 0, 7, 1) + payload
    return h[:2] + struct.pack("!H", csum(h)) + h[4:]


def ip(last):
    return [10, 0, 0, last]


def arp_request(sender_last, target_last):
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac(sender_last) + bytes(ip(sender_last)) \
        + b"\0" * 6 + bytes(ip(target_last))
    return eth(b"\xff" * 6, mac(sender_last), 0x0806, body)


def tcp_frame(s, d, sport, dport, flags, dst_mac=None, payload=b""):
    return eth(dst_mac or mac(d), mac(s), 0x0800,
               ipv4(ip(s), ip(d), 6, tcp(ip(s), ip(d), sport, dport, flags, payload)))


def udp_frame(s, d, sport, dport, payload, dst_mac=None):
    return eth(dst_mac or mac(d), mac(s), 0x0800,
               ipv4(ip(s), ip(d), 17, udp(ip(s), ip(d), sport, dport, payload)))


def dns_query(name, qtype, edns=False, ident=0x1234):
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"
    arcount = 1 if edns else 0
    m = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, arcount) + q + struct.pack("!HH", qtype, 1)
    if edns:
        m += b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0)
    return m


def vxlan(vni, frame):
    return struct.pack("!BBBB", 0x08, 0, 0, 0) + struct.pack("!I", vni << 8) + frame


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01


def record(sel, data):
    return bytes([sel]) + struct.pack("!H", len(data)) + data


def main():
    # vxlan: a kernel VXLAN header and an inner frame.
    write("vxlan", "kernel", vxlan(4097, arp_request(3, 2)))
    write("vxlan", "short", vxlan(4097, b"")[:8])

    # esp (nothing may open: the key is the harness's): header-shaped datagrams.
    hdr = struct.pack("!IIII", 0x8000_0000 | (2 << 24) | 4097, 1, 5 << 8, 1)
    write("esp", "header", hdr + bytes(range(48)))
    write("esp", "iv-mismatch", hdr[:12] + struct.pack("!I", 2) + bytes(40))

    # control: postcard bodies are found by the fuzzer from these.
    write("control", "empty-frame", struct.pack("!I", 0))
    write("control", "small", bytes([0, 0, 0, 6, 1, 2, 3, 4, 5, 6]))

    # offload: virtio-net header (flags, gso type, hdr_len, gso_size, csum start/offset).
    data = tcp_frame(2, 3, 40000, 80, ACK | PSH, payload=b"x" * 3000)
    gso = struct.pack("<BBHHHH", 1, 1, 54, 1448, 34, 16)
    write("offload", "tso", gso + data)
    write("offload", "plain", struct.pack("<BBHHHH", 0, 0, 0, 0, 0, 0) + tcp_frame(2, 3, 1, 2, SYN))
    udp_big = udp_frame(2, 3, 5000, 5001, b"u" * 2000)
    write("offload", "uso", struct.pack("<BBHHHH", 1, 5, 42, 1400, 34, 6) + udp_big)

    # switch: selector (port 1 = 10.0.0.2), then the frame.
    write("switch", "arp", bytes([1]) + arp_request(2, 3))
    write("switch", "ping-gateway", bytes([1]) + eth(mac(1), mac(2), 0x0800, ipv4(ip(2), ip(1), 1, icmp_echo())))
    write("switch", "to-remote", bytes([1]) + udp_frame(2, 9, 1000, 2000, b"hello"))

    # switch_full: shape (all four backends, 4097 encrypted, DNS), then records.
    shape = 0x0F | 0x10 | 0x20
    vip_mac = mac(2)
    syn = tcp_frame(9, 2, 40000, 80, SYN, dst_mac=vip_mac)
    write("switch_full", "vip-syn-and-replies", bytes([shape])
          + record(0 | (1 << 2), syn)                                              # client SYN (port 1)
          + record(0 | (2 << 2), tcp_frame(3, 9, 80, 40000, SYN | ACK))            # local backend's reply
          + record(2, tcp_frame(4, 9, 80, 40000, SYN | ACK))                       # remote backend, sealed
          + record(0 | (1 << 2), tcp_frame(9, 2, 40000, 80, ACK, dst_mac=vip_mac))
          + record(0x40 | (1 << 2), tcp_frame(9, 2, 40000, 80, FIN | ACK, dst_mac=vip_mac)))
    write("switch_full", "udp-vip-dns-ping", bytes([shape | 0x40])
          + record(1 << 2, udp_frame(9, 2, 5353, 53, b"q", dst_mac=vip_mac))
          + record(1 << 2, udp_frame(9, 1, 5353, 53, dns_query("whoami", 1), dst_mac=mac(1)))
          + record(1 << 2, eth(mac(1), mac(9), 0x0800, ipv4(ip(9), ip(1), 1, icmp_echo())))
          + record(1 << 2, eth(vip_mac, mac(9), 0x0800, ipv4(ip(9), ip(2), 1, icmp_echo())))
          + record(0x80 | (1 << 2), udp_frame(9, 2, 5353, 53, b"again", dst_mac=vip_mac)))
    write("switch_full", "encap-and-arp", bytes([0x10 | 0x05])
          + record(1 << 2, udp_frame(9, 4, 1000, 2000, b"to the peer"))
          + record(4 << 2, udp_frame(9, 4, 1000, 2000, b"sealed network"))
          + record(1 << 2, arp_request(9, 2))
          + record(1 | (0 << 2), arp_request(4, 9))
          + record(2 | (4 << 2), udp_frame(4, 9, 2000, 1000, b"replayed"))
          + record(3, struct.pack("!IIII", 0x8000_0000 | (3 << 24) | 4097, 1, 77, 1) + bytes(40)))

    # dns: queries as a task's resolver sends them.
    write("dns", "a", dns_query("whoami", 1))
    write("dns", "ptr", dns_query("3.0.0.10.in-addr.arpa", 12))
    write("dns", "aaaa-edns", dns_query("tasks.web", 28, edns=True))
    write("dns", "garbage-header", struct.pack("!HHHHHH", 1, 0x0100, 5, 0, 0, 0) + b"\xff" * 20)

    # api: request bodies.
    bodies = {
        "network-create": {"name": "front", "driver": "overlay", "subnet": "10.0.9.0/24",
                           "options": {"encrypted": ""}, "ingress": False},
        "service-create": {"name": "web", "networks": ["front", {"Target": "back", "Aliases": ["db"]}],
                           "replicas": 3, "command": ["sleep", "1"], "env": ["A=1"],
                           "endpoint_mode": "vip", "lb_idle_timeout": 60,
                           "ports": [{"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080,
                                      "PublishMode": "ingress"}],
                           "stop_grace_period_s": 10},
        "service-update": {"publish_add": [{"TargetPort": 53, "Protocol": "udp"}],
                           "publish_rm": ["8080/tcp", "53"]},
        "endpoint-create": {"container": "c1", "ifname": "eth1", "netns": "/run/netns/x",
                            "network": "front", "runtime": "cni"},
        "node-update": {"availability": "drain"},
        "vtep-add": {"address": "198.18.0.9", "mac": "02:42:0a:00:09:09", "ip": "10.0.9.9"},
        "service-scale": {"replicas": 5},
    }
    for name, body in bodies.items():
        write("api", name, json.dumps(body).encode())
    write("api", "publish-long", b"published=8080,target=80,protocol=udp,mode=host,proxy=v2")

    # docker_plugin: what Docker 20.10 POSTs for `docker network create -d overlayd
    # --ipam-driver overlayd [--subnet S] [-o encrypted] NAME` and `docker run --network NAME`.
    nid = "3f1c2a9e5b7d4c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a"
    eid = "9b8a7c6d5e4f30211a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7089"
    docker = {
        "request-pool": {"AddressSpace": "overlayd", "Pool": "10.0.63.0/24", "SubPool": "",
                         "Options": {}, "V6": False},
        "request-pool-auto": {"AddressSpace": "overlayd", "Pool": "", "SubPool": "",
                              "Options": {}, "V6": False},
        "request-pool-v6": {"AddressSpace": "overlayd", "Pool": "", "SubPool": "",
                            "Options": {}, "V6": True},
        "request-address-gateway": {"PoolID": "auto:10.0.1.0/24", "Address": "",
                                    "Options": {"RequestAddressType": "com.docker.network.gateway"}},
        "request-address": {"PoolID": "10.0.63.0/24", "Address": "", "Options": {}},
        "request-address-ip": {"PoolID": "10.0.63.0/24", "Address": "10.0.63.9", "Options": {}},
        "create-network": {"NetworkID": nid,
                           "Options": {"com.docker.network.enable_ipv6": False,
                                       "com.docker.network.generic": {"encrypted": "",
                                                                      "com.docker.network.driver.mtu": "1400"}},
                           "IPv4Data": [{"AddressSpace": "overlayd", "Gateway": "10.0.64.1/24",
                                         "Pool": "10.0.64.0/24"}],
                           "IPv6Data": []},
        "create-endpoint": {"NetworkID": nid, "EndpointID": eid,
                            "Interface": {"Address": "10.0.63.2/24", "AddressIPv6": "", "MacAddress": ""},
                            "Options": {"com.docker.network.endpoint.exposedports": [],
                                        "com.docker.network.portmap": []}},
        "join": {"NetworkID": nid, "EndpointID": eid,
                 "SandboxKey": "/var/run/docker/netns/1f2e3d4c5b6a", "Options": {}},
        "delete-endpoint": {"NetworkID": nid, "EndpointID": eid},
        "delete-network": {"NetworkID": nid},
    }
    for name, body in docker.items():
        write("docker_plugin", name, json.dumps(body).encode())
    write("docker_plugin", "empty-body", b"")

    # cni: CNI_COMMAND, NUL, then the configuration a runtime gives on stdin (containerd adds
    # runtimeConfig and args; cnitool passes the conflist entry with name and cniVersion).
    conf = {"cniVersion": "1.0.0", "name": "appnet", "type": "overlay-cni",
            "socket": "/run/overlay/n1.sock"}
    write("cni", "add", b"ADD\0" + json.dumps(conf).encode())
    write("cni", "del-0.4", b"DEL\0" + json.dumps(dict(conf, cniVersion="0.4.0",
                                                        network="front")).encode())
    write("cni", "check-containerd", b"CHECK\0" + json.dumps(dict(
        conf, runtimeConfig={"portMappings": []},
        args={"cni": {"ips": ["10.0.9.5"]}},
        prevResult={"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
                    "ips": [{"address": "10.0.9.2/24"}]})).encode())
    write("cni", "version", b"VERSION\0")
    write("cni", "old-version", json.dumps(dict(conf, cniVersion="0.2.0")).encode())


if __name__ == "__main__":
    main()
