//! Tasks outlive the router: a node's overlayd is killed (kill -9) or stopped (SIGTERM) and
//! started again, and its tasks are the same processes before and after, their TCP
//! connections across the overlay intact; `--stop-tasks` stops them with the daemon. Two
//! nodes on a bridged underlay (198.18.3.0/24), one shared cluster. Needs root.
//!
//! Traffic: an echo service and a client service, two tasks each (one per node). Each client
//! holds one TCP connection to each echo task (one to its own node, one across the
//! underlay) and one to the echo service's VIP (its flow in the load balancer's table of
//! the client's node, which the restarted node resumes from its saved flows), and sends a
//! line on each every 100 ms, printing every round trip and the gap
//! since the previous one into its log, which its shim writes while overlayd is away.

use overlay_e2e::rounds::{
    all_running, create_services, gaps_and_errors, last_seqs, pids, wait_rounds, CLIENT_PY,
    ECHO_PY, TASKS,
};
use overlay_e2e::{require_root, script_dir, unique, wait_for, write_script, Node, Underlay};
use std::time::{Duration, Instant};

fn alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn tasks_outlive_the_router() {
    if !require_root("tasks_outlive_the_router") {
        return;
    }
    let tag = unique("rs");
    let u = Underlay::new(&tag, 2, 3);
    let (a, mut b) = Node::pair(&tag, &u);
    let dir = script_dir(&tag);
    let echo = write_script(&dir, "echo.py", ECHO_PY);
    let client = write_script(&dir, "client.py", CLIENT_PY);
    a.ctl_ok(&["network", "create", "--subnet", "10.0.31.0/24", "net"]);
    // The echo tasks' health check notes each run, so the test sees checks resume on
    // adopted tasks.
    let checks = dir.join("checks");
    std::fs::create_dir_all(&checks).expect("checks dir");
    let check = format!("echo x >> {}/$OVERLAY_TASK_NAME", checks.display());
    create_services(
        &a,
        &echo,
        &client,
        &["--health-cmd", &check, "--health-interval", "1s"],
    );
    let checks_of =
        |task: &str| std::fs::read_to_string(checks.join(task)).map_or(0, |s| s.lines().count());
    assert!(
        wait_for(Duration::from_secs(20), || all_running(&a)),
        "{}",
        a.ctl_ok(&["service", "ps", "client"])
    );
    let nodes_of: Vec<String> = TASKS.iter().map(|t| a.node_of(t)).collect();
    assert!(
        nodes_of[0] != nodes_of[1] && nodes_of[2] != nodes_of[3],
        "one task of each service per node: {nodes_of:?}"
    );
    let before = pids(&a);
    assert!(before.iter().all(Option::is_some), "{before:?}");
    let both = [&a, &b];
    assert!(
        wait_rounds(&both, &[0, 0], 10),
        "clients not talking: {:?}\n{}",
        gaps_and_errors(&both, &[0, 0]).1,
        b.log()
    );

    // (1) kill -9 of b's overlayd, then start: the same processes, the connections go on.
    b.remove_flag("--token", true);
    b.remove_flag("--join", true);
    let seqs = last_seqs(&[&a, &b]);
    let killed = Instant::now();
    b.kill();
    b.start_again();
    let started = killed.elapsed();
    assert!(
        wait_rounds(&[&a, &b], &seqs, 20),
        "clients stalled after kill -9: {:?}\n{}",
        gaps_and_errors(&[&a, &b], &seqs),
        b.log()
    );
    let (gap, errors) = gaps_and_errors(&[&a, &b], &seqs);
    assert!(errors.is_empty(), "connections broke: {errors:?}");
    assert!(wait_for(Duration::from_secs(10), || all_running(&a)));
    assert_eq!(pids(&a), before, "the tasks were restarted");
    eprintln!("kill -9, start: overlayd up again after {started:?}; longest gap {gap} ms");
    assert!(gap < 2_000, "a {gap} ms stall over kill -9 and start");
    assert!(b.log().contains("task adopted"), "{}", b.log());
    // b's client's flow to the VIP was in b's table: the new run resumed it.
    assert!(
        b.log()
            .contains("resuming the previous run's flows flows=1"),
        "{}",
        b.log()
    );
    // Health checks resume on the adopted echo task of b: two more runs, and healthy.
    let echo_b = ["echo.1", "echo.2"]
        .into_iter()
        .find(|t| a.node_of(t) == b.name)
        .expect("an echo task on b");
    let ran = checks_of(echo_b);
    assert!(
        wait_for(Duration::from_secs(10), || checks_of(echo_b) >= ran + 2
            && a.task_view(echo_b)["status"]["health"] == "healthy"),
        "no health checks on the adopted {echo_b}: {}",
        a.task_view(echo_b)
    );

    // (2) SIGTERM, then start: the same.
    let seqs = last_seqs(&[&a, &b]);
    let stopped = Instant::now();
    assert!(b.stop(), "overlayd did not exit on SIGTERM");
    assert!(
        before.iter().flatten().all(|p| alive(*p)),
        "SIGTERM stopped tasks"
    );
    b.start_again();
    let started = stopped.elapsed();
    assert!(
        wait_rounds(&[&a, &b], &seqs, 20),
        "clients stalled after SIGTERM: {:?}\n{}",
        gaps_and_errors(&[&a, &b], &seqs),
        b.log()
    );
    let (gap, errors) = gaps_and_errors(&[&a, &b], &seqs);
    assert!(errors.is_empty(), "connections broke: {errors:?}");
    assert!(wait_for(Duration::from_secs(10), || all_running(&a)));
    assert_eq!(pids(&a), before, "the tasks were restarted");
    eprintln!("SIGTERM, start: overlayd up again after {started:?}; longest gap {gap} ms");
    assert!(gap < 2_000, "a {gap} ms stall over SIGTERM and start");

    // (3) Removing a service still stops its tasks, adopted ones too.
    let on_b = |tasks: &[&str]| -> Vec<u64> {
        tasks
            .iter()
            .filter(|t| a.node_of(t) == b.name)
            .filter_map(|t| before[TASKS.iter().position(|x| x == t).unwrap()])
            .collect()
    };
    let client_on_b = on_b(&["client.1", "client.2"]);
    assert_eq!(client_on_b.len(), 1);
    a.ctl_ok(&["service", "rm", "client"]);
    assert!(
        wait_for(Duration::from_secs(15), || !alive(client_on_b[0])
            && !b.task_namespaces().iter().any(|n| n.contains("client"))),
        "the adopted client still runs: {:?}",
        b.task_namespaces()
    );

    // (4) --stop-tasks: this shutdown stops b's tasks, namespaces and all.
    let echo_on_b = on_b(&["echo.1", "echo.2"]);
    assert_eq!(echo_on_b.len(), 1);
    b.extra_args.push("--stop-tasks".into());
    assert!(b.stop());
    b.start_again();
    assert!(wait_for(Duration::from_secs(10), || b
        .log()
        .matches("task adopted")
        .count()
        >= 5));
    assert!(b.stop(), "overlayd did not exit on SIGTERM");
    assert!(
        wait_for(Duration::from_secs(5), || !alive(echo_on_b[0])),
        "--stop-tasks left the process running"
    );
    assert!(b.task_namespaces().is_empty(), "{:?}", b.task_namespaces());
}
