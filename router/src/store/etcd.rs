//! The manager's desired state on etcd (`overlayd --store etcd`): the keys of [`layout`],
//! written by whoever holds the leader key, each change one transaction fenced on it.
//!
//! - **Leading.** The manager grants itself a lease ([`LEASE_TTL`]) and creates
//!   `PREFIX/leader` with it (`txn(create_revision == 0)`), keeps the lease alive, and
//!   campaigns again if the lease is lost (etcd unreachable for longer than the TTL) or a
//!   write finds the key is no longer its own. The lease's id is kept in
//!   `STATE_DIR/etcd-lease`, so a restart revokes the previous run's lease instead of
//!   waiting for it to expire (the state directory's lock says that run is over).
//! - **Writing.** A change is the [`layout::diff`] between what this manager last wrote and
//!   the new state, in one transaction that compares the leader key's create revision (it is
//!   still ours: a deposed manager cannot write) and the meta key's mod revision (nobody
//!   else wrote since: no lost update). A failed compare refuses the change; nothing is
//!   committed locally either (the manager commits only after `save` returns).
//! - **Failing.** Every call is bounded ([`OP_TIMEOUT`]): with etcd unreachable a change is
//!   refused in under 5 s, saying so; the data plane never waits on the store.
//!
//! etcd's client is async and the manager's `save` is not, so the store runs its own small
//! runtime: calls are spawned there and waited for with a deadline.

use super::layout::{self, Kvs, Layout, LayoutError};
use super::StoreError;
use crate::durable::{write_atomic, PRIVATE};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use protocol::state::{ClusterState, FORMAT};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{info, warn};

/// Seconds the leader key outlives a manager that stopped renewing it.
pub const LEASE_TTL: i64 = 10;
/// How often the lease is renewed.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(3);
/// The most any one call to etcd may take: a change is answered within 5 s.
pub const OP_TIMEOUT: Duration = Duration::from_millis(4500);
/// How long a starting manager waits for a leader key held by someone else to go away
/// (a lease not in `etcd-lease`, e.g. of a state directory that was lost, expires in this).
const STARTUP_WAIT: Duration = Duration::from_secs(LEASE_TTL as u64 + 2);
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

/// Whether (and by which lease and key) this manager leads.
#[derive(Debug, Clone, Copy, Default)]
struct Leadership {
    lease: i64,
    /// The create revision of our leader key; 0 while not leading.
    key_rev: i64,
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
    lead: Arc<Mutex<Leadership>>,
    lost: Arc<Notify>,
    written: Mutex<Written>,
}

/// Everything a campaign needs (the background task owns a copy).
#[derive(Clone)]
struct Campaign {
    client: Client,
    layout: Layout,
    me: String,
    endpoints: String,
    lease_file: PathBuf,
    lead: Arc<Mutex<Leadership>>,
}

