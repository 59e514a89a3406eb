//! A manager on etcd, one of several (`overlayd --store etcd` on a manager's state
//! directory). At any moment it either **follows** or **leads**, as its store's campaign for
//! the leader key decides ([`Store::leading`]):
//!
//! - Following, it is a member like any worker: a [`Link`] to the leader carries its
//!   snapshots (the agent realises them) and forwards the changes its operators make; its
//!   control endpoint redirects every node to the leader ([`Serving::Follower`]); when etcd
//!   names a new leader, the link goes there at once ([`Link::retarget`]).
//! - Leading, it runs a [`Manager`] over the state it reads from etcd, continuing from the
//!   last snapshot it followed ([`Manager::take_over`]: nodes keep their health for a grace,
//!   tasks their statuses, encrypted networks their keys while new ones replace them), serves
//!   every node's session ([`Serving::Leader`]) and does the periodic work (healing, keys).
//!
//! The switch is the only thing that changes: the node's [`View`] (what its agent follows)
//! and its tasks stay. Nothing here decides who leads; etcd's lease does, and every write is
//! fenced on it, so a manager that still believes it leads cannot commit anything.

use super::pki::{self, Ca, Identity};
use super::server::{ServerCtx, Serving};
use super::session::renewal;
use super::tokens::JoinTokens;
use super::worker::{Credentials, Link};
use super::{Cluster, JoinInfo, Mode, View};
use crate::manager::Manager;
use crate::naming;
use crate::store::Store;
use protocol::control::{Snapshot, ToManager};
use protocol::state::{Pool, Role};
use protocol::types::NodeName;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Applies the manager's command-line settings to a manager (at every takeover).
pub type Configure = Arc<dyn Fn(&Manager) -> anyhow::Result<()> + Send + Sync>;

/// Everything a manager candidate needs to follow or to lead.
pub struct Candidate {
    pub node: NodeName,
    pub advertise: Ipv4Addr,
    pub data_port: u16,
    /// Its own control address (served as leader, named in the leader key).
    pub control: SocketAddr,
    pub pool: Pool,
    pub state_dir: PathBuf,
    pub store: Store,
    pub ca: Ca,
    pub tokens: Arc<JoinTokens>,
    pub cert_expiry: Duration,
    /// `--control-full-snapshots`.
    pub full_snapshots: bool,
    /// What the control endpoint does.
    pub serving: watch::Sender<Serving>,
    /// The manager's settings from the command line, applied at every takeover.
    pub configure: Configure,
}

impl Candidate {
    /// The node's cluster handle, following for now, and the task that switches it between
    /// following and leading until `shutdown`.
    pub fn start(self, view: View, shutdown: CancellationToken) -> Cluster {
        let link = self.link(&view);
        let cluster = Cluster::new(Mode::Worker(link.clone()), view);
        tokio::spawn(self.run(cluster.clone(), link, shutdown));
        cluster
    }

    fn link(&self, view: &View) -> Arc<Link> {
        // The leader first, then the managers this node last knew.
        let leader = self.store.leader().and_then(|l| l.control);
        let known = super::worker::read_managers(&naming::manager_addr_file(&self.state_dir));
        let managers = leader.into_iter().chain(known).collect();
        Arc::new(Link::new(managers, self.node.clone(), view.clone()))
    }

    fn credentials(&self) -> anyhow::Result<Credentials> {
        let dir = &self.state_dir;
        let (cert, key) = (naming::node_cert(dir), naming::node_key(dir));
        Ok(Credentials {
            identity: Identity {
                cert_pem: pki::read(&cert)?,
                key_pem: pki::read(&key)?,
            },
            ca_pem: self.ca.cert_pem.clone(),
            cert_path: cert,
            key_path: key,
        })
    }

    fn hello(&self) -> ToManager {
        ToManager::Hello {
            version: protocol::control::VERSION,
            node: self.node.clone(),
            advertise_addr: self.advertise,
            data_port: self.data_port,
            control_addr: Some(self.control),
        }
    }

