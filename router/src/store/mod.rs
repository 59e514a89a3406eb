//! Where the desired state is kept. By default (`--store file`) one JSON document
//! (`state.json`) in the state directory, replaced atomically ([`write_atomic`]: temporary
//! file, fsync, rename, fsync of the directory) so a crash at any point leaves either the old
//! or the new state, never a torn one. It holds services' commands and environment, so only
//! root reads it (0600). A lock file keeps two daemons off one state directory (whatever the
//! store).
//!
//! A manager may keep it on etcd instead (`--store etcd`, [`etcd`]): one key per object
//! ([`layout`]), every change one transaction fenced on the leader key, for which every
//! manager on the prefix campaigns. Then `state.json` is only read once, to import it into an
//! empty etcd, and renamed `state.json.imported`: a second copy that nobody keeps up to date
//! would only mislead.
//!
//! Besides the state, the store keeps what the managers share ([`Secret`]: the CA, the join
//! secrets): files of the state directory (0600), or keys on etcd so that whichever manager
//! leads next has them.
//!
//! A [`Store`] is a handle: clones share one open store (one etcd client and campaign, one
//! directory lock), held for as long as any clone lives. The daemon gives one to each
//! manager it starts over its life.

mod campaign;
pub mod etcd;
pub mod layout;

pub use crate::naming::Secret;
pub use layout::LeaderInfo;

use crate::durable::{write_atomic, PRIVATE};
use nix::fcntl::{Flock, FlockArg};
use protocol::state::{ClusterState, FORMAT};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating state directory {0}: {1}")]
    Dir(PathBuf, io::Error),
    #[error("state directory {0} is in use by another overlayd")]
    Locked(PathBuf),
    #[error("reading {0}: {1}")]
    Read(PathBuf, io::Error),
    #[error("{0} is not a valid state file (refusing to start rather than lose state): {1}")]
    Corrupt(PathBuf, serde_json::Error),
    #[error("{path} has state format {found}; this overlayd understands format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("writing {0}: {1}")]
    Write(PathBuf, io::Error),
    #[error("the state store (etcd at {endpoints}) is unavailable: {why}; nothing was changed")]
    Unavailable { endpoints: String, why: String },
    #[error(
        "this manager is no longer the leader of the cluster state (etcd key {key} is held by \
         {holder}); nothing was changed"
    )]
    NotLeader { key: String, holder: String },
    #[error(
        "the state under {prefix} in etcd was changed by another writer since this manager \
         loaded it; nothing was changed (restart this manager to load it)"
    )]
    Conflict { prefix: String },
    #[error("etcd refused the change: {0}")]
    Refused(String),
    #[error("the cluster's {name}: {why}")]
    Secret { name: &'static str, why: String },
    #[error("the state in etcd: {0}")]
    Layout(layout::LayoutError),
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    /// The store cannot take changes now, but may later (etcd down, leadership lost): the
    /// API answers 503 rather than 500.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. }
                | StoreError::NotLeader { .. }
                | StoreError::Conflict { .. }
        )
    }
}

/// Takes an exclusive flock on `path` (created if missing) for as long as the returned value
/// lives; `None` if another process holds it.
pub fn lock_exclusive(path: &Path) -> std::io::Result<Option<Flock<File>>> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock).ok())
}

/// An exclusive lock that exists only while held: the file is removed when the lock is
/// dropped (while still held), so a lock directory does not fill with one file per name
/// ever used. A process that opened the file just before its holder removed it would lock
/// a file nobody else can find; taking the lock therefore checks that the path still
/// names the locked file, and tries again if not.
pub struct NameLock {
    path: PathBuf,
    _lock: Flock<File>,
}

impl NameLock {
    /// Takes the lock at `path`; `None` if another process holds it.
    pub fn acquire(path: &Path) -> io::Result<Option<NameLock>> {
        use std::os::unix::fs::MetadataExt;
        loop {
            let Some(lock) = lock_exclusive(path)? else {
                return Ok(None);
            };
            let held = lock.metadata()?;
            match fs::metadata(path) {
                Ok(m) if (m.dev(), m.ino()) == (held.dev(), held.ino()) => {
                    return Ok(Some(NameLock {
                        path: path.to_path_buf(),
                        _lock: lock,
                    }))
                }
                // Removed (or replaced) by the holder before us: lock the file there now.
                Ok(_) | Err(_) => continue,
            }
        }
    }
}

impl Drop for NameLock {
    fn drop(&mut self) {
        // Runs before the lock field is dropped: the file goes while the lock is held.
        let _ = fs::remove_file(&self.path);
    }
}

