//! The cluster's two join tokens, one per role (`cluster join-token worker|manager`), and
//! their rotation (`--rotate`).
//!
//! A token is `SWMTKN-1-<CA digest>-<secret>`; only the secret differs between the roles.
//! Each secret is one of the store's [`Secret`]s: a file of the state directory (mode 0600)
//! on the file store, a key on etcd shared by every manager. Rotating makes a new secret for
//! one role: the old one is refused for joins from then on, by every manager, and nodes that
//! already joined are unaffected (they hold certificates, not tokens).
//!
//! The secrets are read from the store each time they are checked or shown, not kept: on
//! etcd, the leader may have rotated one since, and joins are rare enough for a read each.

use super::pki::{self, Token};
use crate::store::{Secret, Store, StoreError};
use protocol::state::Role;
use tracing::warn;

/// The join tokens of a cluster, as its store holds them.
pub struct JoinTokens {
    ca_digest: String,
    store: Store,
}

fn secret_of(role: Role) -> Secret {
    match role {
        Role::Worker => Secret::WorkerJoin,
        Role::Manager => Secret::ManagerJoin,
    }
}

impl JoinTokens {
    /// The secrets in `store`, or new ones saved there (on etcd, only the leader can make
    /// them: a follower opens the leader's).
    pub fn open(store: &Store, ca_digest: String) -> Result<JoinTokens, StoreError> {
        let tokens = JoinTokens {
            ca_digest,
            store: store.clone(),
        };
        for role in [Role::Worker, Role::Manager] {
            if tokens.current(role)?.is_none() {
                store.put_secret(secret_of(role), pki::new_secret().as_bytes())?;
            }
        }
        Ok(tokens)
    }

    /// The secret that joins a node with `role` now, if the store holds one.
    fn current(&self, role: Role) -> Result<Option<String>, StoreError> {
        let secret = secret_of(role);
        let Some(bytes) = self.store.secret(secret)? else {
            return Ok(None);
        };
        String::from_utf8(bytes)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|_| StoreError::Secret {
                name: secret.name(),
                why: "not text".into(),
            })
    }

    /// The token that joins a node with `role`.
    pub fn token(&self, role: Role) -> Result<Token, StoreError> {
        let secret = self.current(role)?.ok_or_else(|| StoreError::Secret {
            name: secret_of(role).name(),
            why: "the store holds none".into(),
        })?;
        Ok(Token {
            ca_digest: self.ca_digest.clone(),
            secret,
        })
    }

    /// The role a presented secret joins with, if it is one of the current secrets
    /// (compared in constant time with both). A secret the store cannot give admits nobody:
    /// without its store a manager could not record the new node anyway.
    pub fn role_of(&self, secret: &str) -> Option<Role> {
        let matches = |role| match self.current(role) {
            Ok(current) => current.is_some_and(|c| pki::secret_matches(secret, &c)),
            Err(e) => {
                warn!(error = %e, ?role, "cannot check a join token");
                false
            }
        };
        let worker = matches(Role::Worker);
        let manager = matches(Role::Manager);
        match (worker, manager) {
            (_, true) => Some(Role::Manager),
            (true, false) => Some(Role::Worker),
            _ => None,
        }
    }

    /// Makes a new secret for `role` and saves it; returns the new token. The old secret is
    /// refused from then on.
    pub fn rotate(&self, role: Role) -> Result<Token, StoreError> {
        let secret = pki::new_secret();
        self.store.put_secret(secret_of(role), secret.as_bytes())?;
        Ok(Token {
            ca_digest: self.ca_digest.clone(),
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn each_role_has_its_token_and_rotation_refuses_the_old_one() {
        let dir = std::env::temp_dir().join(format!("overlay-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let t = JoinTokens::open(&store, "ab".repeat(32)).unwrap();
        let worker = t.token(Role::Worker).unwrap();
        let manager = t.token(Role::Manager).unwrap();
        assert_ne!(worker.secret, manager.secret);
        assert_eq!(t.role_of(&worker.secret), Some(Role::Worker));
        assert_eq!(t.role_of(&manager.secret), Some(Role::Manager));
        assert_eq!(t.role_of("nope"), None);
        assert_eq!(t.role_of(""), None);
        // The files of earlier versions, with their mode.
        let file = naming::secret_file(&dir, Secret::WorkerJoin);
        assert_eq!(file, dir.join("join-secret"));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Another holder of the store (a follower, on etcd) sees a rotation at once.
        let other = JoinTokens::open(&store.clone(), "ab".repeat(32)).unwrap();
        assert_eq!(
            other.token(Role::Worker).unwrap(),
            worker,
            "opened, not remade"
        );
        let rotated = t.rotate(Role::Worker).unwrap();
        assert_ne!(rotated.secret, worker.secret);
        for tokens in [&t, &other] {
            assert_eq!(
                tokens.role_of(&worker.secret),
                None,
                "the old secret is refused"
            );
            assert_eq!(tokens.role_of(&rotated.secret), Some(Role::Worker));
            assert_eq!(
                tokens.role_of(&manager.secret),
                Some(Role::Manager),
                "untouched"
            );
        }
        assert_eq!(other.token(Role::Worker).unwrap(), rotated);

        // A restart reads what was saved.
        drop((t, other, store));
        let store = Store::open(&dir).unwrap();
        let again = JoinTokens::open(&store, "ab".repeat(32)).unwrap();
        assert_eq!(again.token(Role::Worker).unwrap(), rotated);
        assert_eq!(again.token(Role::Manager).unwrap(), manager);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
