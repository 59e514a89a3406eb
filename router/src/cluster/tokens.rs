//! The manager's two join tokens, one per role (`cluster join-token worker|manager`), and
//! their rotation (`--rotate`).
//!
//! A token is `SWMTKN-1-<CA digest>-<secret>`; only the secret differs between the roles.
//! Each secret lives in its own file of the state directory (mode 0600, replaced atomically
//! through [`crate::durable::write_atomic`]). Rotating makes a new secret for one role: the
//! old one is refused for joins from then on, and nodes that already joined are unaffected
//! (they hold certificates, not tokens).

use super::pki::{self, PkiError, Token};
use crate::naming;
use protocol::state::Role;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The join secrets of both roles, kept in memory and on disk.
pub struct JoinTokens {
    ca_digest: String,
    dir: PathBuf,
    worker: Mutex<String>,
    manager: Mutex<String>,
}

fn path(dir: &Path, role: Role) -> PathBuf {
    match role {
        // The worker's keeps the file name of the single token of earlier versions.
        Role::Worker => naming::join_secret(dir),
        Role::Manager => naming::manager_join_secret(dir),
    }
}

fn load_or_create(dir: &Path, role: Role) -> Result<String, PkiError> {
    let p = path(dir, role);
    if p.exists() {
        return Ok(pki::read(&p)?.trim().to_string());
    }
    let secret = pki::new_secret();
    pki::write_private(&p, &secret)?;
    Ok(secret)
}

impl JoinTokens {
    /// The secrets saved in `dir`, or new ones (saved there).
    pub fn open(dir: &Path, ca_digest: String) -> Result<JoinTokens, PkiError> {
        Ok(JoinTokens {
            ca_digest,
            dir: dir.to_path_buf(),
            worker: Mutex::new(load_or_create(dir, Role::Worker)?),
            manager: Mutex::new(load_or_create(dir, Role::Manager)?),
        })
    }

    fn slot(&self, role: Role) -> &Mutex<String> {
        match role {
            Role::Worker => &self.worker,
            Role::Manager => &self.manager,
        }
    }

    fn secret(&self, role: Role) -> String {
        self.slot(role)
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The token that joins a node with `role`.
    pub fn token(&self, role: Role) -> Token {
        Token {
            ca_digest: self.ca_digest.clone(),
            secret: self.secret(role),
        }
    }

    /// The role a presented secret joins with, if it is one of the current secrets
    /// (compared in constant time with both).
    pub fn role_of(&self, secret: &str) -> Option<Role> {
        let worker = pki::secret_matches(secret, &self.secret(Role::Worker));
        let manager = pki::secret_matches(secret, &self.secret(Role::Manager));
        match (worker, manager) {
            (_, true) => Some(Role::Manager),
            (true, false) => Some(Role::Worker),
            _ => None,
        }
    }

    /// Makes a new secret for `role`, saved before it replaces the old one; returns the new
    /// token. The old secret is refused from then on.
    pub fn rotate(&self, role: Role) -> Result<Token, PkiError> {
        let secret = pki::new_secret();
        let mut slot = self
            .slot(role)
            .lock()
            .map_err(|_| PkiError::Invalid("join token lock poisoned".into()))?;
        pki::write_private(&path(&self.dir, role), &secret)?;
        *slot = secret;
        drop(slot);
        Ok(self.token(role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn each_role_has_its_token_and_rotation_refuses_the_old_one() {
        let dir = std::env::temp_dir().join(format!("overlay-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t = JoinTokens::open(&dir, "ab".repeat(32)).unwrap();
        let worker = t.token(Role::Worker);
        let manager = t.token(Role::Manager);
        assert_ne!(worker.secret, manager.secret);
        assert_eq!(t.role_of(&worker.secret), Some(Role::Worker));
        assert_eq!(t.role_of(&manager.secret), Some(Role::Manager));
        assert_eq!(t.role_of("nope"), None);
        let mode = std::fs::metadata(naming::join_secret(&dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let rotated = t.rotate(Role::Worker).unwrap();
        assert_ne!(rotated.secret, worker.secret);
        assert_eq!(t.role_of(&worker.secret), None, "the old secret is refused");
        assert_eq!(t.role_of(&rotated.secret), Some(Role::Worker));
        assert_eq!(t.role_of(&manager.secret), Some(Role::Manager), "untouched");

        // A restart reads what was saved.
        let again = JoinTokens::open(&dir, "ab".repeat(32)).unwrap();
        assert_eq!(again.token(Role::Worker), rotated);
        assert_eq!(again.token(Role::Manager), manager);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
