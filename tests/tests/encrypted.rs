//! Encrypted networks (`--opt encrypted`) on three nodes, checked on the wire. One cluster
//! serves every check, in order. Needs root.
//!
//! - tasks on an encrypted network ping each other and move 20 MB intact; a plain network
//!   coexists on the same tasks;
//! - a capture of the underlay holds a marker sent on the plain network and not the same
//!   marker sent on the encrypted one, whose datagrams are ESP (SPI with the network's VNI);
//! - a captured ESP datagram replayed as is is dropped as a replay, with one bit flipped as
//!   failing authentication; ESP from an address outside the cluster and plain VXLAN for
//!   the encrypted VNI are dropped and counted — none delivered;
//! - `network rotate-key` during a running iperf3 loses no connection, and the capture then
//!   shows the new key's SPI;
//! - no state file holds a key;
//! - with the manager away, a worker that restarts has no key and drops rather than sends in
//!   the clear; once the manager is back (with new keys), traffic flows again;
//! - a node that cannot keep its ESP epoch says so at start and seals nothing
//!   (`esp_no_epoch`) rather than risk a repeated epoch.

use overlay_e2e::{
    ok, require_root, script_dir, unique, wait_for, write_script, Node, Underlay, SINK_PY,
    UPLOAD_PY,
};
use std::process::{Command, Stdio};
use std::time::Duration;

/// "OVLMARK!" as a ping pattern (hex), repeated through the payload.
const MARKER_HEX: &str = "4f564c4d41524b21";
const MARKER: &[u8] = b"OVLMARK!";

/// Sends one UDP datagram with the given hex payload to ADDR:4789.
const SEND_PY: &str =
    "import socket,sys; socket.socket(2,2).sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], 4789))";

fn drops(n: &Node, reason: &str) -> u64 {
    n.json(&["stats"])["drops"][reason].as_u64().unwrap_or(0)
}

fn addr_on(n: &Node, task: &str, network: &str) -> String {
    let v = n.task_view(task);
    v["attachments"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["network"] == network))
        .and_then(|x| x["address"].as_str())
        .expect("attachment")
        .to_string()
}

