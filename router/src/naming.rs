//! Every name this node derives, in one place: the kernel objects it makes for tasks and
//! containers (network and mount namespaces, interfaces) and the files in its state
//! directory. The agent makes them, the API shows them, the Docker plugin hands them to
//! Docker, and a starting node finds its leftovers by them; all ask here.
//!
//! Task namespaces carry the node's name (`ov-NODE-TASK`): several nodes can share one
//! machine, and a starting node removes only its own leftovers.

use crate::sys::{mntns, netns};
use protocol::types::NodeName;
use std::path::{Path, PathBuf};

/// Where the per-node-name locks live (shared by every daemon on the machine).
pub const NODE_LOCK_DIR: &str = "/run/overlay/nodes";

/// The lock that keeps one live daemon per node name on this machine.
pub fn node_lock(node: &NodeName) -> PathBuf {
    Path::new(NODE_LOCK_DIR).join(format!("{node}.lock"))
}

/// Name of a task's namespace under /run/netns: recognisable and unique per node.
pub fn netns_name(node: &NodeName, task: &str) -> String {
    format!("ov-{node}-{task}")
}

/// What every namespace of `node`'s tasks starts with (network and mount namespaces alike).
pub fn netns_prefix(node: &NodeName) -> String {
    format!("ov-{node}-")
}

/// The path of a task's network namespace.
pub fn task_netns(node: &NodeName, task: &str) -> PathBuf {
    netns::path_of(&netns_name(node, task))
}

/// The path of a task's mount namespace (named like its network namespace).
pub fn task_mntns(node: &NodeName, task: &str) -> PathBuf {
    mntns::path_of(&netns_name(node, task))
}

/// The name of a task's interface on its `index`th network attachment.
pub fn task_iface(index: usize) -> String {
    format!("eth{index}")
}

/// The name of a Docker endpoint's TAP in overlayd's own namespace, before Docker moves it
/// into the container (and renames it eth0).
pub fn docker_tap_name(endpoint: &str) -> String {
    let id: String = endpoint
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect();
    format!("ovd{id}")
}

/// The name of an image task's TAP for its `index`th network attachment, in overlayd's own
/// namespace until Docker moves it into the task's container (`docker.rs` names it to
/// Docker on the endpoint's join): `ovi` + ten characters of the task id + the index.
pub fn image_tap_name(task_id: &str, index: usize) -> String {
    format!("{}{index}", image_tap_prefix(task_id))
}

/// What the names of an image task's TAPs start with ([`image_tap_name`]).
pub fn image_tap_prefix(task_id: &str) -> String {
    let id: String = task_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(10)
        .collect();
    format!("ovi{id}")
}

/// The desired state (`store.rs`).
pub fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join("state.json")
}

/// `state.json` once imported into etcd (`store/etcd.rs`): kept, no longer read.
pub fn state_file_imported(state_dir: &Path) -> PathBuf {
    state_dir.join("state.json.imported")
}

/// The id of this manager's etcd lease, so that its next run revokes it (`store/etcd.rs`).
pub fn etcd_lease_file(state_dir: &Path) -> PathBuf {
    state_dir.join("etcd-lease")
}

/// The flock that keeps one daemon per state directory.
pub fn state_lock(state_dir: &Path) -> PathBuf {
    state_dir.join("lock")
}

/// Where task output goes.
pub fn logs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("logs")
}

/// A task's stdout and stderr.
pub fn task_log(state_dir: &Path, task: &str) -> PathBuf {
    logs_dir(state_dir).join(format!("{task}.log"))
}

/// A task's earlier output, rotated out of `log` (`task_log`): `TASK.log.1` the latest.
pub fn rotated_log(log: &Path, n: usize) -> PathBuf {
    let mut name = log.as_os_str().to_os_string();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// A task's own files (its resolv.conf and hosts), mounted into its mount namespace.
pub fn task_files(state_dir: &Path, task: &str) -> PathBuf {
    state_dir.join("tasks").join(task)
}

/// Where a task's shim writes how its process ended (`task_shim`).
pub fn task_exit_file(state_dir: &Path, task: &str) -> PathBuf {
    task_files(state_dir, task).join("exit")
}

/// Which shim and process run a task (`task_shim::Record`), for the next overlayd to adopt.
pub fn task_process_record(state_dir: &Path, task: &str) -> PathBuf {
    task_files(state_dir, task).join("process.json")
}

/// The load balancer's established flows, for the next run to resume (`forward::saved_flows`).
pub fn saved_flows(state_dir: &Path) -> PathBuf {
    state_dir.join("flows")
}

/// Where an overlayd being upgraded waits for its successor (`upgrade`).
pub fn upgrade_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade.sock")
}

/// What the Docker plugin knows of this host's Docker networks.
pub fn docker_networks_file(state_dir: &Path) -> PathBuf {
    state_dir.join("docker-networks.json")
}