    async fn run(self, cluster: Cluster, mut link: Arc<Link>, shutdown: CancellationToken) {
        let mut leading = self.store.leading();
        let mut leader = self.store.watch_leader();
        loop {
            if !*leading.borrow_and_update() {
                // Follow until this manager leads.
                let term = shutdown.child_token();
                cluster.set_mode(Mode::Worker(link.clone()));
                let follower = |l: &Option<crate::store::LeaderInfo>| Serving::Follower {
                    leader: l.as_ref().and_then(|l| l.control),
                };
                self.serving
                    .send_replace(follower(&leader.borrow_and_update()));
                let follows = match self.credentials() {
                    Ok(creds) => Some(tokio::spawn(link.clone().run(
                        creds,
                        self.advertise,
                        self.hello(),
                        self.store.clone(),
                        term.clone(),
                    ))),
                    Err(e) => {
                        warn!(error = %e, "cannot read this manager's certificate; it cannot follow the leader");
                        None
                    }
                };
                while !*leading.borrow_and_update() {
                    tokio::select! {
                        r = leading.changed() => if r.is_err() { return },
                        r = leader.changed() => {
                            if r.is_err() {
                                return;
                            }
                            let now = leader.borrow_and_update().clone();
                            self.serving.send_replace(follower(&now));
                            if let Some(addr) = now.and_then(|l| l.control).filter(|a| *a != self.control) {
                                link.retarget(addr);
                            }
                        }
                        _ = shutdown.cancelled() => return,
                    }
                }
                term.cancel();
                if let Some(t) = follows {
                    let _ = t.await;
                }
            }
            // Lead until this manager does not.
            let last = link.snapshot();
            let manager = loop {
                if let Some(m) = self.take_over(cluster.view(), &last).await {
                    break Some(m);
                }
                // etcd may answer again in a moment; or another manager takes over.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
                if !*leading.borrow() {
                    break None;
                }
            };
            let Some(manager) = manager else {
                link = self.link(cluster.view());
                continue;
            };
            let term = shutdown.child_token();
            manager.spawn_ticks(term.clone());
            let ctx = Arc::new(ServerCtx::new(
                manager.clone(),
                self.ca.clone(),
                self.tokens.clone(),
                self.cert_expiry,
                self.control,
                self.full_snapshots,
            ));
            let own = ctx.clone();
            let (dir, node) = (self.state_dir.clone(), self.node.clone());
            let _ = tokio::task::spawn_blocking(move || keep_own_cert(&own, &dir, &node)).await;
            self.serving.send_replace(Serving::Leader(ctx));
            let join = Some(JoinInfo {
                tokens: self.tokens.clone(),
                addr: self.control,
            });
            cluster.set_mode(Mode::Manager { manager, join });
            info!(node = %self.node, control = %self.control, "this manager leads the cluster");
            while *leading.borrow_and_update() {
                tokio::select! {
                    r = leading.changed() => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
            }
            term.cancel();
            warn!(node = %self.node, "this manager no longer leads the cluster; following the new leader");
            link = self.link(cluster.view());
            // What it held of other nodes' statuses is the new leader's to say.
            if let Ok(mut board) = cluster.view().board.write() {
                let state = cluster.view().state.borrow().clone();
                board.retain(|name, _| state.tasks.get(name).is_some_and(|t| t.node == self.node));
            }
        }
    }

    /// Loads the state from etcd into a new manager that continues from `last`.
    async fn take_over(&self, view: &View, last: &Arc<Snapshot>) -> Option<Arc<Manager>> {
        let (store, pool, node) = (self.store.clone(), self.pool, self.node.clone());
        let advertise = Some((self.advertise, self.data_port));
        let control = Some(self.control);
        let view = view.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let m = Manager::open(store, pool, &node, advertise, &view)?;
            // Workers learn where the leader serves from the state.
            if let Some((ip, port)) = advertise {
                m.upsert_node(&node, ip, port, control)?;
            }
            Ok::<_, anyhow::Error>(m)
        })
        .await;
        let manager = match opened {
            Ok(Ok(m)) => Arc::new(m),
            Ok(Err(e)) => {
                warn!(error = %e, "took the leader key but cannot load the cluster state");
                return None;
            }
            Err(e) => {
                warn!(error = %e, "loading the cluster state failed");
                return None;
            }
        };
        if let Err(e) = (self.configure)(&manager) {
            warn!(error = %e, "cannot apply this manager's settings");
        }
        manager.take_over(last);
        Some(manager)
    }
}

/// Gives a leading manager a member certificate the cluster accepts, signed by its CA and
/// recorded in the state like a join's, when it has none (the manager that made the cluster),
/// when the state no longer accepts it, or when it is past half its life (a leader has no
/// session to renew over). It needs one to follow another leader later.
fn keep_own_cert(ctx: &ServerCtx, dir: &Path, node: &NodeName) {
    let now = crate::clock::now();
    let state = ctx.manager.snapshot();
    let current = pki::read(&naming::node_cert(dir))
        .ok()
        .and_then(|pem| pki::cert_info_pem(&pem));
    let good = current.is_some_and(|c| {
        c.role == Some(Role::Manager)
            && state.cert_allowed(node, &c.serial, now)
            && !renewal::renew_in(now, c.not_before, c.not_after, 0.0).is_zero()
    });
    if good {
        return;
    }
    let made = pki::node_key_and_csr(node.as_str())
        .map_err(|e| e.to_string())
        .and_then(|(key, csr)| {
            let (cert, record) = ctx.sign(node, Role::Manager, &csr)?;
            ctx.manager
                .record_renewal(node, record)
                .map_err(|e| e.message)?;
            pki::write_private(&naming::node_key(dir), &key).map_err(|e| e.to_string())?;
            pki::write_private(&naming::node_cert(dir), &cert).map_err(|e| e.to_string())
        });
    match made {
        Ok(()) => info!("this manager holds a new member certificate of its own"),
        Err(e) => {
            warn!(error = %e, "cannot give this manager a member certificate; it cannot follow another leader until it has one")
        }
    }
}