/// An open store; cheap to clone (see the module's doc).
#[derive(Clone)]
pub struct Store(Arc<Open>);

struct Open {
    dir: PathBuf,
    backend: Backend,
    _lock: Flock<File>,
}

enum Backend {
    /// `state.json` and the files beside it. There is no election: this manager is the only
    /// one, and always leads (the channels say so to whoever asks).
    File {
        leading: watch::Sender<bool>,
        leader: watch::Sender<Option<LeaderInfo>>,
    },
    // Boxed: the etcd store is large, the file store small.
    Etcd(Box<etcd::EtcdStore>),
}

/// Opens (creating if needed) and locks a state directory.
fn lock_dir(dir: &Path) -> Result<Flock<File>, StoreError> {
    fs::create_dir_all(dir).map_err(|e| StoreError::Dir(dir.to_path_buf(), e))?;
    let lock_path = crate::naming::state_lock(dir);
    // An upgrade's predecessor may hold it a moment longer.
    crate::upgrade::patiently(|| {
        lock_exclusive(&lock_path)
            .map_err(|e| StoreError::Dir(lock_path.clone(), e))?
            .ok_or_else(|| StoreError::Locked(dir.to_path_buf()))
    })
}

impl Store {
    /// Opens (creating if needed) and locks a state directory; the state is `state.json`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let lock = lock_dir(dir)?;
        Ok(Store(Arc::new(Open {
            dir: dir.to_path_buf(),
            backend: Backend::File {
                leading: watch::Sender::new(true),
                leader: watch::Sender::new(None),
            },
            _lock: lock,
        })))
    }

    /// Opens and locks a state directory, and keeps the desired state on etcd: connects,
    /// and campaigns for the leader key under `cfg.prefix` as `me` (see [`etcd`]). Returns
    /// without waiting to lead.
    pub fn open_etcd(
        dir: &Path,
        cfg: &etcd::EtcdConfig,
        me: &LeaderInfo,
    ) -> Result<Store, StoreError> {
        let lock = lock_dir(dir)?;
        let etcd = etcd::EtcdStore::open(cfg, me, dir)?;
        Ok(Store(Arc::new(Open {
            dir: dir.to_path_buf(),
            backend: Backend::Etcd(Box::new(etcd)),
            _lock: lock,
        })))
    }

    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    /// Whether the state lives on etcd (shared by the managers) rather than in this directory.
    pub fn on_etcd(&self) -> bool {
        self.etcd().is_some()
    }

    fn etcd(&self) -> Option<&etcd::EtcdStore> {
        match &self.0.backend {
            Backend::Etcd(e) => Some(e),
            Backend::File { .. } => None,
        }
    }

    fn state_path(&self) -> PathBuf {
        crate::naming::state_file(self.dir())
    }

    /// True while this manager holds the leader key (always, on the file store).
    pub fn leading(&self) -> watch::Receiver<bool> {
        match &self.0.backend {
            Backend::File { leading, .. } => leading.subscribe(),
            Backend::Etcd(e) => e.leading(),
        }
    }

    /// Who leads, as this manager last saw the leader key (itself while it leads). `None`
    /// when nobody does, when etcd has not answered yet, and on the file store (no election).
    pub fn leader(&self) -> Option<LeaderInfo> {
        match &self.0.backend {
            Backend::File { leader, .. } => leader.borrow().clone(),
            Backend::Etcd(e) => e.leader(),
        }
    }

    /// [`Store::leader`], changing when the leader does: a follower re-targets on it.
    pub fn watch_leader(&self) -> watch::Receiver<Option<LeaderInfo>> {
        match &self.0.backend {
            Backend::File { leader, .. } => leader.subscribe(),
            Backend::Etcd(e) => e.watch_leader(),
        }
    }

    /// Waits up to `within` for this manager to lead (at once on the file store); refuses,
    /// naming the holder, if another manager still does (a start that must lead: `--init`).
    pub async fn wait_leading(&self, within: Duration) -> Result<(), StoreError> {
        match self.etcd() {
            Some(etcd) => etcd.wait_leading(within).await,
            None => Ok(()),
        }
    }

    /// The saved state, or an empty one on first start. On etcd, for a manager that has just
    /// taken the lead (at every takeover: it forgets what it wrote when it led before): the
    /// state there, or, if etcd holds none, `state.json` imported into it (then renamed
    /// `state.json.imported`); and the secrets of the state directory imported if etcd holds
    /// none ([`etcd::EtcdStore::import_secrets`]), so a cluster moving to etcd keeps its CA
    /// and tokens. Importing needs the lead.
    pub fn load(&self) -> Result<ClusterState, StoreError> {
        let Some(etcd) = self.etcd() else {
            return Ok(self.load_file()?.unwrap_or_default());
        };
        let (state, imported) = etcd.load(self.load_file()?)?;
        let path = self.state_path();
        if imported {
            let to = crate::naming::state_file_imported(self.dir());
            fs::rename(&path, &to).map_err(|e| StoreError::Write(to, e))?;
        }
        if etcd.import_secrets(self.file_secrets()?)? {
            info!(dir = %self.dir().display(), "imported the CA and join secrets into etcd");
        }
        Ok(state)
    }

    /// The stored state, for a manager that does not lead: read, nothing written or
    /// imported; `None` if there is none yet.
    pub fn read_state(&self) -> Result<Option<ClusterState>, StoreError> {
        match self.etcd() {
            Some(etcd) => etcd.read_state(),
            None => self.load_file(),
        }
    }

    /// `state.json`, if there is one.
    fn load_file(&self) -> Result<Option<ClusterState>, StoreError> {
        let path = self.state_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Read(path, e)),
        };
        let state: ClusterState =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt(path.clone(), e))?;
        if state.format != FORMAT {
            return Err(StoreError::Format {
                path,
                found: state.format,
            });
        }
        Ok(Some(state))
    }

    pub fn save(&self, state: &ClusterState) -> Result<(), StoreError> {
        if let Some(etcd) = self.etcd() {
            return etcd.save(state);
        }
        let path = self.state_path();
        let body = serde_json::to_vec_pretty(state)
            .map_err(|e| StoreError::Write(path.clone(), e.into()))?;
        write_atomic(&path, &body, PRIVATE).map_err(|e| StoreError::Write(path, e))
    }

    /// One secret the managers share, if the store holds it. On etcd any manager may read
    /// it, leading or not.
    pub fn secret(&self, secret: Secret) -> Result<Option<Vec<u8>>, StoreError> {
        match self.etcd() {
            Some(etcd) => etcd.secret(secret),
            None => self.file_secret(secret),
        }
    }

    /// Replaces one secret the managers share. On etcd only the leader may (fenced like the
    /// state).
    pub fn put_secret(&self, secret: Secret, value: &[u8]) -> Result<(), StoreError> {
        if let Some(etcd) = self.etcd() {
            return etcd.put_secret(secret, value);
        }
        let path = crate::naming::secret_file(self.dir(), secret);
        write_atomic(&path, value, PRIVATE).map_err(|e| StoreError::Write(path, e))
    }

    fn file_secret(&self, secret: Secret) -> Result<Option<Vec<u8>>, StoreError> {
        let path = crate::naming::secret_file(self.dir(), secret);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Read(path, e)),
        }
    }

    /// Every secret the state directory holds as a file.
    fn file_secrets(&self) -> Result<Vec<(Secret, Vec<u8>)>, StoreError> {
        let mut found = Vec::new();
        for secret in Secret::ALL {
            if let Some(bytes) = self.file_secret(secret)? {
                found.push((secret, bytes));
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_name_lock_is_exclusive_and_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("overlay-namelock-{}", std::process::id()));
        let path = dir.join("n1.lock");
        let held = NameLock::acquire(&path).unwrap().expect("free");
        assert!(
            NameLock::acquire(&path).unwrap().is_none(),
            "held elsewhere"
        );
        drop(held);
        assert!(!path.exists(), "removed with the lock");
        let again = NameLock::acquire(&path).unwrap().expect("free again");
        assert!(path.exists());
        drop(again);
        let _ = fs::remove_dir_all(&dir);
    }

    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("overlay-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn roundtrip_lock_and_corruption() {
        let dir = tempdir("rt");
        {
            let s = Store::open(&dir).unwrap();
            assert_eq!(s.load().unwrap(), ClusterState::default());
            let st = ClusterState {
                revision: 7,
                ..Default::default()
            };
            s.save(&st).unwrap();
            assert_eq!(s.load().unwrap().revision, 7);
            assert!(matches!(Store::open(&dir), Err(StoreError::Locked(_))));
        }
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.load().unwrap().revision, 7);
        fs::write(dir.join("state.json"), b"{not json").unwrap();
        let e = s.load().unwrap_err();
        assert!(e.to_string().contains("not a valid state file"), "{e}");
        fs::write(
            dir.join("state.json"),
            br#"{"format":99,"revision":0,"networks":{},"services":{},"tasks":{},"nodes":{}}"#,
        )
        .unwrap();
        assert!(matches!(
            s.load(),
            Err(StoreError::Format { found: 99, .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
