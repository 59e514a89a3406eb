//! A flow's packets arrive in order across nodes while the data path is busy with others:
//! four UDP streams with sequence numbers (iperf3 counts any datagram that arrives after a
//! later one) run next to eight bulk TCP streams, between tasks on two nodes with two
//! datapath workers each, and both workers of the receiving node carry frames. Guards the
//! data path's per-flow ordering (batching, GSO runs, GRO, multi-queue TAPs and the
//! underlay's steering between workers). Needs root.

use overlay_e2e::{bin, require_root, unique, Node, Underlay};
use std::process::Stdio;
use std::time::Duration;

fn json_of(o: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("iperf3 JSON")
}

#[test]
fn flows_stay_in_order_across_nodes_under_load() {
    if !require_root("flows_stay_in_order_across_nodes_under_load") {
        return;
    }
    let tag = unique("or");
    let u = Underlay::new(&tag, 2, 10);
    let workers = ["--datapath-workers", "2"];
    let n1 = Node::manager_with(&format!("{tag}a"), &u, 1, &workers);
    let n2 = Node::worker_with(&format!("{tag}b"), &u, 2, &n1, &workers);
    n1.wait_ready(&[&n2]);
    // The workers' sockets share the VXLAN port (SO_REUSEPORT); another daemon on the same
    // address must still be refused, not silently take a share of the datagrams.
    let dir = std::env::temp_dir().join(format!("{tag}-dup"));
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", u.host(1).path().display()))
        .arg(bin("overlayd"))
        .args(["--node", "dup", "--advertise-addr", &u.addr(1), "--init"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("dup.sock"))
        .output()
        .expect("run a second overlayd");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("binding the VXLAN port"),
        "a second daemon on {}: {err}",
        u.addr(1)
    );
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.50.0/24", "ord"]);
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "p", "--network", "ord", "--replicas", "2",
        "--", "iperf3", "-s", "-p", "5201"]);
    n1.wait_running("p", 2);
    assert_ne!(n1.node_of("p.1"), n1.node_of("p.2"), "one task per node");
    let server = n1.task_ip("p.2");
    // A second server on the same task for the UDP streams.
    n1.exec("p.2", &["iperf3", "-s", "-D", "-p", "5202"]);
    std::thread::sleep(Duration::from_millis(500));

    let bulk = n1
        .ctl_cmd(&[
            "exec", "p.1", "--", "iperf3", "-c", &server, "-p", "5201", "-P", "8", "-t", "5", "-J",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bulk TCP");
    std::thread::sleep(Duration::from_millis(500));
    #[rustfmt::skip]
    let udp = n1.exec("p.1", &["iperf3", "-c", &server, "-p", "5202", "-u", "-b", "200M",
        "-l", "1200", "-P", "4", "-t", "3", "-J"]);
    let bulk = bulk.wait_with_output().expect("bulk TCP");
    let tcp = json_of(&bulk, "bulk TCP");
    let udp = json_of(&udp, "UDP");
    let sum = &udp["end"]["sum"];
    let packets = sum["packets"].as_u64().unwrap_or(0);
    assert!(packets > 10_000, "only {packets} datagrams: {sum}");
    // iperf3 3.12 reports reordering per stream.
    let out_of_order: u64 = udp["end"]["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .map(|s| s["udp"]["out_of_order"].as_u64().expect("out_of_order"))
        .sum();
    assert_eq!(out_of_order, 0, "datagrams reordered: {sum}");
    let moved = tcp["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(
        moved > 10 << 20,
        "the bulk streams moved only {moved} bytes"
    );
    // Twelve flows hash over two workers: both of the receiving node's carry frames (all
    // twelve on one worker has odds of 1 in 2048).
    let receiver = if n1.node_of("p.2") == n1.name {
        &n1
    } else {
        &n2
    };
    let stats = receiver.json(&["stats"]);
    let per_worker: Vec<u64> = stats["workers"]
        .as_array()
        .map(|w| {
            w.iter()
                .map(|w| w["rx_frames"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        per_worker.len() == 2 && per_worker.iter().all(|n| *n > 1000),
        "frames per worker on the receiving node: {per_worker:?}"
    );
}
