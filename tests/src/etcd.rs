//! etcd members for the tests of managers on etcd (Debian's `etcd-server`): each member runs
//! in a namespace of the test's underlay, with its data in a temporary directory; killed on
//! drop, its data removed unless the test failed (then the log's place is printed).

use crate::{out, run, wait_for};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const ETCD: &str = "/usr/bin/etcd";
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// True when etcd is installed; otherwise skips visibly (and fails under CI).
pub fn require_etcd(test: &str) -> bool {
    if Path::new(ETCD).exists() && Path::new(ETCDCTL).exists() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{ETCD} is missing: scripts/install-deps.sh installs etcd-server and etcd-client"
    );
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: no {ETCD}");
    false
}

/// One etcd member.
pub struct Etcd {
    pub name: String,
    netns: String,
    /// Its client URL (`http://ADDR:2379`).
    pub url: String,
    peer: String,
    /// `--initial-cluster`: every member's `NAME=PEER-URL`.
    cluster: String,
    token: String,
    dir: PathBuf,
    pub child: Option<Child>,
}

impl Etcd {
    /// A member `name` of the cluster `cluster` (`NAME=http://ADDR:2380,...`) serving
    /// clients on `addr` in namespace `netns`; not started.
    pub fn new(name: &str, netns: &str, addr: &str, cluster: &str, token: &str) -> Etcd {
        let dir = std::env::temp_dir().join(format!("overlay-e2e-etcd-{token}-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd dir");
        Etcd {
            name: name.to_string(),
            netns: netns.to_string(),
            url: format!("http://{addr}:2379"),
            peer: format!("http://{addr}:2380"),
            cluster: cluster.to_string(),
            token: token.to_string(),
            dir,
            child: None,
        }
    }

    /// A cluster of one, started and healthy.
    pub fn single(netns: &str, addr: &str, token: &str) -> Etcd {
        let cluster = format!("e1=http://{addr}:2380");
        let mut e = Etcd::new("e1", netns, addr, &cluster, token);
        e.spawn();
        e.wait_healthy();
        e
    }

    /// Starts the member (a first start forms the cluster; later ones reuse the data).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("etcd log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, ETCD])
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &self.peer])
            .args(["--initial-advertise-peer-urls", &self.peer])
            .args(["--initial-cluster", &self.cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--max-txn-ops", "2048"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
    }

    /// Starts it again after [`Etcd::stop`] and waits until it answers.
    pub fn launch(&mut self) {
        self.spawn();
        self.wait_healthy();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    pub fn healthy(&self) -> bool {
        self.ctl(&["--command-timeout", "2s", "endpoint", "health"])
            .status
            .success()
    }

    pub fn wait_healthy(&self) {
        assert!(
            wait_for(Duration::from_secs(20), || self.healthy()),
            "etcd {} did not become healthy:\n{}",
            self.name,
            self.log()
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `etcdctl` against this member, in its namespace.
    pub fn ctl(&self, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.netns, ETCDCTL])
            .args(["--endpoints", &self.url])
            .args(args)
            .env("ETCDCTL_API", "3"))
    }

    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(o.status.success(), "etcdctl {args:?}: {}", out(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("etcd {} log kept in {}", self.name, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
