//! Who leads the cluster state on etcd. Every manager on one prefix runs a [`Campaign`] (a
//! task on its store's runtime) for as long as its store is open; the [`Election`] it shares
//! with the store's writers says whether this manager leads and who does.
//!
//! - **Following.** While another manager holds `PREFIX/leader`, the campaign reads the key
//!   every [`CAMPAIGN_EVERY`] and watches it: the holder is known within about that, and the
//!   campaign tries at once when the watch shows the key deleted.
//! - **Taking the lead.** A lease ([`LEASE_TTL`]), and `PREFIX/leader` created with it in
//!   `txn(create_revision == 0)`, this manager's [`LeaderInfo`] as value. The lease's id is
//!   kept in `STATE_DIR/etcd-lease`, so that a restart revokes the previous run's lease
//!   instead of waiting for it to expire (the state directory's lock says that run is over).
//! - **Leading.** The lease is renewed every [`KEEP_ALIVE_EVERY`]. The manager steps down
//!   (`leading` false) when etcd says the lease expired, when the watch shows the key
//!   deleted or created anew by someone else, or when a write finds it is not its own
//!   ([`Election::step_down`]); then it campaigns again. A lease that cannot be renewed
//!   because etcd does not answer does not step down by itself: etcd without quorum expires
//!   no lease, and extends them all when quorum returns; if the lease did expire meanwhile,
//!   the fenced writes refuse.
//! - **Stopping.** When the store is dropped the campaign revokes its lease, so that another
//!   manager leads at once rather than after the TTL.

use super::etcd::{unavailable, OP_TIMEOUT};
use super::layout::{Layout, LeaderInfo};
use super::StoreError;
use crate::durable::{write_atomic, PRIVATE};
use etcd_client::{
    Client, Compare, CompareOp, EventType, PutOptions, ResponseHeader, Txn, TxnOp, TxnOpResponse,
    WatchResponse, WatchStream,
};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Seconds the leader key outlives a manager that stopped renewing it: a leader killed
/// outright is replaced within this and `CAMPAIGN_EVERY` (a cluster should have a new
/// leader within 10 s).
pub const LEASE_TTL: i64 = 6;
/// How often the lease is renewed: two renewals may go unanswered (an etcd leader election
/// takes a second or two) before the lease is at risk.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(2);
/// How often a manager that does not lead reads the leader key and tries to take it.
const CAMPAIGN_EVERY: Duration = Duration::from_millis(500);
/// How long a starting manager that must lead may wait for a key held by someone else to
/// go: a lease that no `etcd-lease` file names (its state directory was lost) expires
/// within the TTL.
pub const STARTUP_WAIT: Duration = Duration::from_secs(LEASE_TTL as u64 + 2);
/// The longest that opening the watch may take; without it, the campaign still reads the
/// key every [`CAMPAIGN_EVERY`].
const WATCH_WITHIN: Duration = Duration::from_secs(1);
/// The longest that revoking the lease may take when the store is dropped.
pub const REVOKE_WITHIN: Duration = Duration::from_secs(1);

/// Whether (and by which lease and key) this manager leads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Leadership {
    /// The lease this manager holds (granted to take the key, or keeping it); 0 if none.
    pub lease: i64,
    /// The create revision of our leader key; 0 while not leading.
    pub key_rev: i64,
}

/// Whether this manager leads, and who does as last seen: changed by the campaign (and by a
/// write that finds the key is not ours), read by the store's writers, which fence on it,
/// and by the daemon, which serves or follows.
pub struct Election {
    lead: Mutex<Leadership>,
    leading: watch::Sender<bool>,
    leader: watch::Sender<Option<LeaderInfo>>,
    /// Wakes the campaign when a write found the key is not ours.
    lost: Notify,
}

impl Election {
    pub fn new(leader: Option<LeaderInfo>) -> Election {
        Election {
            lead: Mutex::default(),
            leading: watch::Sender::new(false),
            leader: watch::Sender::new(leader),
            lost: Notify::new(),
        }
    }

