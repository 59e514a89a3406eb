//! Adoption: what a previous run of this node left running. Without `--stop-tasks` a daemon
//! that stops (or crashes) leaves its tasks as they are: processes under their shims
//! (`task_shim`), namespaces, persistent TAPs. The next run finds them by name
//! (`ov-NODE-TASK`) and, once the first real state arrived (nothing is removed before),
//! adopts each that is still desired here with the same id and whose shim record names live
//! processes: it attaches to its TAPs again, serves its resolver again and resumes
//! supervising the same process. What it cannot adopt it removes (processes killed,
//! namespaces deleted), and [`Agent::reconcile`] starts it afresh if still desired.

use super::tasks::{bindings_of, resolver_sockets, LocalTask};
use super::Agent;
use crate::naming;
use crate::sys::{iface, mntns, netns};
use crate::task;
use crate::task_shim::Shim;
use protocol::state::{ClusterState, Task};
use tracing::{info, warn};

impl Agent {
    /// Deals with what a previous run of this node left (its tasks, when it stopped without
    /// `--stop-tasks` or crashed), given the first real state: adopts the tasks still desired
    /// here, removes the rest.
    pub(super) async fn settle_leftovers(&mut self, state: &ClusterState) {
        let prefix = naming::netns_prefix(&self.node);
        let mut left: Vec<String> = netns::list_with_prefix(&prefix)
            .into_iter()
            .filter_map(|n| n.strip_prefix(&prefix).map(str::to_string))
            .collect();
        if let Ok(dir) = std::fs::read_dir(mntns::MNTNS_DIR) {
            let names = dir.filter_map(|e| e.ok()?.file_name().into_string().ok());
            for name in names.filter_map(|n| n.strip_prefix(&prefix).map(str::to_string)) {
                if !left.contains(&name) {
                    left.push(name);
                }
            }
        }
        let node = self.node.clone();
        let wanted: std::collections::BTreeMap<&str, &Task> = state
            .tasks_on(&node)
            .map(|t| (t.name.as_str(), t))
            .collect();
        let mut adopted = 0;
        for name in left {
            if let Some(task) = wanted.get(name.as_str()) {
                match self.adopt_task(state, task).await {
                    Ok(lt) => {
                        self.tasks.insert(name, lt);
                        adopted += 1;
                        continue;
                    }
                    Err(error) => {
                        warn!(task = %name, %error, "cannot adopt the task: starting it afresh")
                    }
                }
            }
            self.remove_leftover(&name).await;
        }
        if adopted > 0 {
            info!(
                tasks = adopted,
                "adopted the tasks a previous run left running"
            );
        }
    }

    /// Removes a task's namespaces and files a previous run left, killing what runs there.
    async fn remove_leftover(&self, task: &str) {
        let _ = mntns::remove(&naming::task_mntns(&self.node, task));
        let _ = std::fs::remove_dir_all(naming::task_files(&self.state_dir, task));
        let path = naming::task_netns(&self.node, task);
        let name = task.to_string();
        let removed = tokio::task::spawn_blocking(move || netns::remove(&path)).await;
        match removed {
            Ok(Ok(())) => info!(task = %name, "removed a leftover task"),
            Ok(Err(e)) => warn!(task = %name, error = %e, "cannot remove leftover namespace"),
            Err(e) => warn!(task = %name, error = %e, "namespace removal thread failed"),
        }
    }

    /// Takes over a task a previous run left: its process (same pid), its TAPs (same
    /// address and MAC: the kernel kept them), its resolver (served again).
    async fn adopt_task(&mut self, state: &ClusterState, task: &Task) -> Result<LocalTask, String> {
        let ns_path = naming::task_netns(&self.node, &task.name);
        let mnt_path = naming::task_mntns(&self.node, &task.name);
        if !mnt_path.exists() {
            return Err("its mount namespace is gone".to_string());
        }
        let shim = Shim::adopt(
            &naming::task_process_record(&self.state_dir, &task.name),
            &naming::task_exit_file(&self.state_dir, &task.name),
            &task.id,
        )?;
        let bindings = bindings_of(state, task)?;
        let names = (0..bindings.len()).map(naming::task_iface).collect();
        let fds = {
            let (path, queues) = (ns_path.clone(), self.datapath.workers());
            tokio::task::spawn_blocking(move || iface::reopen_task_ifaces(&path, names, queues))
                .await
                .map_err(|e| format!("reopen thread failed: {e}"))?
                .map_err(|e| format!("attaching to its interfaces: {e}"))?
        };
        let resolver = {
            let path = ns_path.clone();
            tokio::task::spawn_blocking(move || resolver_sockets(&path))
                .await
                .map_err(|e| format!("resolver thread failed: {e}"))?
                .map_err(|e| format!("binding its resolver: {e}"))?
        };
        let resolver_stop = self.serve_resolver(task, resolver);
        let ports = self.add_ports(fds, bindings);
        let stop = task::Stop::default();
        let proc = self.process_of(task, &ns_path, &mnt_path);
        let supervisor = tokio::spawn(task::supervise(
            proc,
            self.statuses.clone(),
            stop.clone(),
            Some(shim),
        ));
        Ok(LocalTask {
            id: task.id.clone(),
            container: false,
            netns: ns_path,
            mntns: mnt_path,
            files: naming::task_files(&self.state_dir, &task.name),
            ports,
            taps: Vec::new(),
            resolver: resolver_stop,
            stop,
            supervisor,
        })
    }
}
