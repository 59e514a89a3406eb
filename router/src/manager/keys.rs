//! The keys of encrypted networks, in memory only: made here, handed out in snapshots over
//! the control plane's mutual TLS, never persisted (a restarted manager makes new ones).
//!
//! The ring changes only when told the time: [`KeyRing::rotate_due`] (from the manager's
//! periodic tick, and after every state change) and [`KeyRing::rotate_now`] (an operator's or
//! a node's request). Reading it never changes it.

use crate::ids::new_secret;
use protocol::control::{Keyring, NetworkKey};
use protocol::state::ClusterState;
use protocol::types::NetworkName;
use std::time::Duration;

/// How long before a new key is used for sending: every node has it for receiving by then
/// (snapshots go out every second, agents look four times a second).
pub const KEY_LEAD: Duration = Duration::from_secs(3);
/// How long a replaced key is still accepted.
pub const KEY_GRACE: Duration = Duration::from_secs(30);
/// Swarm's rotation period for encrypted networks' keys.
pub const DEFAULT_KEY_ROTATION: Duration = Duration::from_secs(12 * 3600);
/// How often the manager looks for keys that are due: a new one for a network whose key is
/// older than the rotation period, retired ones to drop. Well inside [`KEY_LEAD`], so a
/// new key reaches every node long before any sends with it.
pub const KEY_TICK: Duration = Duration::from_millis(250);

/// Each encrypted network's live keys, and how often they are replaced.
pub struct KeyRing {
    ring: Keyring,
    rotation: Duration,
}

impl KeyRing {
    pub fn new(rotation: Duration) -> KeyRing {
        KeyRing {
            ring: Keyring::new(),
            rotation,
        }
    }

    pub fn set_rotation(&mut self, every: Duration) {
        self.rotation = every;
    }

    /// The keys every node should hold.
    pub fn keys(&self) -> &Keyring {
        &self.ring
    }

    /// Brings the ring up to date with `state` at `now_ms`: a key for each encrypted
    /// network (the first one active at once), none for networks that are gone, retired
    /// keys dropped, and a new key when the newest is older than the rotation period.
    pub fn rotate_due(&mut self, state: &ClusterState, now_ms: u64) {
        let now = now_ms;
        let rotation = self.rotation.as_millis() as u64;
        self.ring
            .retain(|net, _| state.networks.get(net).is_some_and(|n| n.encrypted()));
        for (name, net) in &state.networks {
            if !net.encrypted() {
                continue;
            }
            let keys = self.ring.entry(name.clone()).or_default();
            keys.retain(|key| key.retire_at_ms.is_none_or(|t| t > now));
            match keys.last() {
                None => keys.push(NetworkKey {
                    id: 0,
                    secret: new_secret(),
                    active_from_ms: now,
                    retire_at_ms: None,
                }),
                Some(last) if now.saturating_sub(last.active_from_ms) > rotation => {
                    rotate(keys, now)
                }
                Some(_) => {}
            }
        }
    }

    /// Takes over the keys another manager handed out (`ring`, from its last snapshot) and
    /// starts replacing every one of them at `now_ms` with the usual lead and grace: nodes
    /// keep sending and receiving with the keys they hold while the new ones spread, and
    /// secrets that passed through the previous leader are retired within [`KEY_GRACE`].
    pub fn take_over(&mut self, ring: Keyring, now_ms: u64) {
        self.ring = ring;
        for keys in self.ring.values_mut() {
            if keys.last().is_none_or(|last| last.active_from_ms <= now_ms) {
                rotate(keys, now_ms);
            }
        }
    }

    /// A new key for `network` now (`network rotate-key`, or a node's sequence numbers
    /// wearing out), unless a rotation is already under way (its key not yet in use).
    pub fn rotate_now(&mut self, network: &NetworkName, now_ms: u64) {
        let keys = self.ring.entry(network.clone()).or_default();
        if keys.last().is_none_or(|last| last.active_from_ms <= now_ms) {
            rotate(keys, now_ms);
        }
    }
}

