//! The manager's desired state on etcd (`overlayd --store etcd`): the keys of [`layout`],
//! written by whichever manager holds the leader key (`campaign.rs`), each change one
//! transaction fenced on it. Any manager reads them; only the leader writes.
//!
//! - **Writing.** A change is the [`layout::diff`] between what this manager last wrote and
//!   the new state, in one transaction that compares the leader key's create revision (it is
//!   still ours: a deposed manager cannot write) and the meta key's mod revision (nobody
//!   else wrote since: no lost update). A failed compare refuses the change; nothing is
//!   committed locally either (the manager commits only after `save` returns). A manager
//!   that takes the lead loads the state again first ([`EtcdStore::load`]): what it last
//!   wrote, if it led before, is not what is there now.
//! - **Secrets.** The CA and the join secrets ([`Secret`]) are keys of their own under
//!   `PREFIX/secrets/`, written like the state (fenced) and read by any manager: whoever
//!   leads next admits nodes with the same CA and tokens.
//! - **Failing.** Every call is bounded ([`OP_TIMEOUT`]): with etcd unreachable a change is
//!   refused in under 5 s, saying so; the data plane never waits on the store.
//!
//! etcd's client is async and the manager's `save` is not, so the store runs its own small
//! runtime: calls are spawned there and waited for with a deadline. The campaign runs there
//! too, for as long as the store is open.

use super::campaign::{Campaign, Election, REVOKE_WITHIN};
pub use super::campaign::{LEASE_TTL, STARTUP_WAIT};
use super::layout::{self, Kvs, Layout, LayoutError, LeaderInfo};
use super::StoreError;
use crate::naming::Secret;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp, TxnOpResponse,
};
use protocol::state::{ClusterState, FORMAT};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// The most any one call to etcd may take: a change is answered within 5 s.
pub const OP_TIMEOUT: Duration = Duration::from_millis(4500);
/// Keys per transaction of an import (etcd's `--max-txn-ops` is 128 by default).
const IMPORT_BATCH: usize = 100;

/// `--etcd-*`: where the store is and how to reach it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub prefix: String,
}

/// What this manager knows to be in etcd: the keys it loaded or last wrote.
struct Written {
    kvs: Kvs,
    meta_rev: i64,
    /// A write went unanswered (it may or may not have committed): read the keys again
    /// before the next one.
    uncertain: bool,
}

/// The store's own runtime. Dropping a runtime blocks, which an async caller (the daemon
/// dropping the store, or `open` failing) may not do; this lets it go in the background.
struct Rt(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Rt {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("taken only on drop")
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub struct EtcdStore {
    rt: Rt,
    client: Client,
    layout: Layout,
    endpoints: String,
    election: Arc<Election>,
    /// Ends the campaign (which then revokes its lease) when the store is dropped.
    stop: CancellationToken,
    campaign: Option<tokio::task::JoinHandle<()>>,
    written: Mutex<Written>,
}

pub(super) fn unavailable(endpoints: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        endpoints: endpoints.to_string(),
        why: why.to_string(),
    }
}

/// etcd said no to the request itself (too many operations, too large): retrying will not
/// help. Anything else (transport, deadline, no leader) is unavailability.
fn refused(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            // InvalidArgument, ResourceExhausted, FailedPrecondition, OutOfRange
            matches!(i32::from(s.code()), 3 | 8 | 9 | 11)
        }
        _ => false,
    }
}

