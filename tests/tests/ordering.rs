//! A flow's packets arrive in order across nodes while the data path is busy with others:
//! four UDP streams with sequence numbers (iperf3 counts any datagram that arrives after a
//! later one) run next to four bulk TCP streams, between tasks on two nodes. Guards the
//! data path's per-flow ordering (batching, GSO runs, GRO, and several workers once there
//! are). Needs root.

use overlay_e2e::{require_root, unique, wait_for, Node, Underlay};
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
    let n1 = Node::manager(&format!("{tag}a"), &u, 1);
    let n2 = Node::worker(&format!("{tag}b"), &u, 2, &n1);
    assert!(wait_for(Duration::from_secs(10), || n1
        .node_state(&n2.name)
        == "ready"));
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.50.0/24", "ord"]);
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "p", "--network", "ord", "--replicas", "2",
        "--", "iperf3", "-s", "-p", "5201"]);
    n1.wait_running("p", 2);
    let node_of = |t: &str| n1.task_view(t)["node"].as_str().unwrap_or("").to_string();
    assert_ne!(node_of("p.1"), node_of("p.2"), "one task per node");
    let server = n1.task_ip("p.2");
    // A second server on the same task for the UDP streams.
    n1.exec("p.2", &["iperf3", "-s", "-D", "-p", "5202"]);
    std::thread::sleep(Duration::from_millis(500));

    let bulk = n1
        .ctl_cmd(&[
            "exec", "p.1", "--", "iperf3", "-c", &server, "-p", "5201", "-P", "4", "-t", "5", "-J",
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
}