/// Adds the next key of a network: in use after [`KEY_LEAD`], the current ones retired
/// [`KEY_GRACE`] after that.
fn rotate(keys: &mut Vec<NetworkKey>, now: u64) {
    let active = now + KEY_LEAD.as_millis() as u64;
    let retire = active + KEY_GRACE.as_millis() as u64;
    for k in keys.iter_mut() {
        k.retire_at_ms.get_or_insert(retire);
    }
    let id = keys
        .last()
        .map_or(0, |k| (k.id + 1) & protocol::esp::MAX_KEY_ID);
    keys.push(NetworkKey {
        id,
        secret: new_secret(),
        active_from_ms: active,
        retire_at_ms: None,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::control::send_key;
    use protocol::state::{NetworkRequest, Pool, OPT_ENCRYPTED};

    fn state_with(networks: &[(&str, bool)]) -> ClusterState {
        let mut s = ClusterState::default();
        for (i, (name, encrypted)) in networks.iter().enumerate() {
            let options = if *encrypted {
                [(OPT_ENCRYPTED.to_string(), String::new())].into()
            } else {
                Default::default()
            };
            let req = NetworkRequest {
                options,
                ..Default::default()
            };
            let name = NetworkName::new(*name).unwrap();
            s.create_network(name, req, Pool::default(), i.to_string(), 0)
                .unwrap();
        }
        s
    }

    fn ids(ring: &KeyRing, net: &str) -> Vec<u8> {
        ring.keys()
            .get(net)
            .map_or(vec![], |ks| ks.iter().map(|k| k.id).collect())
    }

    #[test]
    fn keys_follow_the_clock_they_are_given() {
        let hour = 3_600_000;
        let mut ring = KeyRing::new(Duration::from_millis(hour));
        let state = state_with(&[("sec", true), ("plain", false)]);
        let t0 = 1_000_000;
        assert!(ring.keys().is_empty(), "nothing until told the time");
        ring.rotate_due(&state, t0);
        assert_eq!(ids(&ring, "sec"), [0]);
        assert_eq!(ids(&ring, "plain"), Vec::<u8>::new());
        let first = ring.keys()["sec"][0].clone();
        assert_eq!(first.active_from_ms, t0, "the first key is in use at once");
        // Nothing is due before the rotation period has passed.
        ring.rotate_due(&state, t0 + hour);
        assert_eq!(ring.keys()["sec"], vec![first.clone()]);
        // Then a new key: received at once, sent with after the lead, the old one retired
        // a grace period after that.
        let t1 = t0 + hour + 1;
        ring.rotate_due(&state, t1);
        let keys = ring.keys()["sec"].clone();
        assert_eq!(ids(&ring, "sec"), [0, 1]);
        let active = t1 + KEY_LEAD.as_millis() as u64;
        assert_eq!(keys[1].active_from_ms, active);
        assert_eq!(
            keys[0].retire_at_ms,
            Some(active + KEY_GRACE.as_millis() as u64)
        );
        assert_eq!(send_key(&keys, active - 1).map(|k| k.id), Some(0));
        assert_eq!(send_key(&keys, active).map(|k| k.id), Some(1));
        let retire = active + KEY_GRACE.as_millis() as u64;
        ring.rotate_due(&state, retire - 1);
        assert_eq!(ids(&ring, "sec"), [0, 1], "kept until its retirement");
        ring.rotate_due(&state, retire);
        assert_eq!(ids(&ring, "sec"), [1], "dropped then");
        // A network that is gone takes its keys with it.
        ring.rotate_due(&ClusterState::default(), t1 + 2);
        assert!(ring.keys().is_empty());
    }

    #[test]
    fn a_new_leader_keeps_the_keys_in_use_while_it_replaces_them() {
        let mut old = KeyRing::new(DEFAULT_KEY_ROTATION);
        let state = state_with(&[("sec", true)]);
        old.rotate_due(&state, 10);
        let handed_out = old.keys().clone();
        let mut new = KeyRing::new(DEFAULT_KEY_ROTATION);
        let t = 5_000;
        new.take_over(handed_out.clone(), t);
        let keys = new.keys()["sec"].clone();
        assert_eq!(ids(&new, "sec"), [0, 1]);
        assert_eq!(keys[0].secret, handed_out["sec"][0].secret, "still live");
        assert_eq!(
            send_key(&keys, t).map(|k| k.id),
            Some(0),
            "sent with until the lead"
        );
        let active = t + KEY_LEAD.as_millis() as u64;
        assert_eq!(send_key(&keys, active).map(|k| k.id), Some(1));
        new.rotate_due(&state, active + KEY_GRACE.as_millis() as u64);
        assert_eq!(ids(&new, "sec"), [1], "the old leader's key retired");
    }

    #[test]
    fn a_rotation_under_way_is_not_restarted() {
        let mut ring = KeyRing::new(DEFAULT_KEY_ROTATION);
        let state = state_with(&[("sec", true)]);
        let net = NetworkName::new("sec").unwrap();
        ring.rotate_due(&state, 10);
        ring.rotate_now(&net, 20);
        ring.rotate_now(&net, 21);
        assert_eq!(ids(&ring, "sec"), [0, 1]);
        ring.rotate_now(&net, 20 + KEY_LEAD.as_millis() as u64);
        assert_eq!(ids(&ring, "sec"), [0, 1, 2]);
    }
}
