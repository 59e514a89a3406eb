//! Rolling changes of `web` under the load rig ([`super`]): [`roll`] runs one (an update, a
//! rollback) and checks what the clients saw; [`Inflight`] is a download whose task the
//! change replaces while it runs.

use super::{epoch, log_of, who, Bg, Rig};
use overlay_e2e::{run, wait_for, Node};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The current tasks of `web` (`/tasks?service=web`: not the history) as `(slot, name, id)`;
/// empty if the API did not answer.
fn web_tasks(n: &Node) -> Vec<(u64, String, String)> {
    let out = run(Command::new("curl")
        .args(["-s", "--max-time", "2", "--unix-socket"])
        .arg(&n.socket)
        .arg("http://overlay/tasks?service=web"));
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    all.iter()
        .map(|t| {
            let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
            (t["slot"].as_u64().unwrap_or_default(), s("name"), s("id"))
        })
        .collect()
}

/// How long a download goes on after its task was replaced before its client ends it:
/// longer than a node keeps a leaving task before it counts its connections
/// (`SETTLE_LEFT`, 2 s), so the drain has to wait for it, and well inside the stop grace
/// period (10 s).
const AFTER_LEFT: f64 = 3.0;

impl Rig<'_> {
    /// An endless download from the current task of `slot` of `web`, to be ended
    /// [`AFTER_LEFT`] after that task is replaced.
    pub fn inflight(&self, slot: u64) -> Inflight {
        let (_, task, id) = web_tasks(self.manager)
            .into_iter()
            .find(|t| t.0 == slot)
            .unwrap_or_else(|| panic!("no task in slot {slot} of web"));
        let stop = self.dir.join(format!("stop-{id}"));
        let bg = self.download(&task, "web", "0", &stop);
        Inflight {
            bg,
            task,
            id,
            stop,
            left: None,
        }
    }
}

/// A download whose task a rolling change replaces while it runs.
pub struct Inflight {
    bg: Bg,
    /// The task serving it, and its id.
    pub task: String,
    id: String,
    /// The file that tells its client to end it.
    stop: PathBuf,
    /// When its task left the service's current tasks.
    left: Option<f64>,
}

/// One rolling change of `web` (3 replicas, parallelism 1) under the load: `overlayctl
/// COMMAND`, which waits until the service converges. Besides `inflight`, a download from the
/// slot the change replaces last runs from before the change until [`AFTER_LEFT`] after its
/// task left. Asserts: the change converges; no request fails from its start until 30
/// requests of each client came after convergence; every one of those comes from `V=v`, and
/// from all three new tasks; every download is intact. Prints what it measured.
pub fn roll(rig: &Rig, what: &str, command: &str, v: &str, mut inflight: Vec<Inflight>) {
    let began = epoch();
    inflight.push(rig.inflight(3));
    let args: Vec<&str> = command.split(' ').collect();
    let cmd = rig.manager.ctl_cmd(&args);
    let cli = std::thread::spawn(move || {
        let mut cmd = cmd;
        (cmd.output(), epoch())
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids: Vec<String> = web_tasks(rig.manager).into_iter().map(|t| t.2).collect();
        let now = epoch();
        for d in &mut inflight {
            if d.left.is_none() && !ids.is_empty() && !ids.contains(&d.id) {
                d.left = Some(now);
            }
            if d.left.is_some_and(|l| now - l >= AFTER_LEFT) && !d.stop.exists() {
                std::fs::write(&d.stop, "").expect("download stop file");
            }
        }
        if cli.is_finished() && inflight.iter().all(|d| d.stop.exists()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not converged after 60 s, or a download's task not replaced: {}",
            rig.manager.ctl_ok(&["service", "ps", "web"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (out, converged) = cli.join().expect("overlayctl thread");
    let out = out.expect("overlayctl");
    let progress = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && progress.contains("verify: Service converged"),
        "{what}: {progress}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut downloads = Vec::new();
    for d in inflight {
        let got = d.bg.finish();
        let left = d.left.unwrap_or_default() - began;
        assert!(
            got.starts_with(&format!("intact {} ", d.task)),
            "{what}: the download from {} (replaced {left:.1} s into the change): {got}",
            d.task
        );
        downloads.push(format!("{} replaced at {left:.1} s, then {got}", d.task));
    }
    let after = |log: &Path| log_of(log).iter().filter(|(t, _)| *t > converged).count();
    assert!(
        wait_for(Duration::from_secs(10), || after(&rig.vip_log) >= 30
            && after(&rig.mesh_log) >= 30),
        "{what}: no load after convergence"
    );
    let ended = epoch();
    let mut counts = Vec::new();
    for (via, path) in [("VIP", &rig.vip_log), ("mesh", &rig.mesh_log)] {
        let log = log_of(path);
        let during: Vec<&(f64, String)> = log
            .iter()
            .filter(|(t, _)| *t >= began && *t < ended)
            .collect();
        let failed: Vec<_> = during
            .iter()
            .filter(|(_, r)| r.starts_with("ERR"))
            .collect();
        assert!(
            failed.is_empty(),
            "{what}: failed requests through the {via}: {failed:?}"
        );
        let since: Vec<&str> = during
            .iter()
            .filter(|(t, _)| *t > converged)
            .map(|(_, r)| r.as_str())
            .collect();
        let stale: Vec<&&str> = since
            .iter()
            .filter(|r| !r.ends_with(&format!(" V={v}")))
            .collect();
        assert!(
            stale.is_empty(),
            "{what}: answers through the {via} after convergence not from V={v}: {stale:?}"
        );
        let tasks: BTreeSet<&str> = since.iter().map(|r| who(r)).collect();
        assert_eq!(
            tasks.len(),
            3,
            "{what}: tasks answering through the {via} after convergence: {tasks:?}"
        );
        counts.push(format!(
            "{via} {} requests, {} failed, {} after convergence all V={v}",
            during.len(),
            failed.len(),
            since.len()
        ));
    }
    eprintln!(
        "{what}: converged {:.1} s after it began; {}; downloads: {}",
        converged - began,
        counts.join("; "),
        downloads.join("; ")
    );
}
