//! UDP segmentation offload through the overlay, as a QUIC-style application uses it: a task
//! sends super-datagrams with `UDP_SEGMENT` (its TAP hands them over whole, USO), and the
//! receiver gets every datagram, intact and in order, whether it is on the other node (the
//! sending node cuts the datagrams into the underlay's run, the receiving node merges them
//! again towards the TAP), on the same node (TAP to TAP, whole), or behind a service VIP. A
//! receiver with `UDP_GRO` gets merged datagrams with their segment size. Needs root.

use overlay_e2e::{out, require_root, script_dir, unique, write_script, Node, Underlay};

/// `send HOST PORT SENDS PER_SEND SIZE`: SENDS super-datagrams, each of PER_SEND datagrams
/// of SIZE bytes and a short one, numbered. `recv PORT COUNT gro|plain`: prints what
/// arrived as JSON once COUNT datagrams came (or 10 s passed).
const UDP_GSO_PY: &str = r#"
import json, socket, struct, sys, time
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
def body(seq, n):
    return struct.pack("!I", seq) + bytes((seq + i) % 251 for i in range(n - 4))
if sys.argv[1] == "send":
    host, port, sends, per, size = sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:7])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(SOL_UDP, UDP_SEGMENT, size)
    seq = 0
    for _ in range(sends):
        buf = b""
        for k in range(per + 1):
            buf += body(seq, size if k < per else size // 3)
            seq += 1
        s.sendto(buf, (host, port))
        time.sleep(0.002)
    print(seq)
else:
    port, count, gro = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "gro"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    if gro:
        s.setsockopt(SOL_UDP, UDP_GRO, 1)
    s.bind(("0.0.0.0", port))
    open(sys.argv[5], "w").close()
    s.settimeout(10)
    seqs, bad, merged = [], 0, 0
    try:
        while len(seqs) < count:
            data, anc, _, _ = s.recvmsg(65535, socket.CMSG_SPACE(4))
            seg = len(data)
            for level, typ, val in anc:
                if level == SOL_UDP and typ == UDP_GRO:
                    seg = struct.unpack("=I", val[:4])[0] if len(val) >= 4 else struct.unpack("=H", val[:2])[0]
            if seg < len(data):
                merged += 1
            for at in range(0, len(data), seg):
                d = data[at:at + seg]
                seq = struct.unpack("!I", d[:4])[0]
                bad += d != body(seq, len(d))
                seqs.append(seq)
    except socket.timeout:
        pass
    print(json.dumps({"datagrams": len(seqs), "in_order": seqs == sorted(seqs),
                      "bad": bad, "merged": merged}))
"#;

#[test]
fn udp_super_datagrams_cross_the_overlay_intact() {
    if !require_root("udp_super_datagrams_cross_the_overlay_intact") {
        return;
    }
    let tag = unique("uso");
    let u = Underlay::new(&tag, 2, 11);
    let (n1, n2) = Node::pair(&tag, &u);
    let dir = script_dir(&tag);
    let py = write_script(&dir, "udpgso.py", UDP_GSO_PY);
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.51.0/24", "uso"]);
    for (name, replicas) in [("a", "2"), ("b", "2"), ("v", "1")] {
        #[rustfmt::skip]
        n1.ctl_ok(&["service", "create", "--name", name, "--network", "uso", "--replicas",
            replicas, "--", "sleep", "infinity"]);
    }
    for (name, n) in [("a", 2), ("b", 2), ("v", 1)] {
        n1.wait_running(name, n);
    }
    assert_ne!(n1.node_of("a.1"), n1.node_of("a.2"), "one task per node");
    let local = n1.task_next_to("a.1", &["b.1", "b.2"]);
    let (sends, per, size) = (40, 20, 1200);
    let count = sends * (per + 1);
    let cases = [
        ("the other node", "a.2", n1.task_ip("a.2"), "plain"),
        ("the other node, UDP_GRO", "a.2", n1.task_ip("a.2"), "gro"),
        ("the same node", local, n1.task_ip(local), "plain"),
        ("a service VIP", "v.1", n1.vip_of("v"), "plain"),
    ];
    for (i, (what, receiver, to, mode)) in cases.iter().enumerate() {
        let port = (9100 + i).to_string();
        let ready = dir.join(format!("ready{i}"));
        #[rustfmt::skip]
        let rx = n1.exec_ready(receiver, &["python3", &py, "recv", &port, &count.to_string(),
            mode], &ready);
        #[rustfmt::skip]
        let sent = n1.exec("a.1", &["python3", &py, "send", to, &port, &sends.to_string(),
            &per.to_string(), &size.to_string()]);
        assert!(
            sent.status.success(),
            "{what}: send: {}",
            String::from_utf8_lossy(&sent.stderr)
        );
        let rx = rx.wait_with_output().expect("receiver");
        let got: serde_json::Value = serde_json::from_str(out(&rx).trim())
            .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&rx.stderr)));
        assert_eq!(
            got["datagrams"], count,
            "{what}: every datagram arrives: {got}"
        );
        assert_eq!(got["bad"], 0, "{what}: intact: {got}");
        assert_eq!(got["in_order"], true, "{what}: in order: {got}");
        if *mode == "gro" {
            assert!(
                got["merged"].as_u64() > Some(0),
                "{what}: merged on arrival: {got}"
            );
        }
    }
    for n in [&n1, &n2] {
        n.assert_no_drops("offload_malformed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
