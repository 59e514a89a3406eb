//! Services from container images (`service create --image`): two nodes, each with its own
//! dockerd (`overlay_e2e::dockerd`: the node's network namespace, a private mount namespace
//! whose /run/docker/plugins is the node's plugin directory), busybox imported as `bb:1`
//! and `bb:2`. Needs root and dockerd.
//!
//! Checked: two replicas of `bb:1` running busybox httpd, published on 8080, answer on both
//! nodes' 8080 and through the VIP from a process task; `docker ps` on each node shows its
//! container named `web.SLOT.TASKID`, labelled with service and task; `nslookup` of another
//! service inside a container answers its VIP; a container killed with `docker kill` is
//! replaced; `service logs` (and `-f`) shows each node's task output with Docker's prefix;
//! `service update --image bb:2` rolls both tasks with no failed request through
//! the mesh meanwhile; a missing image fails its task with the engine's message in
//! `service ps`; `--restart-condition on-failure --restart-max-attempts 1` replaces a failed
//! container once, then leaves it failed; `service rm` removes the containers; a node whose engine stops reports its
//! image task failed with that reason, while process tasks run on.

use overlay_e2e::dockerd::{busybox_rootfs, Dockerd};
use overlay_e2e::{require_root, unique, wait_for, write_script, Node, Underlay, WHOAMI_PY};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    if Command::new("dockerd").arg("--version").output().is_err() {
        panic!("dockerd is not installed (scripts/install-deps.sh installs docker.io)");
    }
    let tag = unique("im");
    let work = std::env::temp_dir().join(format!("overlay-e2e-{tag}-images"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let whoami = write_script(&work, "whoami.py", WHOAMI_PY);
    let rootfs = work.join("rootfs");
    busybox_rootfs(&rootfs);

    let u = Underlay::new(&tag, 2, 13);
    let plugins: Vec<PathBuf> = (1..=2).map(|i| work.join(format!("plugins{i}"))).collect();
    let docks: Vec<PathBuf> = (1..=2).map(|i| work.join(format!("dockerd{i}"))).collect();
    let flags = |i: usize| {
        vec![
            "--docker-plugin".to_string(),
            plugins[i].join("overlayd.sock").display().to_string(),
            "--docker-host".to_string(),
            docks[i].join("docker.sock").display().to_string(),
        ]
    };
    let f1 = flags(0);
    let f2 = flags(1);
    let f1: Vec<&str> = f1.iter().map(String::as_str).collect();
    let f2: Vec<&str> = f2.iter().map(String::as_str).collect();
    let n1 = Node::manager_with(&format!("{tag}a"), &u, 1, &f1);
    let n2 = Node::worker_with(&format!("{tag}b"), &u, 2, &n1, &f2);
    n1.wait_ready(&[&n2]);
    let d1 = Dockerd::start(&docks[0], &u.host(1).path(), &plugins[0]);
    let d2 = Dockerd::start(&docks[1], &u.host(2).path(), &plugins[1]);
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

    // docker kill: the task fails and its container is replaced.
    dockerd_of(&node1).ok(&["kill", &c1]);
    assert!(
        wait_for(Duration::from_secs(30), || {
            let v = n1.task_view("web.1");
            v["status"]["state"] == "running" && v["status"]["restarts"].as_u64() >= Some(1)
        }),
        "web.1 replaced after docker kill:\n{}",
        n1.ctl_ok(&["service", "ps", "web"])
    );
    assert_eq!(
        fetch_from(&u.host(1).path(), &format!("http://{}:8080/", u.addr(1))).len(),
        5,
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