/// The counter behind encrypted networks' sending epochs.
pub fn esp_epoch_file(state_dir: &Path) -> PathBuf {
    state_dir.join("esp-epoch")
}

/// What the managers of a cluster share besides the desired state: the CA (its key, and its
/// certificate that goes with it), the two join secrets and the lifetime of node
/// certificates. The store keeps each under its name: a file of the state directory on the
/// file store, a key on etcd (`store/layout.rs`), so that any manager that takes the lead
/// finds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secret {
    /// The cluster CA's private key: only managers have it.
    CaKey,
    /// The cluster CA's certificate (on a worker, the CA it trusts, in the same file).
    CaCert,
    /// The secret half of the worker join token.
    WorkerJoin,
    /// The secret half of the manager join token.
    ManagerJoin,
    /// The lifetime of node certificates, as `--init --cert-expiry` set it.
    CertExpiry,
}

impl Secret {
    pub const ALL: [Secret; 5] = [
        Secret::CaKey,
        Secret::CaCert,
        Secret::WorkerJoin,
        Secret::ManagerJoin,
        Secret::CertExpiry,
    ];

    /// Its file name in the state directory, and the last part of its etcd key. The worker
    /// join secret keeps the file name of the single token of earlier versions.
    pub fn name(self) -> &'static str {
        match self {
            Secret::CaKey => "ca.key",
            Secret::CaCert => "ca.pem",
            Secret::WorkerJoin => "join-secret",
            Secret::ManagerJoin => "join-secret-manager",
            Secret::CertExpiry => "cert-expiry",
        }
    }
}

/// Where the file store keeps `secret` (mode 0600).
pub fn secret_file(state_dir: &Path, secret: Secret) -> PathBuf {
    state_dir.join(secret.name())
}

/// The cluster CA's certificate (a manager's, and the CA a worker trusts).
pub fn ca_cert(state_dir: &Path) -> PathBuf {
    secret_file(state_dir, Secret::CaCert)
}

/// The cluster CA's private key: only a manager has it.
pub fn ca_key(state_dir: &Path) -> PathBuf {
    secret_file(state_dir, Secret::CaKey)
}

/// The lifetime of node certificates, as `--init --cert-expiry` set it (manager).
pub fn cert_expiry_file(state_dir: &Path) -> PathBuf {
    secret_file(state_dir, Secret::CertExpiry)
}

/// A worker's certificate.
pub fn node_cert(state_dir: &Path) -> PathBuf {
    state_dir.join("node.pem")
}

/// A worker's private key.
pub fn node_key(state_dir: &Path) -> PathBuf {
    state_dir.join("node.key")
}

/// The manager's control address, as a worker last joined it.
pub fn manager_addr_file(state_dir: &Path) -> PathBuf {
    state_dir.join("manager")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_what_operators_and_leftover_cleanup_expect() {
        let n1 = NodeName::new("n1").unwrap();
        assert_eq!(netns_name(&n1, "web.1"), "ov-n1-web.1");
        assert!(netns_name(&n1, "web.1").starts_with(&netns_prefix(&n1)));
        assert_eq!(
            task_netns(&n1, "web.1"),
            Path::new("/run/netns/ov-n1-web.1")
        );
        assert_eq!(
            task_mntns(&n1, "web.1"),
            Path::new("/run/overlay/mntns/ov-n1-web.1")
        );
        assert_eq!(
            docker_tap_name("3f2a-b9c1_d0e4f5a6b7c8d9"),
            "ovd3f2ab9c1d0e4"
        );
        assert!(docker_tap_name(&"f".repeat(64)).len() <= 15, "IFNAMSIZ");
        assert_eq!(
            task_log(Path::new("/var/lib/overlay/n1"), "web.1"),
            Path::new("/var/lib/overlay/n1/logs/web.1.log")
        );
        assert_eq!(
            rotated_log(&task_log(Path::new("/var/lib/overlay/n1"), "web.1"), 2),
            Path::new("/var/lib/overlay/n1/logs/web.1.log.2")
        );
        assert_eq!(node_lock(&n1), Path::new("/run/overlay/nodes/n1.lock"));
        // A file-store manager of an earlier version finds its files under these names.
        let dir = Path::new("/var/lib/overlay/n1");
        assert_eq!(ca_key(dir), dir.join("ca.key"));
        assert_eq!(ca_cert(dir), dir.join("ca.pem"));
        assert_eq!(
            secret_file(dir, Secret::WorkerJoin),
            dir.join("join-secret")
        );
        assert_eq!(
            secret_file(dir, Secret::ManagerJoin),
            dir.join("join-secret-manager")
        );
        assert_eq!(cert_expiry_file(dir), dir.join("cert-expiry"));
    }
}
