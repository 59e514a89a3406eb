//! TCP over IPv6 through the overlay with segmentation offload (TSO6): the tasks' TAPs take
//! IPv6 super-frames, which cross to a task on the same node whole and are cut into
//! segments for a task on the other node (and merged again towards its TAP). A stream arrives complete and intact both ways,
//! nothing is refused as a malformed offload, and the sending node reads the stream as
//! super-frames (far fewer frames than segments). IPv6 addresses and neighbours are set by
//! hand in the tasks (the overlay's IPAM gives IPv4 only). Needs root.

use overlay_e2e::{
    ok, require_root, script_dir, unique, wait_for, write_script, Node, Underlay, SINK_PY,
    UPLOAD_PY,
};
use std::time::Duration;

/// Frames the node's workers read or received so far.
fn frames_in(n: &Node) -> u64 {
    n.json(&["stats"])["rx_frames"].as_u64().unwrap_or(0)
}

#[test]
fn tcp_over_ipv6_crosses_the_overlay_in_super_frames() {
    if !require_root("tcp_over_ipv6_crosses_the_overlay_in_super_frames") {
        return;
    }
    let tag = unique("tso6");
    let u = Underlay::new(&tag, 2, 13);
    let (n1, n2) = Node::pair(&tag, &u);
    let dir = script_dir(&tag);
    let sink = write_script(&dir, "sink.py", SINK_PY);
    let upload = write_script(&dir, "upload.py", UPLOAD_PY);
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.52.0/24", "v6"]);
    for name in ["a", "b"] {
        #[rustfmt::skip]
        n1.ctl_ok(&["service", "create", "--name", name, "--network", "v6", "--replicas", "2",
            "--", "python3", &sink, "::"]);
    }
    n1.wait_running("a", 2);
    n1.wait_running("b", 2);
    assert_ne!(n1.node_of("a.1"), n1.node_of("a.2"), "one task per node");
    let local = n1.task_next_to("a.1", &["b.1", "b.2"]);
    // Addresses and neighbours by hand: no duplicate address detection, no discovery.
    let tasks = ["a.1", "a.2", local];
    let ip6 = |k: usize| format!("fd00:52::{}", k + 1);
    for (k, t) in tasks.iter().enumerate() {
        let addr = format!("{}/64", ip6(k));
        let o = n1.exec(
            t,
            &["ip", "-6", "addr", "add", &addr, "dev", "eth0", "nodad"],
        );
        assert!(
            o.status.success(),
            "{t}: IPv6 address: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mac = |t: &str| {
        n1.task_view(t)["attachments"][0]["mac"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let neigh = |on: &str, k: usize, of: &str| {
        #[rustfmt::skip]
        let o = n1.exec(on, &["ip", "-6", "neigh", "replace", &ip6(k), "lladdr", &mac(of), "dev",
            "eth0", "nud", "permanent"]);
        assert!(
            o.status.success(),
            "{on}: neighbour: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    for (k, t) in tasks.iter().enumerate().skip(1) {
        neigh("a.1", k, t);
        neigh(t, 0, "a.1");
    }
    let mib = 64;
    let client_node = if n1.node_of("a.1") == n1.name {
        &n1
    } else {
        &n2
    };
    for (what, receiver, k) in [("the other node", "a.2", 1), ("the same node", local, 2)] {
        let listening =
            || !ok(n1.exec(receiver, &["ss", "-Hltn", "sport = :7000"]), "ss").is_empty();
        assert!(
            wait_for(Duration::from_secs(10), listening),
            "{what}: sink up"
        );
        let before = frames_in(client_node);
        let sent = ok(
            n1.exec(
                "a.1",
                &["python3", &upload, &ip6(k), "7000", &mib.to_string()],
            ),
            what,
        );
        let frames = frames_in(client_node) - before;
        assert_eq!(sent, "intact", "{what}: the stream arrives whole");
        // 64 MiB in 1390-byte segments would be 48 000 frames from the sender's TAP alone
        // (52 000 with the ACKs counted here, measured with TSO6 off); super-frames make it
        // a few thousand.
        assert!(
            frames < 24_000,
            "{what}: {frames} frames read for {mib} MiB: no super-frames"
        );
    }
    for n in [&n1, &n2] {
        n.assert_no_drops("offload_malformed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