/// Captures UDP 4789 on host `h`'s underlay into a pcap file until `stop` returns.
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(u: &Underlay, h: usize, file: std::path::PathBuf, filter: &str) -> Capture {
        let child = u
            .host(h)
            .cmd("tcpdump")
            .args(["-i", "u0", "-n", "-U", "-w"])
            .arg(&file)
            .args(filter.split(' '))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        // tcpdump writes the file header once it listens.
        assert!(wait_for(Duration::from_secs(5), || std::fs::metadata(
            &file
        )
        .is_ok_and(|m| m.len() >= 24)));
        std::thread::sleep(Duration::from_millis(300));
        Capture { child, file }
    }

    /// Stops and returns each captured packet's UDP payload.
    fn stop(mut self) -> Vec<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGINT,
        );
        let _ = self.child.wait();
        let b = std::fs::read(&self.file).unwrap_or_default();
        let mut out = Vec::new();
        let mut at = 24;
        while at + 16 <= b.len() {
            let incl = u32::from_le_bytes([b[at + 8], b[at + 9], b[at + 10], b[at + 11]]) as usize;
            let p = &b[at + 16..(at + 16 + incl).min(b.len())];
            at += 16 + incl;
            // Ethernet, IPv4 (IHL), UDP.
            if p.len() > 14 + 20 + 8 {
                let ihl = usize::from(p[14] & 0x0f) * 4;
                if p.len() > 14 + ihl + 8 {
                    out.push(p[14 + ihl + 8..].to_vec());
                }
            }
        }
        out
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn encrypted_networks_on_three_nodes() {
    if !require_root("encrypted_networks_on_three_nodes") {
        return;
    }
    let tag = unique("en");
    let dir = script_dir(&tag);
    let sink = write_script(&dir, "sink.py", SINK_PY);
    let upload = write_script(&dir, "upload.py", UPLOAD_PY);

    let mut u = Underlay::new(&tag, 3, 9);
    let outsider = u.add_host(&format!("{tag}-x"));
    let mut n1 = Node::manager(&format!("{tag}a"), &u, 1);
    let mut n2 = Node::worker(&format!("{tag}b"), &u, 2, &n1);
    let mut n3 = Node::worker(&format!("{tag}c"), &u, 3, &n1);
    n1.wait_ready(&[&n2, &n3]);

    n1.ctl_ok(&[
        "network",
        "create",
        "--opt",
        "encrypted",
        "--subnet",
        "10.0.40.0/24",
        "sec",
    ]);
    n1.ctl_ok(&["network", "create", "--subnet", "10.0.41.0/24", "plain"]);
    let inspect = n1.json(&["network", "inspect", "sec"]);
    assert_eq!(inspect[0]["Options"]["encrypted"], "");
    let vni = inspect[0]["VNI"].as_u64().expect("vni") as u32;
    // Three tasks, one per node, on both networks; iperf3 servers on the encrypted one.
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "t", "--network", "sec", "--network", "plain",
        "--replicas", "3", "--", "python3", &sink]);
    n1.wait_running("t", 3);
    let on = |node: &Node| -> String {
        (1..=3)
            .map(|i| format!("t.{i}"))
            .find(|t| n1.node_of(t) == node.name)
            .expect("a task on every node")
    };
    let (t1, t2, t3) = (on(&n1), on(&n2), on(&n3));
    let t2_sec = addr_on(&n1, &t2, "sec");
    let t3_sec = addr_on(&n1, &t3, "sec");
    let t2_plain = addr_on(&n1, &t2, "plain");
    assert!(n1
        .exec(&t1, &["ip", "link", "show", "eth0"])
        .stdout
        .windows(8)
        .any(|w| w == b"mtu 1400"));

    // Ping and a transfer over the encrypted network; the marker on both networks, captured
    // on node 2's underlay.
    let cap = Capture::start(
        &u,
        2,
        dir.join("sec.pcap"),
        "udp port 4789 and src host 198.18.9.1",
    );
    for ip in [&t2_sec, &t2_plain] {
        ok(
            n1.exec(&t1, &["ping", "-c", "3", "-W", "2", "-p", MARKER_HEX, ip]),
            &format!("ping {ip}"),
        );
    }
    let sent = ok(
        n1.exec(&t1, &["python3", &upload, &t2_sec, "7000", "20"]),
        "upload",
    );
    assert_eq!(sent, "intact");
    let payloads = cap.stop();
    let esp: Vec<&Vec<u8>> = payloads.iter().filter(|p| p[0] & 0x80 != 0).collect();
    let plain: Vec<&Vec<u8>> = payloads.iter().filter(|p| p[0] == 0x08).collect();
    assert!(esp.len() > 100, "{} ESP datagrams", esp.len());
    assert!(
        plain.iter().any(|p| contains(p, MARKER)),
        "the plain network's marker is visible"
    );
    assert!(
        !esp.iter().any(|p| contains(p, MARKER)),
        "the encrypted network's marker leaked"
    );
    let spi0 = u32::from_be_bytes([esp[0][0], esp[0][1], esp[0][2], esp[0][3]]);
    assert_eq!(spi0 & 0x00ff_ffff, vni);
    // Each node counts what it sealed and opened (overlay_esp_*_datagrams_total).
    for n in [&n1, &n2] {
        let stats = n.json(&["stats"]);
        let count = |k: &str| stats[k].as_u64().unwrap_or(0);
        assert!(
            count("esp_sealed") > 0 && count("esp_opened") > 0,
            "{stats}"
        );
    }

    // Replay, tamper, outsiders, cleartext: nothing delivered, each counted.
    let one = esp
        .iter()
        .find(|p| p.len() < 300)
        .expect("a small ESP datagram (a ping)");
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    // One bit flipped in the sequence number; and a fresh sequence number (both copies, so
    // that the replay window lets it through to the integrity check) with one bit of the
    // ciphertext flipped.
    let mut flipped = one.to_vec();
    flipped[7] ^= 0x01;
    let mut forged = one.to_vec();
    forged[4..8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    forged[12..16].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    forged[40] ^= 0x01;
    let to2 = u.addr(2);
    let send_from = |h: usize, payload: &[u8]| {
        ok(
            u.host(h)
                .cmd("python3")
                .args(["-c", SEND_PY, &hex(payload), &to2])
                .output()
                .expect("send"),
            "send",
        )
    };
    let before = |r: &str| drops(&n2, r);
    let (replay0, auth0, unknown0, clear0) = (
        before("esp_replay"),
        before("esp_auth_failed"),
        before("esp_unknown_key"),
        before("esp_cleartext"),
    );
    send_from(1, one);
    send_from(1, &flipped);
    send_from(1, &forged);
    send_from(outsider, one);
    let mut vxlan = vec![0x08, 0, 0, 0];
    vxlan.extend_from_slice(&(vni << 8).to_be_bytes());
    vxlan.extend_from_slice(&[0u8; 60]);
    send_from(1, &vxlan);
    assert!(
        wait_for(Duration::from_secs(5), || before("esp_replay") > replay0
            && before("esp_auth_failed") >= auth0 + 2
            && before("esp_unknown_key") > unknown0
            && before("esp_cleartext") > clear0),
        "{}",
        n2.json(&["stats"])["drops"]
    );

    // Rotation under load: iperf3 from t1 to t3 for 8 s, a new key after 2.
    n1.exec(&t3, &["iperf3", "-s", "-D", "-p", "5301"]);
    std::thread::sleep(Duration::from_millis(500));
    let iperf = n1
        .ctl_cmd(&[
            "exec", &t1, "--", "iperf3", "-c", &t3_sec, "-p", "5301", "-t", "8", "-i", "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("iperf3");
    std::thread::sleep(Duration::from_secs(2));
    let auth_before = drops(&n3, "esp_auth_failed") + drops(&n3, "esp_unknown_key");
    n1.ctl_ok(&["network", "rotate-key", "sec"]);
    let out = iperf.wait_with_output().expect("iperf3");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "iperf3 failed across the rotation: {text}"
    );
    // Every one-second interval moved data (no stall while keys changed hands).
    let stalled = text
        .lines()
        .filter(|l| {
            l.contains("sec")
                && l.contains("bits/sec")
                && !l.contains("sender")
                && !l.contains("receiver")
        })
        .any(|l| l.contains(" 0.00 bits/sec"));
    assert!(!stalled, "{text}");
    assert_eq!(
        drops(&n3, "esp_auth_failed") + drops(&n3, "esp_unknown_key"),
        auth_before,
        "{}",
        n3.json(&["stats"])["drops"]
    );
    let cap = Capture::start(
        &u,
        2,
        dir.join("rot.pcap"),
        "udp port 4789 and src host 198.18.9.1",
    );
    ok(
        n1.exec(&t1, &["ping", "-c", "2", &t2_sec]),
        "ping after rotation",
    );
    // inspect shows both keys (the old one retiring), the new one in use, and no secret.
    let enc = n1.json(&["network", "inspect", "sec"])[0]["Encryption"].clone();
    assert_eq!(enc["Keys"].as_array().map(|k| k.len()), Some(2), "{enc}");
    assert_eq!(enc["Sending"], enc["Keys"][1]["Id"], "{enc}");
    // Times as Docker writes them (RFC 3339, UTC, to the millisecond).
    let rfc3339 = |v: &serde_json::Value| {
        v.as_str()
            .is_some_and(|t| t.len() >= 20 && t.ends_with('Z') && t.as_bytes()[10] == b'T')
    };
    assert!(rfc3339(&enc["Keys"][0]["RetireAt"]), "{enc}");
    assert!(rfc3339(&enc["Keys"][1]["ActiveFrom"]), "{enc}");
    assert!(
        rfc3339(&n1.json(&["network", "inspect", "sec"])[0]["Created"]),
        "network inspect: Created"
    );
    let spi1 = cap
        .stop()
        .iter()
        .find(|p| p[0] & 0x80 != 0)
        .map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
        .expect("ESP after rotation");
    assert_ne!(spi1, spi0, "the new key's SPI is in use");

    // No key on disk.
    for n in [&n1, &n2, &n3] {
        let state = std::fs::read_to_string(n.dir.join("state/state.json")).expect("state file");
        assert!(
            !state.contains("secret") && !state.contains("\"keys\""),
            "{}",
            n.name
        );
    }

    // The manager away, a worker restarts: no key, so nothing goes out (in the clear or
    // otherwise) until the manager is back.
    n1.stop();
    n2.remove_flag("--token", true);
    n2.remove_flag("--join", true);
    n2.restart();
    assert!(
        wait_for(Duration::from_secs(15), || n2
            .exec(&t2, &["true"])
            .status
            .success()),
        "{} not back on {}",
        t2,
        n2.name
    );
    let clear3 = drops(&n3, "esp_cleartext");
    let fails = n2.exec(&t2, &["ping", "-c", "2", "-W", "1", &t3_sec]);
    assert!(!fails.status.success(), "pinged without a key");
    assert!(
        drops(&n2, "esp_no_key") > 0,
        "{}",
        n2.json(&["stats"])["drops"]
    );
    assert_eq!(drops(&n3, "esp_cleartext"), clear3);
    n1.remove_flag("--init", false);
    n1.restart();
    assert!(
        wait_for(Duration::from_secs(20), || n2
            .exec(&t2, &["ping", "-c", "1", "-W", "1", &t3_sec])
            .status
            .success()),
        "no traffic once the manager is back: {}",
        n2.json(&["stats"])["drops"]
    );

    // A node that cannot keep its epoch (the place of the epoch file's temporary copy is
    // taken, so the fsync'd write fails, even as root) says so at start and seals nothing:
    // t3 receives, and its answers are dropped as esp_no_epoch, never sent under an epoch
    // that may repeat.
    n3.remove_flag("--token", true);
    n3.remove_flag("--join", true);
    std::fs::create_dir(n3.dir.join("state/.esp-epoch.tmp")).expect("block the epoch file");
    n3.restart();
    assert!(
        wait_for(Duration::from_secs(15), || n3
            .exec(&t3, &["true"])
            .status
            .success()),
        "{t3} not back on {}",
        n3.name
    );
    assert!(
        n3.log().contains("keeping the ESP epoch in"),
        "{}",
        n3.log()
    );
    let fails = n2.exec(&t2, &["ping", "-c", "2", "-W", "1", &t3_sec]);
    assert!(!fails.status.success(), "t3 answered without an epoch");
    assert!(
        drops(&n3, "esp_no_epoch") > 0,
        "{}",
        n3.json(&["stats"])["drops"]
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = Command::new("true").status();
}
