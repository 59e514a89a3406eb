//! One dockerd per node for the end-to-end tests that need Docker Engine (`docker.rs`,
//! `images.rs`): Debian's docker.io with vfs storage, no iptables rules of its own and no
//! bridge, in the node's network namespace and in a private mount namespace whose
//! /run/docker/plugins is that node's plugin directory; and a busybox image imported from
//! Debian's busybox-static. Dropping a `Dockerd` removes its containers and stops it.

use crate::{run, wait_for, Node, Underlay};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// One dockerd in a node's network namespace, with its own mount namespace.
pub struct Dockerd {
    dir: PathBuf,
    pub sock: PathBuf,
    child: Child,
}

impl Dockerd {
    pub fn start(dir: &Path, netns: &Path, plugins: &Path) -> Dockerd {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("dockerd dir");
        let sock = dir.join("docker.sock");
        let script = format!(
            "mkdir -p /run/docker/plugins && mount --bind {plugins} /run/docker/plugins && \
             exec dockerd --data-root {d}/root --exec-root {d}/exec -H unix://{sock} \
             --pidfile {d}/docker.pid --storage-driver=vfs --iptables=false --ip6tables=false \
             --bridge=none --ip-masq=false",
            plugins = plugins.display(),
            d = dir.display(),
            sock = sock.display()
        );
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("dockerd log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args([
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let d = Dockerd {
            dir: dir.to_path_buf(),
            sock,
            child,
        };
        let up = wait_for(Duration::from_secs(60), || {
            d.docker(&["version"]).status.success()
        });
        assert!(up, "dockerd did not come up: {}", d.log());
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        run(Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(
            o.status.success(),
            "docker {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// `wget -q -O - URL` in `container`: the body, or "" if it failed.
    pub fn fetch(&self, container: &str, url: &str) -> String {
        let o = self.docker(&["exec", container, "wget", "-q", "-O", "-", url]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    pub fn ip_of(&self, container: &str) -> String {
        self.ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            container,
        ])
    }

    /// Imports busybox (Debian's static build) as image `tag`.
    pub fn import_busybox(&self, rootfs: &Path, tag: &str) {
        let tar = Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .args(["-c", "."])
            .output()
            .expect("tar");
        let mut import = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(["import", "-", tag])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("docker import");
        import
            .stdin
            .take()
            .expect("stdin")
            .write_all(&tar.stdout)
            .expect("feed the image");
        assert!(import.wait().expect("docker import").success());
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("docker.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
                let gone = wait_for(Duration::from_secs(15), || {
                    nix::sys::signal::kill(pid, None).is_err()
                });
                if !gone {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A busybox root filesystem: the static binary and the applets the test uses.
pub fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("rootfs");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
    for applet in [
        "sh", "sleep", "ping", "httpd", "wget", "nslookup", "ip", "echo", "cat", "hostname", "env",
    ] {
        let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
    }
}

/// The rig of the Docker tests: two nodes on a bridged underlay (manager `n1`, worker
/// `n2`), each with its own dockerd (`d1`, `d2`) whose network plugin is that node's
/// overlayd, and a busybox root filesystem (`rootfs`) to import; `work` holds their files.
/// Fields drop in order: the dockerds, then the nodes, then the underlay.
pub struct DockerPair {
    pub d2: Dockerd,
    pub d1: Dockerd,
    pub n2: Node,
    pub n1: Node,
    pub u: Underlay,
    pub rootfs: PathBuf,
    /// The nodes' plugin directories (`overlayd.sock` in each).
    pub plugins: Vec<PathBuf>,
    pub work: PathBuf,
}

impl DockerPair {
    /// Starts it, named after `tag`, its files in a temporary directory named after `what`,
    /// its underlay 198.18.`net`.0/24.
    pub fn start(tag: &str, what: &str, net: u8) -> DockerPair {
        if Command::new("dockerd").arg("--version").output().is_err() {
            panic!("dockerd is not installed (scripts/install-deps.sh installs docker.io)");
        }
        let work = std::env::temp_dir().join(format!("overlay-e2e-{tag}-{what}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("work dir");
        let rootfs = work.join("rootfs");
        busybox_rootfs(&rootfs);
        let u = Underlay::new(tag, 2, net);
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
        let (f1, f2) = (flags(0), flags(1));
        let f1: Vec<&str> = f1.iter().map(String::as_str).collect();
        let f2: Vec<&str> = f2.iter().map(String::as_str).collect();
        let n1 = Node::manager_with(&format!("{tag}a"), &u, 1, &f1);
        let n2 = Node::worker_with(&format!("{tag}b"), &u, 2, &n1, &f2);
        n1.wait_ready(&[&n2]);
        let d1 = Dockerd::start(&docks[0], &u.host(1).path(), &plugins[0]);
        let d2 = Dockerd::start(&docks[1], &u.host(2).path(), &plugins[1]);
        DockerPair {
            d2,
            d1,
            n2,
            n1,
            u,
            rootfs,
            plugins,
            work,
        }
    }
}
