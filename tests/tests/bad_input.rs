//! Bad input gets one clear line on stderr, a non-zero exit, and changes nothing: unknown
//! names, duplicates, malformed CIDRs, overlaps, exhausted pools, missing commands, wrong CLI
//! arguments, a socket or state directory already in use. Needs root for the daemon.

use overlay_e2e::{bin, require_root, run, unique, wait_for, Node};
use std::process::Command;
use std::time::Duration;

fn one_line(err: &str) -> &str {
    let line = err.trim_end();
    assert!(!line.is_empty(), "no error message");
    assert_eq!(line.lines().count(), 1, "error is not one line: {err:?}");
    line
}

#[test]
fn cli_argument_errors_need_no_daemon() {
    let ctl = |args: &[&str]| {
        run(Command::new(bin("overlayctl"))
            .args(["--socket", "/nonexistent/x.sock"])
            .args(args))
    };
    for args in [
        &["network", "create"][..],
        &["service", "create", "--name", "x", "--", "true"],
        &["service", "scale", "web"],
        &["service", "scale", "web=lots"],
        &["bogus"],
    ] {
        let out = ctl(args);
        assert!(!out.status.success(), "{args:?} succeeded");
    }
    let out = ctl(&["service", "scale", "web=lots"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid replica count"));
    let out = ctl(&["network", "ls"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        one_line(&err).contains("cannot reach overlayd at /nonexistent/x.sock"),
        "{err}"
    );
    let out = run(Command::new(bin("overlayd")).args(["--node", "a", "--datapath-workers", "0"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--datapath-workers"));
    let out = run(Command::new(bin("overlayd")).args(["--node", "bad/name"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid node name"));
    for b in ["overlayd", "overlayctl"] {
        let help = run(Command::new(bin(b)).arg("--help"));
        assert!(help.status.success() && !help.stdout.is_empty());
    }
}

#[test]
fn refusals_are_clear_and_change_nothing() {
    if !require_root("refusals_are_clear_and_change_nothing") {
        return;
    }
    // A tiny pool: room for exactly two /24 networks.
    let node = Node::start(
        &unique("bi"),
        &[
            "--default-addr-pool",
            "10.10.0.0/23",
            "--default-addr-pool-mask-length",
            "24",
            "--socket-group",
            "daemon",
        ],
    );
    // The API socket: root and the --socket-group only.
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&node.socket).expect("socket");
        assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
        let daemon = nix::unistd::Group::from_name("daemon").unwrap().unwrap();
        assert_eq!(meta.gid(), daemon.gid.as_raw(), "socket group");
    }
    node.ctl_ok(&["network", "create", "a"]);
    node.ctl_ok(&["network", "create", "--subnet", "10.20.0.0/29", "small"]);
    let before_nets = node.ctl_ok(&["network", "ls"]);

    let cases: &[(&[&str], &str)] = &[
        (&["network", "create", "a"], "network a already exists"),
        (
            &["network", "create", "--subnet", "10.0.0.0/33", "x"],
            "invalid subnet",
        ),
        (
            &["network", "create", "--subnet", "banana", "x"],
            "invalid subnet",
        ),
        (
            &["network", "create", "--subnet", "10.20.0.0/16", "x"],
            "overlaps network small",
        ),
        (
            &[
                "network",
                "create",
                "--subnet",
                "10.30.0.0/24",
                "--gateway",
                "10.31.0.1",
                "x",
            ],
            "not a host address",
        ),
        (
            &["network", "create", "-d", "bridge", "x"],
            "unsupported network driver",
        ),
        (&["network", "create", "x/y"], "invalid network name"),
        (
            &[
                "network",
                "create",
                "-o",
                "com.docker.network.driver.overlay.vxlanid_list=99999999",
                "x",
            ],
            "out of range",
        ),
        (
            &[
                "network",
                "create",
                "-o",
                "com.docker.network.driver.mtu=1500",
                "x",
            ],
            "VXLAN needs 50 bytes",
        ),
        (&["network", "inspect", "nope"], "network nope not found"),
        (&["network", "rm", "nope"], "network nope not found"),
        (
            &[
                "service",
                "create",
                "--name",
                "s",
                "--network",
                "nope",
                "--",
                "sleep",
                "1",
            ],
            "network nope not found",
        ),
        (&["service", "ps", "nope"], "service nope not found"),
        (&["service", "scale", "nope=2"], "service nope not found"),
        (&["inspect", "nope.1"], "task nope.1 not found"),
        // 10.20.0.0/29 has five addresses (.2-.6): the VIP and four tasks.
        (
            &[
                "service",
                "create",
                "--name",
                "big",
                "--network",
                "small",
                "--replicas",
                "6",
                "--",
                "sleep",
                "1",
            ],
            "no free address left in network small",
        ),
    ];
    for (args, expect) in cases {
        let err = node.ctl_err(args);
        assert!(
            one_line(&err).contains(expect),
            "{args:?}: {err:?} lacks {expect:?}"
        );
    }
    // The pool is exhausted by a third default network.
    node.ctl_ok(&["network", "create", "b"]);
    let err = node.ctl_err(&["network", "create", "c"]);
    assert!(
        one_line(&err).contains("no free subnet left in the address pool 10.10.0.0/23"),
        "{err}"
    );
    // A reader that stops early (`| head -1`, `| grep -q`) ends overlayctl quietly.
    let mut ls = node
        .ctl_cmd(&["network", "ls"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("overlayctl");
    drop(ls.stdout.take());
    let out = ls.wait_with_output().expect("overlayctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    node.ctl_ok(&["network", "rm", "b"]);
    assert_eq!(node.ctl_ok(&["network", "ls"]), before_nets);
    assert_eq!(node.ctl_ok(&["service", "ls", "-q"]), "");

    // A command that does not exist: the task is reported failed with the reason.
    node.ctl_ok(&[
        "service",
        "create",
        "--name",
        "ghost",
        "--network",
        "a",
        "--",
        "/no/such/binary",
    ]);
    let failed = wait_for(Duration::from_secs(10), || {
        let v = node.task_view("ghost.1");
        v["status"]["state"] == "failed"
            && v["status"]["error"]
                .as_str()
                .unwrap_or("")
                .contains("No such file or directory")
    });
    assert!(failed, "{}", node.task_view("ghost.1"));
    let ps = node.ctl_ok(&["service", "ps", "ghost"]);
    assert!(
        ps.contains("Failed") && ps.contains("/no/such/binary"),
        "{ps}"
    );
    // In use: refused.
    let err = node.ctl_err(&["network", "rm", "a"]);
    assert!(
        one_line(&err).contains("network a is in use by service(s) ghost"),
        "{err}"
    );
    // exec into a task that does not exist, and of a command that does not exist.
    let out = node.exec("ghost.1", &["/no/such/cmd"]);
    assert_eq!(out.status.code(), Some(127));

    // The API speaks plain HTTP+JSON: curl works, and errors are JSON.
    let out = run(Command::new("curl").args([
        "-s",
        "--unix-socket",
        node.socket.to_str().unwrap_or_default(),
        "http://x/networks/nope",
    ]));
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON error body");
    assert_eq!(body["message"], "network nope not found");
    let out = run(Command::new("curl").args([
        "-s",
        "--unix-socket",
        node.socket.to_str().unwrap_or_default(),
        "-X",
        "POST",
        "-d",
        "{not json",
        "http://x/networks/create",
    ]));
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON error body");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("invalid request body"),
        "{body}"
    );

    // A second daemon on the same socket, or on the same state directory, is refused.
    let out = run(Command::new(bin("overlayd"))
        .args([
            "--node",
            "other",
            "--state-dir",
            "/tmp/overlay-e2e-other-state",
            "--socket",
        ])
        .arg(&node.socket));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in use by another running overlayd"));
    let out = run(Command::new(bin("overlayd"))
        .args([
            "--node",
            &node.name,
            "--socket",
            "/tmp/overlay-e2e-other.sock",
            "--state-dir",
        ])
        .arg(node.dir.join("state")));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another overlayd"));
    // Same node name, its own state directory and socket: refused, since the two would
    // remove each other's task namespaces.
    let out = run(Command::new(bin("overlayd")).args([
        "--node",
        &node.name,
        "--state-dir",
        "/tmp/overlay-e2e-other-state",
        "--socket",
        "/tmp/overlay-e2e-other.sock",
    ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "node name {} is in use by another overlayd",
            node.name
        )),
        "{err}"
    );
    assert!(
        node.ctl_ok(&["service", "ls", "-q"]).contains("ghost"),
        "the running node was disturbed"
    );
    let _ = std::fs::remove_dir_all("/tmp/overlay-e2e-other-state");
}