impl EtcdStore {
    /// Connects (an error if etcd does not answer), reads who leads, and starts campaigning
    /// as `me`; returns without waiting to lead ([`EtcdStore::wait_leading`] does).
    pub fn open(cfg: &EtcdConfig, me: &LeaderInfo, dir: &Path) -> Result<EtcdStore, StoreError> {
        if cfg.endpoints.is_empty() {
            return Err(StoreError::Config(
                "--store etcd needs --etcd-endpoints URL[,URL...]".into(),
            ));
        }
        let endpoints = cfg.endpoints.join(",");
        let rt = Rt(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("etcd-store")
                .enable_all()
                .build()
                .map_err(|e| {
                    StoreError::Config(format!("starting the etcd client's runtime: {e}"))
                })?,
        ));
        let options = connect_options(cfg)?;
        let urls = cfg.endpoints.clone();
        let client = run(&rt, &endpoints, async move {
            Client::connect(urls, Some(options)).await
        })?;
        let layout = Layout::new(&cfg.prefix);
        // The client connects lazily: this first read is what says etcd answers.
        let lease_file = crate::naming::etcd_lease_file(dir);
        let previous = std::fs::read_to_string(&lease_file)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok());
        let mut c = client.clone();
        let key = layout.leader();
        let resp = run(&rt, &endpoints, async move { c.get(key, None).await })?;
        let holder = resp
            .kvs()
            .first()
            .filter(|kv| Some(kv.lease()) != previous)
            .map(|kv| LeaderInfo::parse(kv.value()));
        // A previous run of this state directory is over (we hold its lock): its lease goes,
        // and with it the leader key if that run held it.
        if let Some(old) = previous {
            let mut c = client.clone();
            let _ = run(&rt, &endpoints, async move { c.lease_revoke(old).await });
        }
        let election = Arc::new(Election::new(holder));
        let campaign = Campaign::new(
            client.clone(),
            layout.clone(),
            me.clone(),
            endpoints.clone(),
            lease_file,
            election.clone(),
        );
        let stop = CancellationToken::new();
        let campaign = rt.spawn(campaign.run(stop.clone()));
        Ok(EtcdStore {
            rt,
            client,
            layout,
            endpoints,
            election,
            stop,
            campaign: Some(campaign),
            written: Mutex::new(Written {
                kvs: Kvs::new(),
                meta_rev: 0,
                uncertain: false,
            }),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    pub fn leading(&self) -> watch::Receiver<bool> {
        self.election.leading()
    }

    pub fn leader(&self) -> Option<LeaderInfo> {
        self.election.leader()
    }

    pub fn watch_leader(&self) -> watch::Receiver<Option<LeaderInfo>> {
        self.election.watch_leader()
    }

    /// Waits up to `within` to lead; if another manager still does, refuses, naming it.
    pub async fn wait_leading(&self, within: Duration) -> Result<(), StoreError> {
        let mut leading = self.leading();
        let led = tokio::time::timeout(within, leading.wait_for(|l| *l))
            .await
            .is_ok_and(|r| r.is_ok());
        if led {
            return Ok(());
        }
        let key = self.layout.leader();
        Err(match self.leader() {
            Some(holder) => StoreError::Config(format!(
                "another manager leads the cluster state: etcd key {key} is held by {holder} \
                 (waited {}s for it to be free); this one cannot write the state, so it does \
                 not start",
                within.as_secs()
            )),
            None => unavailable(
                &self.endpoints,
                format!(
                    "could not take the leader key {key} within {}s",
                    within.as_secs()
                ),
            ),
        })
    }

    /// Who holds the leader key, for a refusal: as last seen, or read now if this manager
    /// knows of no one (it has just stepped down, and its campaign has not read the key yet).
    fn holder(&self) -> String {
        if let Some(holder) = self.leader() {
            return holder.to_string();
        }
        let mut client = self.client.clone();
        let key = self.layout.leader();
        let read = run(self.rt(), &self.endpoints, async move {
            client.get(key, None).await
        });
        match read.map(|r| r.kvs().first().map(|kv| LeaderInfo::parse(kv.value()))) {
            Ok(Some(holder)) => holder.to_string(),
            Ok(None) => "no one (this manager is campaigning for it)".into(),
            Err(_) => "someone it cannot tell (etcd does not answer)".into(),
        }
    }

    /// The stored state: reassembled from etcd; or, if etcd holds none, imported from
    /// `file` (the `state.json` of a manager that ran on the file store) when there is one;
    /// or empty. Says whether it imported `file`. What this manager believes it last wrote
    /// becomes what etcd holds now, so it may be called at every takeover.
    pub fn load(&self, file: Option<ClusterState>) -> Result<(ClusterState, bool), StoreError> {
        let (kvs, meta_rev) = self.read_all()?;
        let assembled = layout::assemble(&self.layout, &kvs);
        *self.written.lock().map_err(|_| poisoned())? = Written {
            kvs,
            meta_rev,
            uncertain: false,
        };
        match assembled {
            Ok(Some(state)) => {
                self.check_format(&state)?;
                Ok((state, false))
            }
            Ok(None) => match file {
                Some(state) => self.import(&state, false).map(|()| (state, true)),
                None => Ok((ClusterState::default(), false)),
            },
            // An import that did not finish: start it over from the file.
            Err(LayoutError::NoMeta(_)) if file.is_some() => {
                let state = file.expect("checked");
                self.import(&state, true).map(|()| (state, true))
            }
            Err(e) => Err(StoreError::Layout(e)),
        }
    }

    /// The stored state, if there is one, read for a manager that does not lead: nothing is
    /// written, imported or remembered.
    pub fn read_state(&self) -> Result<Option<ClusterState>, StoreError> {
        let (kvs, _) = self.read_all()?;
        let state = layout::assemble(&self.layout, &kvs).map_err(StoreError::Layout)?;
        if let Some(s) = &state {
            self.check_format(s)?;
        }
        Ok(state)
    }

    fn check_format(&self, state: &ClusterState) -> Result<(), StoreError> {
        if state.format != FORMAT {
            return Err(StoreError::Format {
                path: PathBuf::from(self.layout.meta()),
                found: state.format,
            });
        }
        Ok(())
    }

    /// Every state key under the prefix, and the meta key's mod revision (0 if absent).
    fn read_all(&self) -> Result<(Kvs, i64), StoreError> {
        let mut client = self.client.clone();
        let prefix = self.layout.state_prefix();
        let resp = run(self.rt(), &self.endpoints, async move {
            client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
        })?;
        let mut kvs = Kvs::new();
        let mut meta_rev = 0;
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if key == self.layout.meta() {
                meta_rev = kv.mod_revision();
            }
            kvs.insert(key, kv.value().to_vec());
        }
        Ok((kvs, meta_rev))
    }

    /// Writes a whole state into an empty prefix, in batches (etcd bounds the operations of
    /// one transaction), the meta key last: until it is there, a reader sees no state.
    fn import(&self, state: &ClusterState, clear: bool) -> Result<(), StoreError> {
        let kvs = layout::split(&self.layout, state).map_err(StoreError::Layout)?;
        let meta = self.layout.meta();
        let mut ops: Vec<TxnOp> = Vec::new();
        if clear {
            ops.push(TxnOp::delete(
                self.layout.state_prefix(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ));
        }
        ops.extend(
            kvs.iter()
                .filter(|(k, _)| **k != meta)
                .map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), None)),
        );
        let mut batches: Vec<Vec<TxnOp>> = Vec::new();
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(IMPORT_BATCH));
            batches.push(std::mem::replace(&mut ops, rest));
        }
        batches.push(vec![TxnOp::put(meta.as_str(), kvs[&meta].clone(), None)]);
        let mut meta_rev = 0;
        for batch in batches {
            let checks = vec![Compare::mod_revision(meta.as_str(), CompareOp::Equal, 0)];
            meta_rev = self.fenced(checks, batch)?;
        }
        *self.written.lock().map_err(|_| poisoned())? = Written {
            kvs,
            meta_rev,
            uncertain: false,
        };
        info!(
            keys = state.networks.len() + state.services.len() + state.tasks.len(),
            "imported state.json into etcd"
        );
        Ok(())
    }

    /// Writes `state`: only the keys that differ from what this manager last wrote, in one
    /// transaction fenced on the leader key and the meta key.
    pub fn save(&self, state: &ClusterState) -> Result<(), StoreError> {
        let new = layout::split(&self.layout, state).map_err(StoreError::Layout)?;
        let mut written = self.written.lock().map_err(|_| poisoned())?;
        if written.uncertain {
            // What this manager wrote last may be there although it was told otherwise;
            // as the leader, it writes its own view over whatever that was.
            let (kvs, meta_rev) = self.read_all()?;
            *written = Written {
                kvs,
                meta_rev,
                uncertain: false,
            };
        }
        let diff = layout::diff(&written.kvs, &new);
        if diff.is_empty() {
            return Ok(());
        }
        let meta = self.layout.meta();
        let writes_meta = diff.puts.iter().any(|(k, _)| *k == meta);
        let n = diff.len();
        let mut ops: Vec<TxnOp> = diff
            .puts
            .into_iter()
            .map(|(k, v)| TxnOp::put(k, v, None))
            .collect();
        ops.extend(diff.deletes.into_iter().map(|k| TxnOp::delete(k, None)));
        let checks = vec![Compare::mod_revision(
            meta.as_str(),
            CompareOp::Equal,
            written.meta_rev,
        )];
        let revision = self.fenced(checks, ops).map_err(|e| match e {
            StoreError::Refused(why) => StoreError::Refused(format!("writing {n} keys: {why}")),
            e @ StoreError::Unavailable { .. } => {
                written.uncertain = true;
                e
            }
            e => e,
        })?;
        written.kvs = new;
        if writes_meta {
            written.meta_rev = revision;
        }
        Ok(())
    }

    /// One secret the managers share, if etcd holds it (any manager may read it).
    pub fn secret(&self, secret: Secret) -> Result<Option<Vec<u8>>, StoreError> {
        let mut client = self.client.clone();
        let key = self.layout.secret(secret);
        let resp = run(self.rt(), &self.endpoints, async move {
            client.get(key, None).await
        })?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Writes one secret, fenced like the state: only the leader may.
    pub fn put_secret(&self, secret: Secret, value: &[u8]) -> Result<(), StoreError> {
        let op = TxnOp::put(self.layout.secret(secret), value.to_vec(), None);
        self.fenced(Vec::new(), vec![op]).map(drop)
    }

    /// Writes `secrets` (a file-store manager's, moving to etcd) if etcd holds no secret at
    /// all: the CA and tokens of the cluster stay what they were. Says whether it wrote them.
    pub fn import_secrets(&self, secrets: Vec<(Secret, Vec<u8>)>) -> Result<bool, StoreError> {
        if secrets.is_empty() {
            return Ok(false);
        }
        let none_yet = Secret::ALL
            .iter()
            .map(|s| Compare::create_revision(self.layout.secret(*s), CompareOp::Equal, 0))
            .collect();
        let ops = secrets
            .into_iter()
            .map(|(s, v)| TxnOp::put(self.layout.secret(s), v, None))
            .collect();
        match self.fenced(none_yet, ops) {
            Ok(_) => Ok(true),
            // The leader key is ours, so what failed is that etcd holds secrets already.
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One transaction: `ops` if the leader key is still ours and `checks` hold. Returns the
    /// revision it made.
    fn fenced(&self, checks: Vec<Compare>, ops: Vec<TxnOp>) -> Result<i64, StoreError> {
        let lead = self.election.leadership();
        if lead.key_rev == 0 {
            return Err(StoreError::NotLeader {
                key: self.layout.leader(),
                holder: self.holder(),
            });
        }
        let leader = self.layout.leader();
        let meta = self.layout.meta();
        let mut when = vec![Compare::create_revision(
            leader.as_str(),
            CompareOp::Equal,
            lead.key_rev,
        )];
        when.extend(checks);
        let txn = Txn::new().when(when).and_then(ops).or_else(vec![
            TxnOp::get(leader.as_str(), None),
            TxnOp::get(meta.as_str(), None),
        ]);
        let mut client = self.client.clone();
        let resp = self
            .rt()
            .block_on_deadline(async move { client.txn(txn).await })
            .map_err(|e| match e {
                Failure::Timeout => unavailable(&self.endpoints, "no answer within 4.5 s"),
                Failure::Etcd(e) if refused(&e) => StoreError::Refused(e.to_string()),
                Failure::Etcd(e) => unavailable(&self.endpoints, e),
            })?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision()));
        }
        // Who holds the leader key now?
        let holder = resp
            .op_responses()
            .into_iter()
            .next()
            .and_then(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| (kv.create_revision(), LeaderInfo::parse(kv.value()))),
                _ => None,
            });
        let holder = match holder {
            Some((rev, _)) if rev == lead.key_rev => {
                return Err(StoreError::Conflict {
                    prefix: self.layout.prefix().to_string(),
                })
            }
            Some((_, who)) => who.to_string(),
            None => "no one (the key is gone)".into(),
        };
        self.election.step_down(lead.key_rev);
        Err(StoreError::NotLeader {
            key: self.layout.leader(),
            holder,
        })
    }
}

