//! Highly available managers (issue 19): three managers share the desired state on a
//! three-member etcd cluster (one member per manager host), one of them leads, the others
//! forward changes to it. Needs root, and etcd (`scripts/install-deps.sh`).
//!
//! - `leader_killed_another_takes_over_and_no_change_is_lost`: 3 managers (drained) and 2
//!   workers; a TCP stream between tasks on the two workers runs through the whole test.
//!   Three times: the leader is killed (-9), another manager leads within 10 s, a change
//!   through a survivor works again, while a loop of creates and scales runs on the
//!   survivors; the killed one comes back as a follower. At the end every acknowledged
//!   change is in the state, all managers agree on it, every service runs as many tasks as
//!   it asks for, and the stream never stalled for 1 s.
//! - `etcd_quorum_lost_changes_refused_then_work_again`: two etcd members stopped: tasks
//!   keep talking, a change is refused within 5 s saying why; the members back, changes work
//!   again.
//!
//! The two tests share the machine's cores and measure latencies, so they run one at a time.
//! Underlay: 198.18.15.0/24 and 198.18.16.0/24.

use overlay_e2e::etcd::{require_etcd, Etcd};
use overlay_e2e::{
    bin, pings, require_root, run, script_dir, unique, wait_for, write_script, Node, Underlay,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One test at a time (see the module doc).
static SERIAL: Mutex<()> = Mutex::new(());

/// Managers on hosts 1..=3 (each beside an etcd member), workers on the hosts after. Fields
/// drop in order: daemons, then etcd, then the namespaces.
struct Cluster {
    managers: Vec<Node>,
    workers: Vec<Node>,
    etcd: Vec<Etcd>,
    /// Held for its namespaces, removed last.
    _underlay: Underlay,
}

impl Cluster {
    fn start(tag: &str, net: u8, workers: usize) -> Cluster {
        let u = Underlay::new(tag, 3 + workers, net);
        let cluster: Vec<String> = (1..=3)
            .map(|i| format!("e{i}=http://{}:2380", u.addr(i)))
            .collect();
        let mut etcd: Vec<Etcd> = (1..=3)
            .map(|i| {
                let name = format!("e{i}");
                Etcd::new(&name, &u.host(i).name, &u.addr(i), &cluster.join(","), tag)
            })
            .collect();
        // All three before any is asked: a lone member has no quorum.
        etcd.iter_mut().for_each(Etcd::spawn);
        etcd.iter().for_each(Etcd::wait_healthy);
        let endpoints: Vec<&str> = etcd.iter().map(|e| e.url.as_str()).collect();
        let endpoints = endpoints.join(",");
        let store = ["--store", "etcd", "--etcd-endpoints", &endpoints];

        let m1 = Node::manager_with(&format!("{tag}m1"), &u, 1, &store);
        let token = m1.ctl_ok(&["cluster", "join-token", "manager", "-q"]);
        let join = format!("{}:2377", u.addr(1));
        let mut managers = vec![m1];
        for i in 2..=3 {
            let addr = u.addr(i);
            let mut args = vec!["--advertise-addr", &addr, "--join", &join];
            args.extend(["--token", token.trim()]);
            args.extend(store);
            let name = format!("{tag}m{i}");
            managers.push(Node::start_in(&name, Some(u.host(i).path()), &args));
        }
        let workers: Vec<Node> = (1..=workers)
            .map(|i| Node::worker(&format!("{tag}w{i}"), &u, 3 + i, &managers[0]))
            .collect();
        let all: Vec<&Node> = managers.iter().chain(&workers).collect();
        managers[0].wait_ready(&all);
        for (nodes, role) in [(&managers, "manager"), (&workers, "worker")] {
            for n in nodes {
                assert_eq!(n.json(&["info"])["role"], role, "{}", n.name);
            }
        }
        Cluster {
            managers,
            workers,
            etcd,
            _underlay: u,
        }
    }

    fn manager_names(&self) -> Vec<String> {
        self.managers.iter().map(|m| m.name.clone()).collect()
    }

    /// The node called `name`.
    fn node(&self, name: &str) -> &Node {
        self.managers
            .iter()
            .chain(&self.workers)
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Index of the manager all managers agree leads (10 s at most).
    fn leader(&self) -> usize {
        let names = self.manager_names();
        let asked: Vec<&Node> = self.managers.iter().collect();
        let mut found = None;
        let agreed = wait_for(Duration::from_secs(10), || {
            found = agreed_leader(&asked, &names);
            found.is_some()
        });
        assert!(
            agreed,
            "the managers do not agree on a leader: {}",
            self.leader_views()
        );
        let leader = found.unwrap_or_default();
        names.iter().position(|n| *n == leader).unwrap_or_default()
    }

    /// Who each manager says leads, for failure messages.
    fn leader_views(&self) -> String {
        let names = self.manager_names();
        self.managers
            .iter()
            .map(|m| format!("{}: {:?}", m.name, leaders_seen_by(m, &names)))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// What one overlayctl call did.
struct Answer {
    ok: bool,
    said: String,
    took: Duration,
}

/// overlayctl on `node`, killed after `limit` (a call that hangs is not an answer).
fn ctl_within(node: &Node, args: &[&str], limit: Duration) -> Answer {
    let t = Instant::now();
    let o: Output = run(Command::new("timeout")
        .args(["-s", "KILL", &format!("{:.1}", limit.as_secs_f64())])
        .arg(bin("overlayctl"))
        .arg("--socket")
        .arg(&node.socket)
        .args(args));
    let said = if o.status.success() {
        String::from_utf8_lossy(&o.stdout).into_owned()
    } else {
        String::from_utf8_lossy(&o.stderr).trim().to_string()
    };
    Answer {
        ok: o.status.success(),
        said,
        took: t.elapsed(),
    }
}

/// Names of the managers `on` reports with `ManagerStatus.Leader`; None if it did not answer.
fn leaders_seen_by(on: &Node, managers: &[String]) -> Option<Vec<String>> {
    let mut args = vec!["node", "inspect"];
    args.extend(managers.iter().map(String::as_str));
    let a = ctl_within(on, &args, Duration::from_secs(3));
    let v: Value = serde_json::from_str(&a.said).ok().filter(|_| a.ok)?;
    Some(
        v.as_array()?
            .iter()
            .filter(|n| n["ManagerStatus"]["Leader"] == true)
            .filter_map(|n| n["ID"].as_str().map(str::to_string))
            .collect(),
    )
}

/// The one manager every node in `asked` reports as leader, if they all agree.
fn agreed_leader(asked: &[&Node], managers: &[String]) -> Option<String> {
    let mut agreed: Option<String> = None;
    for n in asked {
        let seen = leaders_seen_by(n, managers)?;
        let [one] = seen.as_slice() else { return None };
        if agreed.get_or_insert_with(|| one.clone()) != one {
            return None;
        }
    }
    agreed
}

/// What all managers must agree on: network names, and each service's id, spec and VIPs.
type DesiredState = (Vec<String>, BTreeMap<String, Value>);

fn desired_state(on: &Node) -> Option<DesiredState> {
    let limit = Duration::from_secs(5);
    let nets = ctl_within(on, &["network", "ls", "-q"], limit);
    let names = ctl_within(on, &["service", "ls", "-q"], limit);
    if !nets.ok || !names.ok {
        return None;
    }
    let mut nets: Vec<String> = nets.said.lines().map(str::to_string).collect();
    nets.sort();
    let mut services = BTreeMap::new();
    let names: Vec<&str> = names.said.lines().filter(|l| !l.is_empty()).collect();
    if !names.is_empty() {
        let mut args = vec!["service", "inspect"];
        args.extend(&names);
        let a = ctl_within(on, &args, limit);
        let v: Value = serde_json::from_str(&a.said).ok().filter(|_| a.ok)?;
        for s in v.as_array()? {
            let stable =
                serde_json::json!({"ID": s["ID"], "Spec": s["Spec"], "Endpoint": s["Endpoint"]});
            services.insert(s["Spec"]["Name"].as_str()?.to_string(), stable);
        }
    }
    Some((nets, services))
}

/// `service ps NAME`: the nodes of its current tasks (desired running).
fn current_task_nodes(on: &Node, service: &str) -> Option<Vec<String>> {
    let a = ctl_within(on, &["service", "ps", service], Duration::from_secs(5));
    a.ok.then(|| {
        a.said
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|t| t.len() > 3 && t[1] != "\\_" && t[3] == "Running")
            .map(|t| t[2].to_string())
            .collect()
    })
}

/// A receiver in a task: listens on 7100, touches READY, takes one stream of numbered
/// lines and prints how many arrived, whether in order, and the largest gap between two
/// received chunks. Touches FLOWING after 10 lines. 5 s of silence ends it.
const RECV_PY: &str = r#"
import socket, sys, time
flowing, ready = sys.argv[1], sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7100))
s.listen(1)
s.settimeout(30)
open(ready, "w").close()
c, _ = s.accept()
c.settimeout(5)
last, gap, buf, lines, seq, in_order, stalled = None, 0.0, b"", 0, -1, True, False
while True:
    try:
        d = c.recv(4096)
    except socket.timeout:
        stalled, gap = True, max(gap, 5.0)
        break
    if not d:
        break
    now = time.monotonic()
    if last is not None:
        gap = max(gap, now - last)
    last = now
    buf += d
    *done, buf = buf.split(b"\n")
    for l in done:
        in_order = in_order and int(l) == seq + 1
        seq, lines = int(l), lines + 1
        if lines == 10:
            open(flowing, "w").close()
print(f"lines={lines} in_order={in_order} stalled={stalled} max_gap_ms={gap * 1000:.0f}", flush=True)
"#;

/// A sender in a task: a numbered line every 50 ms to HOST:PORT until the file STOP exists
/// or SECS pass; prints how many it sent and whether STOP ended it.
const SEND_PY: &str = r#"
import socket, sys, time, os
host, port, stop, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.create_connection((host, port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
end, n = time.monotonic() + secs, 0
while time.monotonic() < end and not os.path.exists(stop):
    s.sendall(f"{n}\n".encode())
    n += 1
    time.sleep(0.05)
s.close()
print(f"sent={n} stopped={os.path.exists(stop)}", flush=True)
"#;

/// Waits (bounded) for a background client and returns its stdout; kills it past `limit`.
fn finish(mut child: Child, limit: Duration, what: &str) -> String {
    let done = wait_for(limit, || matches!(child.try_wait(), Ok(Some(_))));
    if !done {
        let _ = child.kill();
    }
    let o = child.wait_with_output().expect("client output");
    let said = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(
        done && o.status.success(),
        "{what}: {said} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    said
}

/// `key=value` out of a client's summary line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_default()
}

/// A change the churn loop made, and whether overlayctl acknowledged it (exit 0).
struct ChurnOp {
    round: usize,
    service: String,
    /// The replicas the change asked for (a create asks for 1).
    replicas: u32,
    create: bool,
    acked: bool,
    done_at: Instant,
}

/// Creates and scales, one every 200 ms, round-robin on the managers it is given.
#[derive(Default)]
struct Churn {
    ops: Vec<ChurnOp>,
    /// Services whose create was acknowledged: the ones scaled.
    created: Vec<String>,
}

impl Churn {
    const MAX_OPS: usize = 250;
    const MAX_CREATES: usize = 4;

    /// Runs until `stop`, 45 s or MAX_OPS; counts this round's acknowledged ops in `acked`.
    fn run(&mut self, round: usize, on: &[&Node], stop: &AtomicBool, acked: &AtomicUsize) {
        let end = Instant::now() + Duration::from_secs(45);
        let mut creates = 0;
        for k in 0..Self::MAX_OPS {
            if stop.load(Ordering::Relaxed) || Instant::now() > end {
                break;
            }
            let started = Instant::now();
            let create = creates < Self::MAX_CREATES && (self.created.is_empty() || k % 4 == 0);
            if create || !self.created.is_empty() {
                let (service, replicas) = if create {
                    creates += 1;
                    (format!("c{round}x{k}"), 1)
                } else {
                    let s = self.created[(k / 2) % self.created.len()].clone();
                    (s, 1 + (k as u32 % 2))
                };
                let n = replicas.to_string();
                let scale = format!("{service}={n}");
                #[rustfmt::skip]
                let args: Vec<&str> = if create {
                    vec!["service", "create", "--name", &service, "--network", "app",
                        "--replicas", &n, "--", "sleep", "infinity"]
                } else {
                    vec!["service", "scale", &scale]
                };
                let a = ctl_within(on[k % on.len()], &args, Duration::from_secs(8));
                if a.ok {
                    acked.fetch_add(1, Ordering::Relaxed);
                    if create {
                        self.created.push(service.clone());
                    }
                }
                self.ops.push(ChurnOp {
                    round,
                    service,
                    replicas,
                    create,
                    acked: a.ok,
                    done_at: Instant::now(),
                });
            }
            std::thread::sleep(Duration::from_millis(200).saturating_sub(started.elapsed()));
        }
    }

    /// Longest time in `round` between two acknowledged ops: how long changes were refused.
    fn longest_refusal(&self, round: usize) -> Duration {
        let acked: Vec<Instant> = self
            .ops
            .iter()
            .filter(|o| o.round == round && o.acked)
            .map(|o| o.done_at)
            .collect();
        acked
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// Acknowledged ⇒ present: every acknowledged create exists, and each service's
    /// replicas are its last acknowledged value, or the value of an op whose outcome the
    /// loop never learnt (it may have landed at any time after it was sent).
    fn check(&self, state: &BTreeMap<String, Value>) {
        let mut by_service: BTreeMap<&str, Vec<&ChurnOp>> = BTreeMap::new();
        for o in &self.ops {
            by_service.entry(&o.service).or_default().push(o);
        }
        for (service, ops) in by_service {
            let Some(spec) = state.get(service) else {
                assert!(
                    !ops.iter().any(|o| o.create && o.acked),
                    "{service}: acknowledged create lost"
                );
                continue;
            };
            let replicas = spec["Spec"]["Replicas"].as_u64().unwrap_or(u64::MAX) as u32;
            let last_acked = ops.iter().rev().find(|o| o.acked).map(|o| o.replicas);
            let allowed: Vec<u32> = last_acked
                .into_iter()
                .chain(ops.iter().filter(|o| !o.acked).map(|o| o.replicas))
                .collect();
            assert!(
                allowed.contains(&replicas),
                "{service}: {replicas} replicas, but the last acknowledged change asked for \
                 {last_acked:?} (unacknowledged ones: {allowed:?})"
            );
        }
    }
}

/// Sets the flag when dropped: a failing test stops its churn thread.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The first change acknowledged through one of `on` (a fresh network per attempt, so a
/// create that landed unacknowledged never makes a retry fail); its name and when.
fn first_change(on: &[&Node], prefix: &str, limit: Duration) -> Option<(String, Instant)> {
    let end = Instant::now() + limit;
    for attempt in 0usize.. {
        if Instant::now() > end {
            return None;
        }
        let started = Instant::now();
        let name = format!("{prefix}n{attempt}");
        let a = ctl_within(
            on[attempt % on.len()],
            &["network", "create", &name],
            Duration::from_secs(5),
        );
        if a.ok {
            return Some((name, Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(200).saturating_sub(started.elapsed()));
    }
    None
}

/// What one kill of the leader measured.
struct Round {
    killed: String,
    new_leader: String,
    /// From the kill until the survivors agree on a new leader.
    takeover: Duration,
    /// From the kill until a change through a survivor is acknowledged.
    first_change: Duration,
    /// That change: a network.
    probe: String,
}

/// One round: with the churn loop running on the other managers, kills the leader (-9),
/// waits for a survivor to lead (10 s) and for a change through a survivor (20 s), and
/// restarts the killed one, which must come back as a follower without a token.
fn kill_the_leader(c: &mut Cluster, round: usize, churn: &mut Churn) -> Round {
    let names = c.manager_names();
    let killed = names[c.leader()].clone();
    let stop = AtomicBool::new(false);
    let acked = AtomicUsize::new(0);
    let (mut victim, survivors): (Vec<&mut Node>, Vec<&mut Node>) =
        c.managers.iter_mut().partition(|m| m.name == killed);
    let victim = victim.pop().expect("the leader");
    let survivors: Vec<&Node> = survivors.into_iter().map(|m| &*m).collect();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let (on, stop, acked) = (&survivors, &stop, &acked);
        let looping = s.spawn(move || churn.run(round, on, stop, acked));
        // Changes acknowledged just before the kill are the ones most at risk.
        let some_acked = || acked.load(Ordering::Relaxed) >= 2;
        assert!(
            wait_for(Duration::from_secs(10), some_acked),
            "round {round}: the churn loop made no change before the kill"
        );
        let killed_at = Instant::now();
        victim.kill();
        let mut new_leader = None;
        let took_over = wait_for(Duration::from_secs(10), || {
            new_leader = agreed_leader(&survivors, &names).filter(|l| *l != killed);
            new_leader.is_some()
        });
        let takeover = killed_at.elapsed();
        assert!(
            took_over,
            "round {round}: no survivor leads 10 s after {killed} was killed"
        );
        let probe = first_change(&survivors, &format!("p{round}"), Duration::from_secs(20));
        let (probe, at) = probe.unwrap_or_else(|| {
            panic!("round {round}: no change through a survivor within 20 s of the kill")
        });

        victim.remove_flag("--init", false);
        victim.remove_flag("--join", true);
        victim.remove_flag("--token", true);
        victim.restart();
        let mut asked = survivors.clone();
        asked.push(&*victim);
        let back = wait_for(Duration::from_secs(20), || {
            agreed_leader(&asked, &names) == new_leader
        });
        assert!(
            back,
            "round {round}: {killed} did not come back as a follower of {new_leader:?}:\n{}",
            victim.log()
        );
        assert_eq!(victim.json(&["info"])["role"], "manager");
        stop.store(true, Ordering::Relaxed);
        looping.join().expect("churn loop");
        Round {
            killed: killed.clone(),
            new_leader: new_leader.unwrap_or_default(),
            takeover,
            first_change: at - killed_at,
            probe,
        }
    })
}

#[test]
fn leader_killed_another_takes_over_and_no_change_is_lost() {
    const TEST: &str = "leader_killed_another_takes_over_and_no_change_is_lost";
    if !require_root(TEST) || !require_etcd(TEST) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let tag = unique("ha");
    let dir = script_dir(&tag);
    let recv = write_script(&dir, "recv.py", RECV_PY);
    let send = write_script(&dir, "send.py", SEND_PY);
    let mut c = Cluster::start(&tag, 15, 2);
    let setup = started.elapsed();
    let names = c.manager_names();
    let workers: Vec<String> = c.workers.iter().map(|w| w.name.clone()).collect();

    // Every task on the workers; changes from a worker are refused.
    for m in &names {
        c.managers[0].ctl_ok(&["node", "update", "--availability", "drain", m]);
    }
    let err = c.workers[0].ctl_err(&["network", "create", "nope"]);
    assert!(err.contains("this node is a worker"), "{err}");

    // Through followers: a network, and a service with a task on each worker.
    let leader = c.leader();
    let f = (leader + 1) % 3;
    c.managers[f].ctl_ok(&["network", "create", "--subnet", "10.0.75.0/24", "app"]);
    #[rustfmt::skip]
    c.managers[(f + 1) % 3].ctl_ok(&["service", "create", "--name", "stream", "--network", "app",
        "--replicas", "2", "--", "sleep", "infinity"]);
    c.managers[leader].wait_running("stream", 2);
    let l = &c.managers[leader];
    let (a, b) = (l.node_of("stream.1"), l.node_of("stream.2"));
    assert!(
        a != b && workers.contains(&a) && workers.contains(&b),
        "{a} {b}"
    );
    let (sender, receiver) = ("stream.1", "stream.2");
    let receiver_ip = l.task_ip(receiver);

    // The stream, for the whole test.
    let flowing = dir.join("flowing");
    let stop = dir.join("stop");
    let rx = c.node(&b).exec_ready(
        receiver,
        &["python3", &recv, &flowing.to_string_lossy()],
        &dir.join("ready"),
    );
    #[rustfmt::skip]
    let tx = c.node(&a).ctl_cmd(&["exec", sender, "--", "python3", &send, &receiver_ip, "7100",
            &stop.to_string_lossy(), "170"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sender");
    assert!(
        wait_for(Duration::from_secs(10), || flowing.exists()),
        "the stream does not flow"
    );

    let mut churn = Churn::default();
    let mut probes = Vec::new();
    for round in 1..=3 {
        let r = kill_the_leader(&mut c, round, &mut churn);
        let ops = churn.ops.iter().filter(|o| o.round == round);
        let (n, ok) = ops.fold((0, 0), |(n, ok), o| (n + 1, ok + o.acked as usize));
        eprintln!(
            "round {round}: killed {}; {} leads after {:?}; first change after {:?}; churn \
             {ok}/{n} acknowledged, longest refusal {:?}",
            r.killed,
            r.new_leader,
            r.takeover,
            r.first_change,
            churn.longest_refusal(round)
        );
        probes.push(r.probe);
    }

    // All managers agree on the state; nothing acknowledged is missing.
    let mut views = Vec::new();
    let agreed = wait_for(Duration::from_secs(30), || {
        views = c.managers.iter().map(desired_state).collect();
        views[0].is_some() && views.iter().all(|v| *v == views[0])
    });
    assert!(agreed, "the managers disagree: {views:#?}");
    let (nets, services) = views[0].clone().unwrap_or_default();
    for p in &probes {
        assert!(nets.contains(p), "acknowledged network {p} lost: {nets:?}");
    }
    churn.check(&services);

    // Converged: every service runs as many tasks as it asks for, all on workers.
    let leader = &c.managers[c.leader()];
    let mut last = String::new();
    let converged = wait_for(Duration::from_secs(60), || {
        services.iter().all(|(name, s)| {
            let want = s["Spec"]["Replicas"].as_u64().unwrap_or_default() as usize;
            let nodes = current_task_nodes(leader, name).unwrap_or_default();
            let a = ctl_within(
                leader,
                &["service", "inspect", name],
                Duration::from_secs(5),
            );
            let v: Value = serde_json::from_str(&a.said).unwrap_or_default();
            let running = v[0]["Running"].as_u64();
            last = format!("{name}: want {want}, tasks on {nodes:?}, running {running:?}");
            nodes.len() == want
                && nodes.iter().all(|n| workers.contains(n))
                && running == Some(want as u64)
        })
    });
    assert!(converged, "not converged: {last}");

    // The stream never stalled.
    std::fs::write(&stop, b"").expect("stop file");
    let sent = finish(tx, Duration::from_secs(10), "sender");
    let got = finish(rx, Duration::from_secs(10), "receiver");
    let gap: u64 = field(&got, "max_gap_ms").parse().unwrap_or(u64::MAX);
    eprintln!("TCP stream: {sent}; {got}");
    assert_eq!(
        field(&sent, "stopped"),
        "True",
        "the stream ended early: {sent}"
    );
    assert_eq!(field(&got, "lines"), field(&sent, "sent"), "{got}");
    assert_eq!(field(&got, "in_order"), "True", "{got}");
    assert!(gap < 1000, "the stream stalled for {gap} ms");

    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "{TEST}: setup {setup:?}, total {:?}, {} services",
        started.elapsed(),
        services.len()
    );
}

#[test]
fn etcd_quorum_lost_changes_refused_then_work_again() {
    const TEST: &str = "etcd_quorum_lost_changes_refused_then_work_again";
    if !require_root(TEST) || !require_etcd(TEST) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let tag = unique("hq");
    let mut c = Cluster::start(&tag, 16, 1);
    let leader = c.leader();
    let follower = (leader + 1) % 3;

    // Two tasks on two nodes that talk.
    c.managers[follower].ctl_ok(&["network", "create", "--subnet", "10.0.76.0/24", "app"]);
    #[rustfmt::skip]
    c.managers[follower].ctl_ok(&["service", "create", "--name", "p", "--network", "app",
        "--replicas", "2", "--", "sleep", "infinity"]);
    let l = &c.managers[leader];
    l.wait_running("p", 2);
    let (a, b) = (l.node_of("p.1"), l.node_of("p.2"));
    assert_ne!(a, b, "placement spreads the two tasks");
    let peer = l.task_ip("p.2");
    assert!(pings(c.node(&a), "p.1", &peer));

    // The two members away from the leader's host stop: no quorum.
    let stopped: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for &i in &stopped {
        c.etcd[i].stop();
    }
    let mut refusals = Vec::new();
    for (via, name) in [(leader, "nq1"), (follower, "nq2")] {
        let m = &c.managers[via];
        let a = ctl_within(m, &["network", "create", name], Duration::from_secs(15));
        eprintln!(
            "quorum lost: {} refused after {:?}: {}",
            m.name, a.took, a.said
        );
        assert!(!a.ok, "a change through {} without etcd quorum", m.name);
        assert!(
            a.took < Duration::from_secs(6),
            "{} took {:?} to refuse",
            m.name,
            a.took
        );
        assert!(
            a.said.contains("etcd") || a.said.contains("state store"),
            "the refusal does not say why: {}",
            a.said
        );
        refusals.push(a.took);
    }
    assert!(
        pings(c.node(&a), "p.1", &peer),
        "forwarding goes on without etcd quorum"
    );

    // The members back: changes work again.
    for &i in &stopped {
        c.etcd[i].spawn();
    }
    for &i in &stopped {
        c.etcd[i].wait_healthy();
    }
    let back = Instant::now();
    let all: Vec<&Node> = c.managers.iter().collect();
    let change = first_change(&all, "back", Duration::from_secs(30));
    let (name, at) = change.expect("a change within 30 s of etcd's quorum coming back");
    eprintln!("quorum back: first change after {:?}", at - back);
    let everywhere = wait_for(Duration::from_secs(10), || {
        all.iter()
            .all(|m| desired_state(m).is_some_and(|(nets, _)| nets.contains(&name)))
    });
    assert!(everywhere, "{name} is not on every manager");
    assert!(pings(c.node(&a), "p.1", &peer));
    eprintln!(
        "{TEST}: refusals {refusals:?}, total {:?}",
        started.elapsed()
    );
}