    pub fn leadership(&self) -> Leadership {
        *self.lead.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    pub fn leader(&self) -> Option<LeaderInfo> {
        self.leader.borrow().clone()
    }

    pub fn watch_leader(&self) -> watch::Receiver<Option<LeaderInfo>> {
        self.leader.subscribe()
    }

    /// A lease was granted (or given up: 0) while not leading.
    fn hold_lease(&self, lease: i64) {
        *self.lead.lock().unwrap_or_else(PoisonError::into_inner) =
            Leadership { lease, key_rev: 0 };
    }

    fn lead(&self, lead: Leadership, me: &LeaderInfo) {
        *self.lead.lock().unwrap_or_else(PoisonError::into_inner) = lead;
        self.saw(Some(me.clone()));
        self.leading
            .send_if_modified(|l| !std::mem::replace(l, true));
    }

    /// This manager no longer leads by the key it created at `key_rev`; false (nothing done)
    /// if it did not lead by that key (it stepped down already, or leads by a newer one).
    pub fn step_down(&self, key_rev: i64) -> bool {
        let mut lead = self.lead.lock().unwrap_or_else(PoisonError::into_inner);
        if key_rev == 0 || lead.key_rev != key_rev {
            return false;
        }
        lead.key_rev = 0;
        drop(lead);
        self.saw(None);
        self.leading
            .send_if_modified(|l| std::mem::replace(l, false));
        self.lost.notify_one();
        true
    }

    fn saw(&self, holder: Option<LeaderInfo>) {
        self.leader.send_if_modified(|h| {
            let changed = *h != holder;
            *h = holder;
            changed
        });
    }
}

/// Everything the campaign needs; it runs on the store's runtime until the store is dropped.
pub struct Campaign {
    client: Client,
    layout: Layout,
    me: LeaderInfo,
    endpoints: String,
    lease_file: PathBuf,
    election: Arc<Election>,
    /// The etcd revision of the latest news of the leader key: older news (a watch event
    /// that arrives after a newer read) is ignored.
    seen: i64,
}

fn revision(header: Option<&ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

/// The next response of `watch`; `None` once it broke or was cancelled, and from then on
/// `watch` is `None` and this never returns (the campaign opens a new watch).
async fn next(watch: &mut Option<WatchStream>) -> Option<WatchResponse> {
    let Some(stream) = watch else {
        return std::future::pending().await;
    };
    match stream.message().await {
        Ok(Some(resp)) if !resp.canceled() => Some(resp),
        Ok(_) | Err(_) => {
            debug!("the watch on the leader key ended; opening another");
            *watch = None;
            None
        }
    }
}

impl Campaign {
    pub fn new(
        client: Client,
        layout: Layout,
        me: LeaderInfo,
        endpoints: String,
        lease_file: PathBuf,
        election: Arc<Election>,
    ) -> Campaign {
        Campaign {
            client,
            layout,
            me,
            endpoints,
            lease_file,
            election,
            seen: 0,
        }
    }

    /// Campaigns, leads, follows, until `stop`; then steps down and revokes the lease.
    pub async fn run(mut self, stop: CancellationToken) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = self.campaign() => {}
        }
        let lead = self.election.leadership();
        self.election.step_down(lead.key_rev);
        if lead.lease != 0 {
            let mut c = self.client.clone();
            let _ = tokio::time::timeout(REVOKE_WITHIN, c.lease_revoke(lead.lease)).await;
        }
    }

    async fn campaign(&mut self) {
        let mut watch = None;
        loop {
            if watch.is_none() {
                watch = self.watch().await;
            }
            let lead = self.election.leadership();
            if lead.key_rev != 0 {
                self.keep(lead, &mut watch).await;
            } else if !self.try_lead().await {
                self.follow(&mut watch).await;
            }
        }
    }

    async fn watch(&self) -> Option<WatchStream> {
        let mut c = self.client.clone();
        match tokio::time::timeout(WATCH_WITHIN, c.watch(self.layout.leader(), None)).await {
            Ok(Ok(w)) => Some(w),
            Ok(Err(e)) => {
                debug!(error = %e, "cannot watch the leader key; reading it instead");
                None
            }
            Err(_) => None,
        }
    }

    /// News of the leader key as of etcd revision `rev`.
    fn saw(&mut self, rev: i64, holder: Option<LeaderInfo>) {
        if rev >= self.seen {
            self.seen = rev;
            self.election.saw(holder);
        }
    }

    /// One attempt: reads the leader key and, if nobody holds it, takes it. Says whether this
    /// manager leads now.
    async fn try_lead(&mut self) -> bool {
        let mut c = self.client.clone();
        match tokio::time::timeout(OP_TIMEOUT, c.get(self.layout.leader(), None)).await {
            Ok(Ok(resp)) => match resp.kvs().first() {
                // Our own lease holds it: an attempt that timed out after it took the key.
                Some(kv) if kv.lease() != 0 && kv.lease() == self.election.leadership().lease => {
                    self.seen = kv.mod_revision();
                    let lead = Leadership {
                        lease: kv.lease(),
                        key_rev: kv.create_revision(),
                    };
                    self.election.lead(lead, &self.me);
                    return true;
                }
                Some(kv) => {
                    let holder = LeaderInfo::parse(kv.value());
                    self.saw(revision(resp.header()), Some(holder));
                    return false;
                }
                None => {}
            },
            Ok(Err(e)) => {
                debug!(error = %e, "campaigning: reading the leader key");
                return false;
            }
            Err(_) => {
                debug!("campaigning: etcd did not answer");
                return false;
            }
        }
        match tokio::time::timeout(OP_TIMEOUT, self.acquire()).await {
            Ok(Ok(())) => {
                info!(endpoints = %self.endpoints, prefix = self.layout.prefix(), "leading the cluster state on etcd");
                true
            }
            Ok(Err(e)) => {
                debug!(error = %e, "campaigning for the leader key");
                false
            }
            Err(_) => {
                debug!("campaigning: etcd did not answer");
                false
            }
        }
    }

