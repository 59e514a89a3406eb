//! `overlayd --metrics-addr`: on two nodes, the exposition passes `promtool check metrics`,
//! the alert rules and scrape config in docs/prometheus pass `promtool check`, and a real
//! Prometheus (Debian's) scraping both nodes counts, with PromQL, the load-balanced flows
//! the test made through a service's VIP, the resolver's answers, the nodes ready and the
//! tasks running; `overlayctl flows` lists a held connection with its backend and `-f`
//! shows a reset flow and a refused one. Needs root.

use overlay_e2e::{
    ok, require_root, script_dir, unique, wait_for, write_script, Node, Underlay, WHOAMI_PY,
};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Requests the test sends through the VIP: each a new TCP connection, so a new flow.
const REQUESTS: u64 = 20;

/// Kills a process the test started when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `curl` inside the underlay host `host` of `u`.
fn curl(u: &Underlay, host: usize, args: &[&str]) -> String {
    ok(
        u.host(host)
            .cmd("curl")
            .args(["-sS", "--max-time", "5"])
            .args(args)
            .output()
            .expect("curl"),
        &format!("curl {args:?}"),
    )
}

/// The value of an instant PromQL query with one result, if it has one.
fn query(u: &Underlay, prometheus: &str, promql: &str) -> Option<f64> {
    let out = u
        .host(1)
        .cmd("curl")
        .args(["-sS", "--max-time", "5", "-G"])
        .arg(format!("http://{prometheus}/api/v1/query"))
        .arg("--data-urlencode")
        .arg(format!("query={promql}"))
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_two_nodes() {
    if !require_root("prometheus_scrapes_two_nodes") {
        return;
    }
    let tag = unique("mx");
    let dir = script_dir(&tag);
    let whoami = write_script(&dir, "whoami.py", WHOAMI_PY);
    let u = Underlay::new(&tag, 2, 47);
    let metrics: Vec<String> = (1..=2).map(|i| format!("{}:9323", u.addr(i))).collect();
    let n1 = Node::manager_with(&format!("{tag}a"), &u, 1, &["--metrics-addr", &metrics[0]]);
    let n2 = Node::worker_with(
        &format!("{tag}b"),
        &u,
        2,
        &n1,
        &["--metrics-addr", &metrics[1]],
    );
    n1.wait_ready(&[&n2]);

    n1.ctl_ok(&["network", "create", "--subnet", "10.0.47.0/24", "demo"]);
    #[rustfmt::skip]
    n1.ctl_ok(&[
        "service", "create", "--name", "whoami", "--network", "demo", "--replicas", "2",
        "-p", "8047:8000", "--", "python3", &whoami,
    ]);
    #[rustfmt::skip]
    n1.ctl_ok(&[
        "service", "create", "--name", "client", "--network", "demo", "--", "sleep", "infinity",
    ]);
    n1.wait_running("whoami", 2);
    n1.wait_running("client", 1);
    let client_node = n1.node_of("client.1");
    let cn = if client_node == n1.name { &n1 } else { &n2 };
    for _ in 0..REQUESTS {
        ok(
            cn.exec(
                "client.1",
                &["curl", "-sS", "--max-time", "5", "http://whoami:8000/"],
            ),
            "curl through the VIP",
        );
    }

    // Through the routing mesh, from outside the cluster: node 2's published port.
    for _ in 0..3 {
        curl(&u, 1, &[&format!("http://{}:8047/", u.addr(2))]);
    }

    // Both expositions pass promtool (classic text format: curl asks for no other).
    for (i, addr) in metrics.iter().enumerate() {
        // `ok` trims the output; the format ends every line.
        let text = curl(&u, 1, &[&format!("http://{addr}/metrics")]) + "\n";
        let mut check = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool");
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool on node {}: {}{}\n{text}",
            i + 1,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The alert rules and the scrape config shipped in docs/ are valid.
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/prometheus");
    for args in [
        ["check", "rules", "overlay.rules.yml"],
        ["check", "config", "prometheus.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&docs)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A real Prometheus, in host 1, scraping both nodes every second (OpenMetrics: it asks).
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: overlay\n    \
             static_configs:\n      - targets: ['{}', '{}']\n",
            metrics[0], metrics[1]
        ),
    )
    .unwrap();
    let web = format!("{}:9090", u.addr(1));
    let _prometheus = Reaped(
        u.host(1)
            .cmd("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus"),
    );
    let flows = r#"sum(overlay_lb_new_flows_total{service="whoami"})"#;
    let counted = wait_for(Duration::from_secs(30), || {
        query(&u, &web, flows) == Some(REQUESTS as f64)
    });
    assert!(
        counted,
        "{flows} = {:?}, expected {REQUESTS}",
        query(&u, &web, flows)
    );
    // Each curl asked the task's resolver for whoami's address: answered from the cluster.
    // Both targets are up; the leader counts both nodes ready; three tasks run. (Each node
    // is scraped on its own schedule: wait until both have been.)
    let lookups = format!(
        r#"sum(overlay_dns_queries_total{{type="A",outcome="cluster"}}) >= bool {REQUESTS}"#
    );
    let moved = format!(
        r#"sum(overlay_lb_backend_bytes_total{{service="whoami"}}) > bool {}"#,
        REQUESTS * 200
    );
    let expect = [
        (lookups.as_str(), 1.0),
        ("sum(up)", 2.0),
        ("count(overlay_control_snapshot_age_seconds < 5)", 2.0),
        (r#"overlay_cluster_nodes{health="ready"}"#, 2.0),
        (r#"sum(overlay_node_tasks{state="running"})"#, 3.0),
        // What the flows moved: each request and answer is well over 100 bytes each way.
        (moved.as_str(), 1.0),
        (
            r#"sum(overlay_network_received_frames_total{network="demo"}) > bool 0"#,
            1.0,
        ),
        (
            r#"sum(overlay_network_sent_bytes_total{network="demo"}) > bool 0"#,
            1.0,
        ),
        ("sum(overlay_underlay_sent_datagrams_total) > bool 0", 1.0),
        (
            "sum(overlay_underlay_gso_datagrams_per_send_count) > bool 0",
            1.0,
        ),
        (
            r#"sum(overlay_mesh_received_bytes_total{port="8047/tcp"}) > bool 0"#,
            1.0,
        ),
        (
            r#"sum(overlay_mesh_sent_bytes_total{port="8047/tcp"}) > bool 100"#,
            1.0,
        ),
    ];
    for (promql, want) in expect {
        let got = wait_for(Duration::from_secs(10), || {
            query(&u, &web, promql) == Some(want)
        });
        assert!(
            got,
            "{promql} = {:?}, expected {want}",
            query(&u, &web, promql)
        );
    }

    flow_table(cn, &n1);
}

/// Holds one connection to whoami:8000 open for a while after its answer.
const HOLD_PY: &str = r#"
import socket, time
s = socket.create_connection(("whoami", 8000), timeout=5)
s.sendall(b"GET / HTTP/1.1\r\nHost: w\r\n\r\n")
s.recv(1000)
print("held", flush=True)
time.sleep(15)
"#;

/// One request to whoami:8000, then a reset instead of a close (SO_LINGER 0).
const RESET_PY: &str = r#"
import socket, struct
s = socket.create_connection(("whoami", 8000), timeout=5)
s.sendall(b"GET / HTTP/1.1\r\nHost: w\r\n\r\n")
s.recv(1000)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
"#;

/// `overlayctl flows` on the client's node lists a held connection with its backend; `-f`
/// shows a reset flow and a refused one (UDP to a service without tasks) with their reasons.
fn flow_table(cn: &Node, manager: &Node) {
    let mut held = Reaped(
        cn.ctl_cmd(&["exec", "client.1", "--", "python3", "-c", HOLD_PY])
            .stdout(Stdio::piped())
            .spawn()
            .expect("held connection"),
    );
    let mut said = String::new();
    std::io::BufReader::new(held.0.stdout.take().expect("stdout"))
        .read_line(&mut said)
        .expect("held connection's output");
    assert_eq!(said.trim(), "held");
    let backends: Vec<String> = (1..=2)
        .map(|i| format!("{}:8000", cn.task_ip(&format!("whoami.{i}"))))
        .collect();
    let vip = format!("{}:8000", cn.vip_of("whoami"));
    let list = cn.json(&["flows", "--service", "whoami", "--json"]);
    let open: Vec<&serde_json::Value> = list
        .as_array()
        .expect("a list")
        .iter()
        .filter(|f| f["state"] == "established")
        .collect();
    assert_eq!(open.len(), 1, "{list}");
    assert_eq!(open[0]["vip"], vip.as_str(), "{list}");
    // The request went out and its answer came back; the backend's node is named.
    assert!(open[0]["bytes_out"].as_u64() > Some(50), "{list}");
    assert!(open[0]["frames_back"].as_u64() >= Some(2), "{list}");
    let node = open[0]["backend_node"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        !node.is_empty() && node.parse::<std::net::Ipv4Addr>().is_err(),
        "{list}"
    );
    let on_node = cn.json(&["flows", "--service", "whoami", "--node", &node, "--json"]);
    assert!(
        on_node
            .as_array()
            .is_some_and(|a| a.iter().any(|f| f["client"] == open[0]["client"])),
        "{on_node}"
    );
    let elsewhere = cn.json(&["flows", "--node", "no-such-node", "--json"]);
    assert_eq!(elsewhere.as_array().map(Vec::len), Some(0), "{elsewhere}");
    assert!(
        backends.iter().any(|b| open[0]["backend"] == b.as_str()),
        "{list}"
    );
    let table = cn.ctl_ok(&["flows", "--service", "whoami"]);
    assert!(
        table.starts_with("PROTO") && table.contains("established"),
        "{table}"
    );

    // Followed: a reset flow, then a refused one.
    manager.ctl_ok(&[
        "service",
        "create",
        "--name",
        "idle",
        "--network",
        "demo",
        "--replicas",
        "0",
        "--",
        "sleep",
        "infinity",
    ]);
    let idle_vip = manager.vip_of("idle");
    let mut follow = Reaped(
        cn.ctl_cmd(&["flows", "-f", "--service", "whoami"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("flows -f"),
    );
    let (tx, rx) = mpsc::channel();
    let out = follow.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_line = |want: &dyn Fn(&str) -> bool, what: &str| {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(l) if want(&l) => return,
                Ok(l) => seen.push(l),
                Err(_) => break,
            }
        }
        panic!("flows -f never showed {what}; it showed {seen:?}");
    };
    // The first lines list what is open now.
    wait_line(&|l| l.starts_with("= whoami tcp"), "the held flow");
    ok(
        cn.exec("client.1", &["python3", "-c", RESET_PY]),
        "reset client",
    );
    wait_line(
        &|l| l.contains("whoami tcp") && l.contains(" reset out "),
        "a reset flow",
    );
    let udp = format!("import socket;s=socket.socket(2,2);s.sendto(b'x',('{idle_vip}',9000))");
    ok(cn.exec("client.1", &["python3", "-c", &udp]), "udp to idle");
    wait_line(&|l| l.starts_with("! drop lb_no_backend"), "a refused flow");
}