/// Stops the campaign, which revokes the lease: if this manager led, another leads at once.
impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.stop.cancel();
        let Some(campaign) = self.campaign.take() else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = campaign.await;
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(REVOKE_WITHIN + Duration::from_millis(200));
    }
}

fn poisoned() -> StoreError {
    StoreError::Config("the store's lock is poisoned".into())
}

fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions, StoreError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(OP_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| StoreError::Config(format!("reading {}: {e}", p.display())))
    };
    let mut tls = None;
    if let Some(ca) = &cfg.cacert {
        tls = Some(TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?)));
    }
    match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => {
            let id = Identity::from_pem(read(cert)?, read(key)?);
            tls = Some(tls.unwrap_or_default().identity(id));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Config(
                "--etcd-cert and --etcd-key go together".into(),
            ))
        }
    }
    if let Some(tls) = tls {
        options = options.with_tls(tls);
    }
    Ok(options)
}

enum Failure {
    Timeout,
    Etcd(etcd_client::Error),
}

trait Deadline {
    /// Runs `f` on this runtime from any thread (an async caller's included) and waits at
    /// most [`OP_TIMEOUT`] for it.
    fn block_on_deadline<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, Failure>;
}

impl Deadline for tokio::runtime::Runtime {
    fn block_on_deadline<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, Failure> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.spawn(async move {
            let _ = tx.send(tokio::time::timeout(OP_TIMEOUT, f).await);
        });
        match rx.recv_timeout(OP_TIMEOUT + Duration::from_millis(200)) {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(Failure::Etcd(e)),
            Ok(Err(_)) | Err(_) => Err(Failure::Timeout),
        }
    }
}

/// [`Deadline::block_on_deadline`], any failure being unavailability.
fn run<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    endpoints: &str,
    f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
) -> Result<T, StoreError> {
    rt.block_on_deadline(f).map_err(|e| match e {
        Failure::Timeout => unavailable(endpoints, "no answer within 4.5 s"),
        Failure::Etcd(e) => unavailable(endpoints, e),
    })
}
