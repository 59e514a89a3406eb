//! Services from container images (`service create --image`): two nodes, each with its own
//! dockerd (`overlay_e2e::dockerd`: the node's network namespace, a private mount namespace
//! whose /run/docker/plugins is the node's plugin directory), busybox imported as `bb:1`
//! and `bb:2`. Needs root and dockerd.
//!
//! Checked: two replicas of `bb:1` running busybox httpd, published on 8080, answer on both
//! nodes' 8080 and through the VIP from a process task; `docker ps` on each node shows its
//! container named `web.SLOT.TASKID`, labelled with service and task; `nslookup` of another
//! service inside a container answers its VIP; an overlayd restart of a node (SIGTERM and
//! start, then kill -9 and start) adopts its container (same id and pid), which serves
//! through both nodes' 8080 and the VIP again while a process task's TCP connection to it
//! holds; the adopted container killed with `docker kill` is replaced; `service logs` (and
//! `-f`) shows each node's task output with Docker's prefix; `service update --image bb:2`
//! rolls both tasks with no failed request through the mesh meanwhile; a missing image
//! fails its task with the engine's message in `service ps`; `--restart-condition
//! on-failure --restart-max-attempts 1` replaces a failed container once, then leaves it
//! failed; `service rm` removes the containers and their TAPs; a node whose engine stops
//! reports its image task failed with that reason, while process tasks run on.

use overlay_e2e::dockerd::{DockerPair, Dockerd};
use overlay_e2e::{require_root, unique, wait_for, write_script, WHOAMI_PY};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Holds one TCP connection to `IP`:7000 (an echo server) and every 100 ms sends a line and
/// waits for its echo, until the file STOP exists (or 120 s passed); creates READY after the
/// first echo. Prints `ok ROUNDS LONGEST_GAP_MS`; a broken connection raises (exit 1).
const HOLD_PY: &str = r#"
import os, socket, sys, time
ip, stop, ready = sys.argv[1:4]
deadline = time.monotonic() + 20
while True:
    try:
        c = socket.create_connection((ip, 7000), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
c.settimeout(30)
r = c.makefile("rb")
seq, worst, last = 0, 0.0, time.monotonic()
end = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < end:
    seq += 1
    line = b"%d\n" % seq
    c.sendall(line)
    got = r.readline()
    if got != line:
        print("error: echo %r for %r" % (got, line), flush=True)
        sys.exit(1)
    now = time.monotonic()
    worst, last = max(worst, now - last), now
    if seq == 1:
        open(ready, "w").close()
    time.sleep(0.1)
print("ok %d %d" % (seq, worst * 1000), flush=True)
"#;

/// The names of the image tasks' TAPs (`ovi...`) in the network namespace `netns`.
fn image_taps(netns: &std::path::Path) -> Vec<String> {
    let o = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-o", "link"])
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("ovi"))
        .collect()
}