fn unavailable(endpoints: &str, why: impl std::fmt::Display) -> StoreError {
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
    /// Connects, takes the leader key (waiting up to [`STARTUP_WAIT`] for another holder's
    /// lease to expire) and starts keeping it.
    pub fn open(cfg: &EtcdConfig, me: &str, dir: &Path) -> Result<EtcdStore, StoreError> {
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
        let lead = Arc::new(Mutex::new(Leadership::default()));
        let campaign = Campaign {
            client: client.clone(),
            layout: layout.clone(),
            me: me.to_string(),
            endpoints: endpoints.clone(),
            lease_file: crate::naming::etcd_lease_file(dir),
            lead: lead.clone(),
        };
        // A previous run of this state directory is over (we hold its lock): its lease goes.
        if let Some(old) = std::fs::read_to_string(&campaign.lease_file)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
        {
            let mut c = client.clone();
            let _ = run(&rt, &endpoints, async move { c.lease_revoke(old).await });
        }
        let deadline = Instant::now() + STARTUP_WAIT;
        loop {
            let c = campaign.clone();
            let tried = run(&rt, &endpoints, async move {
                Ok::<_, etcd_client::Error>(c.acquire().await)
            })?;
            match tried {
                Ok(()) => break,
                Err(StoreError::NotLeader { key, holder }) if Instant::now() >= deadline => {
                    return Err(StoreError::Config(format!(
                        "another manager leads the cluster state: etcd key {key} is held by \
                         {holder} (waited {}s for its lease to expire); this one cannot write \
                         the state, so it does not start",
                        STARTUP_WAIT.as_secs()
                    )));
                }
                Err(StoreError::NotLeader { key, holder }) => {
                    info!(%key, %holder, "the leader key is held; waiting for its lease to expire");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
        info!(%endpoints, prefix = layout.prefix(), "leading the cluster state on etcd");
        let lost = Arc::new(Notify::new());
        rt.spawn(campaign.keep_leading(lost.clone()));
        Ok(EtcdStore {
            rt,
            client,
            layout,
            endpoints,
            lead,
            lost,
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

    fn leadership(&self) -> Leadership {
        self.lead.lock().map(|l| *l).unwrap_or_default()
    }

    fn not_leading(&self, holder: String) -> StoreError {
        if let Ok(mut l) = self.lead.lock() {
            l.key_rev = 0;
        }
        self.lost.notify_one();
        StoreError::NotLeader {
            key: self.layout.leader(),
            holder,
        }
    }

    /// The stored state: reassembled from etcd; or, if etcd holds none, imported from
    /// `file` (the `state.json` of a manager that ran on the file store) when there is one;
    /// or empty. Says whether it imported `file`.
    pub fn load(&self, file: Option<ClusterState>) -> Result<(ClusterState, bool), StoreError> {
        let (kvs, meta_rev) = self.read_all()?;
        match layout::assemble(&self.layout, &kvs) {
            Ok(Some(state)) => {
                if state.format != FORMAT {
                    return Err(StoreError::Format {
                        path: PathBuf::from(self.layout.meta()),
                        found: state.format,
                    });
                }
                *self.written.lock().map_err(|_| poisoned())? = Written {
                    kvs,
                    meta_rev,
                    uncertain: false,
                };
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

    /// One transaction: `ops` if the leader key is still ours and `checks` hold. Returns the
    /// revision it made.
    fn fenced(&self, checks: Vec<Compare>, ops: Vec<TxnOp>) -> Result<i64, StoreError> {
        let lead = self.leadership();
        if lead.key_rev == 0 {
            return Err(self.not_leading(
                "no one it knows of: this manager lost its lease and is campaigning again".into(),
            ));
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
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                    (
                        kv.create_revision(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    )
                }),
                _ => None,
            });
        match holder {
            Some((rev, _)) if rev == lead.key_rev => Err(StoreError::Conflict {
                prefix: self.layout.prefix().to_string(),
            }),
            Some((_, who)) => Err(self.not_leading(who)),
            None => Err(self.not_leading("no one (the key is gone)".into())),
        }
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

impl Campaign {
    fn set(&self, lead: Leadership) {
        if let Ok(mut l) = self.lead.lock() {
            *l = lead;
        }
    }

    /// One try at the leader key: a new lease (the previous one revoked), and the key
    /// created with it if nobody holds it. `Ok(Err(NotLeader))` names the holder.
    async fn acquire(&self) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let old = self.lead.lock().map(|l| l.lease).unwrap_or(0);
        if old != 0 {
            let _ = c.lease_revoke(old).await;
        }
        let etcd_down = |e: etcd_client::Error| unavailable(&self.endpoints, e);
        let lease = c
            .lease_grant(LEASE_TTL, None)
            .await
            .map_err(etcd_down)?
            .id();
        if let Err(e) = write_atomic(&self.lease_file, lease.to_string().as_bytes(), PRIVATE) {
            warn!(error = %e, "cannot keep the lease id; a restart will wait for it to expire");
        }
        let key = self.layout.leader();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.as_str(),
                self.me.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(key.as_str(), None)]);
        let resp = c.txn(txn).await.map_err(etcd_down)?;
        if resp.succeeded() {
            let key_rev = resp.header().map_or(0, |h| h.revision());
            self.set(Leadership { lease, key_rev });
            return Ok(());
        }
        let _ = c.lease_revoke(lease).await;
        self.set(Leadership::default());
        let holder = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_else(|| "someone".into());
        Err(StoreError::NotLeader { key, holder })
    }

    /// Keeps the lease alive while leading; campaigns (every second) while not.
    async fn keep_leading(self, lost: Arc<Notify>) {
        let endpoints = self.endpoints.clone();
        loop {
            let lead = self.lead.lock().map(|l| *l).unwrap_or_default();
            if lead.key_rev == 0 {
                match tokio::time::timeout(OP_TIMEOUT, self.acquire()).await {
                    Ok(Ok(())) => {
                        info!(%endpoints, "leading the cluster state on etcd again");
                        continue;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "campaigning for the leader key"),
                    Err(_) => tracing::debug!("campaigning: etcd did not answer"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let mut c = self.client.clone();
            let opened = tokio::time::timeout(OP_TIMEOUT, c.lease_keep_alive(lead.lease)).await;
            let Ok(Ok((mut keeper, mut stream))) = opened else {
                tracing::debug!(%endpoints, "cannot renew the lease (etcd unreachable?)");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            loop {
                let renew = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(OP_TIMEOUT, renew).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => {
                        warn!(%endpoints, "the leader key's lease expired; campaigning again");
                        self.set(Leadership {
                            lease: lead.lease,
                            key_rev: 0,
                        });
                        break;
                    }
                    _ => {
                        warn!(%endpoints, "cannot renew the leader key's lease; retrying");
                        break;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(KEEP_ALIVE_EVERY) => {}
                    // A write found the key is not ours: campaign now.
                    _ = lost.notified() => break,
                }
            }
        }
    }
}