    /// Takes the leader key if nobody holds it: a new lease (the previous one revoked), and
    /// the key created with it. `Err(NotLeader)` names who was faster.
    async fn acquire(&mut self) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let old = self.election.leadership().lease;
        if old != 0 {
            let _ = c.lease_revoke(old).await;
            self.election.hold_lease(0);
        }
        let down = |e: etcd_client::Error| unavailable(&self.endpoints, e);
        let lease = c.lease_grant(LEASE_TTL, None).await.map_err(down)?.id();
        self.election.hold_lease(lease);
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
                self.me.encode(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(key.as_str(), None)]);
        let resp = c.txn(txn).await.map_err(down)?;
        if resp.succeeded() {
            let key_rev = revision(resp.header());
            self.seen = key_rev;
            self.election.lead(Leadership { lease, key_rev }, &self.me);
            return Ok(());
        }
        let _ = c.lease_revoke(lease).await;
        self.election.hold_lease(0);
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| LeaderInfo::parse(kv.value())),
            _ => None,
        });
        self.saw(revision(resp.header()), holder.clone());
        Err(StoreError::NotLeader {
            key,
            holder: holder.map_or_else(|| "someone".into(), |h| h.to_string()),
        })
    }

    /// Waits [`CAMPAIGN_EVERY`], or less if the watch shows the leader key deleted.
    async fn follow(&mut self, watch: &mut Option<WatchStream>) {
        let pause = tokio::time::sleep(CAMPAIGN_EVERY);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => return,
                resp = next(watch) => {
                    if resp.is_some_and(|r| self.observe(&r)) {
                        return;
                    }
                }
            }
        }
    }

    /// Renews the lease of `lead` until this manager steps down or a renewal fails (the
    /// caller's loop then decides what next), and keeps the watch open meanwhile.
    async fn keep(&mut self, lead: Leadership, watch: &mut Option<WatchStream>) {
        let endpoints = self.endpoints.clone();
        let mut c = self.client.clone();
        let opened = tokio::time::timeout(OP_TIMEOUT, c.lease_keep_alive(lead.lease)).await;
        let Ok(Ok((mut keeper, mut renewals))) = opened else {
            debug!(%endpoints, "cannot renew the lease (etcd unreachable?)");
            tokio::time::sleep(KEEP_ALIVE_EVERY / 2).await;
            return;
        };
        let election = self.election.clone();
        loop {
            let renew = async {
                keeper.keep_alive().await?;
                renewals.message().await
            };
            match tokio::time::timeout(OP_TIMEOUT, renew).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                Ok(Ok(Some(_))) => {
                    if election.step_down(lead.key_rev) {
                        warn!(%endpoints, "the leader key's lease expired; campaigning again");
                    }
                    return;
                }
                _ => {
                    warn!(%endpoints, "cannot renew the leader key's lease; retrying");
                    return;
                }
            }
            if watch.is_none() {
                *watch = self.watch().await;
            }
            let pause = tokio::time::sleep(KEEP_ALIVE_EVERY);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    // A write found the key is not ours (and stepped down).
                    _ = election.lost.notified() => return,
                    resp = next(watch) => {
                        // A watch that broke is opened again at the next renewal.
                        let Some(resp) = resp else { continue };
                        self.observe(&resp);
                        if election.leadership().key_rev != lead.key_rev {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Takes in what the watch saw of the leader key; says whether the key is free now.
    fn observe(&mut self, resp: &WatchResponse) -> bool {
        let mut free = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            if kv.mod_revision() < self.seen {
                continue;
            }
            self.seen = kv.mod_revision();
            let lead = self.election.leadership();
            match event.event_type() {
                EventType::Delete => {
                    if self.election.step_down(lead.key_rev) {
                        warn!("the leader key was deleted; campaigning again");
                    }
                    self.election.saw(None);
                    free = true;
                }
                // Ours (our own put, or an operator's put over it, which leaves it ours:
                // the fence is its create revision).
                EventType::Put if lead.key_rev != 0 && kv.create_revision() == lead.key_rev => {}
                EventType::Put => {
                    let holder = LeaderInfo::parse(kv.value());
                    if self.election.step_down(lead.key_rev) {
                        warn!(%holder, "another manager holds the leader key; following it");
                    }
                    self.election.saw(Some(holder));
                    free = false;
                }
            }
        }
        free
    }
}
