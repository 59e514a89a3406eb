//! Interop with a VXLAN peer nobody here wrote: the Linux kernel's own vxlan device.
//!
//! Host h2 runs no overlayd: a namespace `k` sits behind a bridge and a kernel vxlan device
//! (VNI 4200, dstport 4789, nolearning) with static FDB entries, as Docker programs them.
//! Host h1 runs overlayd with a task on the same VNI; the kernel endpoint is declared with
//! `overlayctl network vtep add`. They ping and move TCP both ways, the kernel side resolves
//! the task's MAC with ARP answered by overlayd over VXLAN, and a capture of the underlay
//! (tshark) shows UDP 4789 carrying VNI 4200. Needs root.

use overlay_e2e::{
    iperf_bytes, iperf_received, pings, require_root, run, unique, wait_for, Netns, Node, Underlay,
};
use std::process::{Command, Stdio};
use std::time::Duration;

const VNI: &str = "4200";
const KERNEL_MAC: &str = "02:42:0a:00:08:09";
const KERNEL_IP: &str = "10.0.8.9";

/// Builds the kernel side on host `h`: br0 + vx0 (kernel VXLAN) + veth to namespace `k`.
fn kernel_vtep(u: &Underlay, h: usize, k: &Netns, overlayd_addr: &str, task_mac: &str) {
    let host = u.host(h);
    let local = u.addr(h);
    // Less link-local chatter from the kernel host's own (undeclared) MACs, which overlayd
    // rightly drops as vxlan_source_mismatch.
    for ns in [host, k] {
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            let out = run(ns.cmd("sysctl").args(["-qw", key]));
            assert!(out.status.success(), "sysctl {key}");
        }
    }
    host.ip(&["link", "add", "br0", "type", "bridge"]);
    host.ip(&["link", "set", "br0", "up"]);
    host.ip(&[
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        VNI,
        "dstport",
        "4789",
        "local",
        &local,
        "nolearning",
    ]);
    host.ip(&["link", "set", "vx0", "mtu", "1450", "master", "br0", "up"]);
    host.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", &k.name,
    ]);
    host.ip(&["link", "set", "veth0", "mtu", "1450", "master", "br0", "up"]);
    k.ip(&[
        "link", "set", "eth0", "mtu", "1450", "address", KERNEL_MAC, "up",
    ]);
    k.ip(&["addr", "add", &format!("{KERNEL_IP}/24"), "dev", "eth0"]);
    // Between namespaces nothing ever computes an offloaded checksum: the kernel would hand
    // the underlay a VXLAN datagram whose inner TCP checksum is only partial, which a
    // userspace receiver sees as-is (on a real NIC the hardware or the stack fills it in).
    // So the kernel peer computes its checksums itself.
    let out = run(k.cmd("ethtool").args(["-K", "eth0", "tx", "off"]));
    assert!(
        out.status.success(),
        "ethtool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Static FDB: the task's MAC lives behind overlayd; broadcast (ARP) goes there too.
    let bridge = |args: &[&str]| {
        let out = run(Command::new("bridge").arg("-n").arg(&host.name).args(args));
        assert!(
            out.status.success(),
            "bridge {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for (verb, mac) in [("add", task_mac), ("append", "00:00:00:00:00:00")] {
        bridge(&[
            "fdb",
            verb,
            mac,
            "dev",
            "vx0",
            "dst",
            overlayd_addr,
            "self",
            "permanent",
        ]);
    }
}

#[test]
fn kernel_vxlan_peer_interoperates() {
    if !require_root("kernel_vxlan_peer_interoperates") {
        return;
    }
    let tag = unique("ki");
    let u = Underlay::new(&tag, 2, 2);
    let node = Node::manager(&format!("{tag}n"), &u, 1);
    node.ctl_ok(&[
        "network",
        "create",
        "--subnet",
        "10.0.8.0/24",
        "-o",
        &format!("com.docker.network.driver.overlay.vxlanid_list={VNI}"),
        "kern",
    ]);
    node.ctl_ok(&[
        "service",
        "create",
        "--name",
        "srv",
        "--network",
        "kern",
        "--",
        "iperf3",
        "-s",
    ]);
    node.wait_running("srv", 1);
    let task = node.task_view("srv.1");
    let task_ip = task["attachments"][0]["address"]
        .as_str()
        .expect("ip")
        .to_string();
    let task_mac = task["attachments"][0]["mac"]
        .as_str()
        .expect("mac")
        .to_string();
    node.ctl_ok(&[
        "network",
        "vtep",
        "add",
        "kern",
        "--address",
        &u.addr(2),
        "--mac",
        KERNEL_MAC,
        "--ip",
        KERNEL_IP,
    ]);
    assert!(node
        .ctl_ok(&["network", "vtep", "ls", "kern"])
        .contains(KERNEL_MAC));

    let k = Netns::new(&format!("{tag}-k"));
    kernel_vtep(&u, 2, &k, &u.addr(1), &task_mac);

    // Capture the underlay on the kernel host while traffic flows.
    let capture = u
        .host(2)
        .cmd("tshark")
        .args([
            "-i",
            "u0",
            "-f",
            "udp port 4789",
            "-c",
            "6",
            "-a",
            "duration:20",
            "-T",
            "fields",
            "-e",
            "udp.dstport",
            "-e",
            "vxlan.vni",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tshark");
    std::thread::sleep(Duration::from_secs(2));

    // Kernel -> task: the kernel resolves the task with ARP, answered by overlayd over VXLAN.
    let ping_from_kernel = || {
        run(k.cmd("ping").args(["-c", "1", "-W", "1", &task_ip]))
            .status
            .success()
    };
    assert!(
        wait_for(Duration::from_secs(5), ping_from_kernel),
        "kernel namespace cannot ping the task\n{}",
        node.log()
    );
    let neigh = run(k.cmd("ip").args(["neigh", "show", &task_ip]));
    assert!(
        String::from_utf8_lossy(&neigh.stdout).contains(&task_mac),
        "ARP did not resolve the task's MAC"
    );
    // Task -> kernel: overlayd answers ARP for the declared endpoint and encapsulates.
    assert!(
        pings(&node, "srv.1", KERNEL_IP),
        "task cannot ping the kernel namespace"
    );

    // TCP both ways across the two implementations.
    let out =
        run(k
            .cmd("iperf3")
            .args(["-c", &task_ip, "-t", "2", "-J", "--connect-timeout", "3000"]));
    let bytes = iperf_received(&out);
    assert!(bytes > 1_000_000, "kernel -> task moved only {bytes} bytes");
    let mut server = k
        .cmd("iperf3")
        .args(["-s", "-1"])
        .stdout(Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(500));
    let bytes = iperf_bytes(&node, "srv.1", KERNEL_IP);
    let _ = server.wait();
    assert!(bytes > 1_000_000, "task -> kernel moved only {bytes} bytes");

    // What crossed the underlay is standard VXLAN: UDP 4789, VNI 4200.
    let captured = capture.wait_with_output().expect("tshark output");
    let lines = String::from_utf8_lossy(&captured.stdout).into_owned();
    let frames: Vec<&str> = lines.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!frames.is_empty(), "tshark captured nothing");
    for f in &frames {
        let mut cols = f.split_whitespace();
        assert_eq!(cols.next(), Some("4789"), "{f}");
        assert_eq!(cols.next(), Some(VNI), "{f}");
    }
    // The router found nothing malformed in what its kernel peer sent. The only frames it
    // refused are the kernel host's own control chatter (an IGMP report from its bridge's
    // random MAC, flooded through the all-zeros FDB entry): a handful against ~10^5 data
    // frames, none of which were refused.
    let stats = node.json(&["stats"]);
    for bad in ["vxlan_malformed", "vxlan_unknown_vni"] {
        assert!(stats["drops"][bad].is_null(), "{bad}: {stats}");
    }
    assert!(
        stats["drops"]["vxlan_source_mismatch"]
            .as_u64()
            .unwrap_or(0)
            <= 5,
        "{stats}"
    );
    assert!(stats["rx_frames"].as_u64().unwrap_or(0) > 10_000, "{stats}");
}