/// `curl` of `url` from the network namespace `netns`: the body, or "" on failure.
fn fetch_from(netns: &std::path::Path, url: &str) -> String {
    let o = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["curl", "-s", "-m", "3", url])
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The names of the containers on `d` (running or not) of service `svc`.
fn containers(d: &Dockerd, svc: &str) -> Vec<String> {
    let filter = format!("label=com.docker.swarm.service.name={svc}");
    d.ok(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"])
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn services_run_from_images() {
    if !require_root("services_run_from_images") {
        return;
    }
    let tag = unique("im");
    let DockerPair {
        work,
        rootfs,
        u,
        n1,
        mut n2,
        d1,
        d2,
        ..
    } = DockerPair::start(&tag, "images", 13);
    let whoami = write_script(&work, "whoami.py", WHOAMI_PY);
    let hold = write_script(&work, "hold.py", HOLD_PY);
    for d in [&d1, &d2] {
        d.import_busybox(&rootfs, "bb:1");
        d.import_busybox(&rootfs, "bb:2");
    }
    let dockerd_of = |node: &str| if node == n1.name { &d1 } else { &d2 };

    n1.ctl_ok(&["network", "create", "--subnet", "10.0.70.0/24", "front"]);
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "whoami", "--network", "front", "--",
        "python3", &whoami]);
    n1.wait_running("whoami", 1);
    let serve = "echo $OVERLAY_TASK_NAME > /index.html && echo serving $OVERLAY_TASK_NAME && \
                 exec httpd -f -p 80 -h /";
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "web", "--network", "front", "--image", "bb:1",
        "--replicas", "2", "-p", "8080:80", "--stop-grace-period", "3s", "--", "sh", "-c", serve]);
    n1.wait_running("web", 2);

    // Swarm's names and labels, one container per node.
    let (node1, node2) = (n1.node_of("web.1"), n1.node_of("web.2"));
    assert_ne!(node1, node2, "the two replicas are spread");
    let id1 = n1.task_view("web.1")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let c1 = format!("web.1.{id1}");
    assert_eq!(
        containers(dockerd_of(&node1), "web"),
        std::slice::from_ref(&c1)
    );
    let label = dockerd_of(&node1).ok(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"com.docker.swarm.task.id\"}}",
        &c1,
    ]);
    assert_eq!(label, id1);
    // The container's interface is the task's: its address, on the overlay.
    let ip = dockerd_of(&node1).ok(&["exec", &c1, "ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(ip.contains(&format!("{}/24", n1.task_ip("web.1"))), "{ip}");

    // The mesh on both nodes, and the VIP from a process task.
    // "Running" is the container started; its httpd binds a moment later.
    let task_ip_2 = n1.task_ip("web.2");
    assert!(wait_for(Duration::from_secs(10), || {
        let d = dockerd_of(&node1);
        d.docker(&[
            "exec",
            &c1,
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{task_ip_2}/"),
        ])
        .status
        .success()
    }));
    for i in 1..=2 {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..6 {
            seen.insert(fetch_from(
                &u.host(1).path(),
                &format!("http://{}:8080/", u.addr(i)),
            ));
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            ["web.1", "web.2"],
            "node {i}'s 8080"
        );
    }
    let vip = n1.vip_of("web");
    let o = n1.exec(
        "whoami.1",
        &["curl", "-s", "-m", "3", &format!("http://{vip}/")],
    );
    let body = String::from_utf8_lossy(&o.stdout);
    assert!(body.starts_with("web."), "VIP from a process task: {body}");

    // Cluster names inside the container.
    let ns = dockerd_of(&node1).ok(&["exec", &c1, "nslookup", "whoami"]);
    assert!(ns.contains(&n1.vip_of("whoami")), "{ns}");

    // An overlayd restart (SIGTERM, then kill -9; each followed by a start) adopts the
    // image task's container: same container, same pid, serving again through both nodes'
    // published port and the VIP; a process task's TCP connection to it held across both.
    let t2 = if node1 == n2.name { "web.1" } else { "web.2" };
    let id2 = n1.task_view(t2)["id"].as_str().expect("id").to_string();
    let c2 = format!("{t2}.{id2}");
    let identity = || d2.ok(&["inspect", "-f", "{{.Id}} {{.State.Pid}}", &c2]);
    let before = identity();
    let ip2 = n1.task_ip(t2);
    d2.ok(&[
        "exec", "-d", &c2, "busybox", "nc", "-ll", "-p", "7000", "-e", "/bin/cat",
    ]);
    let (ready, stop_held) = (work.join("held.ready"), work.join("held.stop"));
    let stop_arg = stop_held.display().to_string();
    let held = n1.exec_ready("whoami.1", &["python3", &hold, &ip2, &stop_arg], &ready);
    let serves_both = |i: usize| {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..6 {
            seen.insert(fetch_from(
                &u.host(1).path(),
                &format!("http://{}:8080/", u.addr(i)),
            ));
        }
        seen.into_iter().collect::<Vec<_>>() == ["web.1", "web.2"]
    };
    for how in ["SIGTERM", "kill -9"] {
        if how == "SIGTERM" {
            assert!(n2.stop(), "{} stops on SIGTERM", n2.name);
        } else {
            n2.kill();
        }
        let adoptions = n2
            .log()
            .matches("adopted the container a previous run left")
            .count();
        let started = std::time::Instant::now();
        n2.start_again();
        assert!(
            wait_for(Duration::from_secs(20), || n2
                .log()
                .matches("adopted the container a previous run left")
                .count()
                > adoptions),
            "after {how}: the container adopted:\n{}",
            n2.log()
        );
        let adopted = started.elapsed();
        let mut mesh = [None, None];
        assert!(
            wait_for(Duration::from_secs(20), || {
                for (i, at) in mesh.iter_mut().enumerate() {
                    if at.is_none() && serves_both(i + 1) {
                        *at = Some(started.elapsed());
                    }
                }
                mesh.iter().all(Option::is_some)
            }),
            "after {how}: both tasks through both nodes' 8080:\n{}",
            n2.log()
        );
        eprintln!(
            "{how}: container adopted {adopted:?}, serving through node 1's and node 2's 8080 \
             {:?} after the start",
            mesh
        );
        assert_eq!(
            identity(),
            before,
            "after {how}: the same container and pid"
        );
        assert_eq!(containers(&d2, "web"), std::slice::from_ref(&c2));
        let pid: u64 = before
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("pid");
        assert!(
            wait_for(Duration::from_secs(10), || {
                let v = n1.task_view(t2);
                v["status"]["state"] == "running" && v["status"]["pid"] == pid
            }),
            "after {how}: {t2} running with pid {pid}: {}",
            n1.task_view(t2)
        );
        let mut seen = std::collections::BTreeSet::new();
        assert!(
            wait_for(Duration::from_secs(10), || {
                let o = n1.exec(
                    "whoami.1",
                    &["curl", "-s", "-m", "3", &format!("http://{vip}/")],
                );
                seen.insert(String::from_utf8_lossy(&o.stdout).trim().to_string());
                seen.contains("web.1") && seen.contains("web.2")
            }),
            "after {how}: both tasks through the VIP: {seen:?}"
        );
    }
    std::fs::write(&stop_held, "").expect("stop file");
    let held = held.wait_with_output().expect("held connection");
    let said = String::from_utf8_lossy(&held.stdout).to_string();
    assert!(
        held.status.success() && said.starts_with("ok "),
        "the connection held across both restarts: {said}{}",
        String::from_utf8_lossy(&held.stderr)
    );
    eprintln!("held connection across both restarts (rounds, longest gap ms): {said}");

    // service logs: each node shows its task's output with Docker's prefix; -f follows.
    for n in [&n1, &n2] {
        let task = if n1.node_of("web.1") == n.name {
            "web.1"
        } else {
            "web.2"
        };
        let id = n1.task_view(task)["id"].as_str().expect("id").to_string();
        let want = format!("{task}.{id}@{} | serving {task}", n.name);
        assert!(
            wait_for(Duration::from_secs(10), || n
                .ctl_ok(&["service", "logs", "web"])
                .contains(&want)),
            "{want}"
        );
    }
    let mut follow = n1
        .ctl_cmd(&["service", "logs", "-f", "--tail", "1", "web"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("service logs -f");
    // Bounded: a follow that shows nothing is killed after 15 s (and the line is empty).
    let pid = nix::unistd::Pid::from_raw(follow.id() as i32);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(15));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
    });
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(follow.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("a followed line");
    assert!(line.contains("| serving web."), "{line}");
    let _ = follow.kill();
    let _ = follow.wait();

    // docker kill: the task fails and its container is replaced (the adopted one: its
    // supervision resumed with the restart).
    d2.ok(&["kill", &c2]);
    assert!(
        wait_for(Duration::from_secs(30), || {
            let v = n1.task_view(t2);
            v["status"]["state"] == "running" && v["status"]["restarts"].as_u64() >= Some(1)
        }),
        "{t2} replaced after docker kill:\n{}",
        n1.ctl_ok(&["service", "ps", "web"])
    );
    assert!(
        wait_for(Duration::from_secs(10), || serves_both(2)),
        "serving again"
    );

    // service update --image under load through the mesh: no failed request.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (netns, url) = (u.host(1).path(), format!("http://{}:8080/", u.addr(2)));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if fetch_from(&netns, &url).starts_with("web.") {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    n1.ctl_ok(&["service", "update", "--image", "bb:2", "--quiet", "web"]);
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 10, "requests during the update: {ok}");
    assert_eq!(failed, 0, "failed requests during the update ({ok} served)");
    eprintln!("service update --image: {ok} requests served through the mesh, {failed} failed");
    for d in [&d1, &d2] {
        let images = d.ok(&[
            "ps",
            "--filter",
            "label=com.docker.swarm.service.name=web",
            "--format",
            "{{.Image}}",
        ]);
        assert_eq!(images, "bb:2");
    }

    // A missing image: the engine's reason in `service ps`, retried.
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "bad", "--network", "front", "--image",
        "nope.invalid/none:1"]);
    assert!(
        wait_for(Duration::from_secs(30), || n1
            .ctl_ok(&["service", "ps", "bad"])
            .contains("pulling nope.invalid/none:1")),
        "{}",
        n1.ctl_ok(&["service", "ps", "bad"])
    );

    // --restart-*: one replacement after a failure, then it stays failed.
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "once", "--network", "front", "--image", "bb:1",
        "--restart-condition", "on-failure", "--restart-max-attempts", "1",
        "--restart-delay", "100ms", "--", "sh", "-c", "exit 3"]);
    assert!(
        wait_for(Duration::from_secs(30), || {
            let v = n1.task_view("once.1");
            v["status"]["state"] == "failed"
                && v["status"]["restarts"] == 1
                && v["status"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("non-zero exit (3); not restarted"))
        }),
        "{}",
        n1.ctl_ok(&["service", "ps", "once"])
    );

    // service rm removes the containers.
    n1.ctl_ok(&["service", "rm", "web", "bad", "once"]);
    assert!(
        wait_for(Duration::from_secs(30), || containers(&d1, "web")
            .is_empty()
            && containers(&d2, "web").is_empty()),
        "containers removed"
    );
    // Their persistent TAPs went with them (whether in a container or back in the node's
    // namespace when its container ended).
    assert!(
        wait_for(Duration::from_secs(10), || image_taps(&u.host(1).path())
            .is_empty()
            && image_taps(&u.host(2).path()).is_empty()),
        "TAPs left: {:?} {:?}",
        image_taps(&u.host(1).path()),
        image_taps(&u.host(2).path())
    );
    // An engine that goes away: that node's image tasks fail with the reason; process tasks
    // are not affected.
    #[rustfmt::skip]
    n1.ctl_ok(&["service", "create", "--name", "img", "--network", "front", "--image", "bb:1",
        "--replicas", "2", "--", "sleep", "600"]);
    n1.wait_running("img", 2);
    let on_2 = if n1.node_of("img.1") == n2.name {
        "img.1"
    } else {
        "img.2"
    };
    drop(d2);
    assert!(
        wait_for(Duration::from_secs(30), || {
            let v = n1.task_view(on_2);
            v["status"]["state"] == "failed"
                && v["status"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("Docker Engine"))
        }),
        "{}",
        n1.ctl_ok(&["service", "ps", "img"])
    );
    n1.wait_running("whoami", 1);
    n1.ctl_ok(&["service", "rm", "img"]);
    drop(d1);
    let _ = std::fs::remove_dir_all(&work);
}
