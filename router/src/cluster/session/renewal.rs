//! When a node renews its certificate: Swarm's rule, at a random point between 50% and 80%
//! of the certificate's validity, so a cluster's nodes do not all renew at once and a
//! renewal that fails has time to be retried before the certificate expires; and at once
//! when the desired state gives the node another role than its certificate carries
//! (`node promote` / `node demote`).
//!
//! Wall-clock time (certificate validity is in Unix seconds) is an argument: the driver
//! turns the answer into an `Instant` for [`super::node::NodeSession`].

use protocol::state::Role;
use std::time::Duration;

/// The earliest and latest point of the validity at which a node renews.
pub const RENEW_FROM: f64 = 0.5;
pub const RENEW_UNTIL: f64 = 0.8;

/// The Unix second at which a certificate valid from `not_before` to `not_after` is
/// renewed; `jitter` in [0, 1) picks the point between [`RENEW_FROM`] and [`RENEW_UNTIL`].
pub fn renew_at(not_before: u64, not_after: u64, jitter: f64) -> u64 {
    let lifetime = not_after.saturating_sub(not_before) as f64;
    let fraction = RENEW_FROM + (RENEW_UNTIL - RENEW_FROM) * jitter.clamp(0.0, 1.0);
    not_before + (lifetime * fraction) as u64
}

/// How long from `now` (Unix seconds) until that point; zero if it has passed.
pub fn renew_in(now: u64, not_before: u64, not_after: u64, jitter: f64) -> Duration {
    Duration::from_secs(renew_at(not_before, not_after, jitter).saturating_sub(now))
}

/// Whether the node must renew now because its role changed: the state knows the node and
/// gives it another role than its certificate carries (a certificate without a role, from
/// before roles existed, is renewed too).
pub fn role_changed(cert: Option<Role>, state: Option<Role>) -> bool {
    match state {
        Some(role) => cert != Some(role),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    #[test]
    fn renewal_falls_between_half_and_four_fifths_of_the_validity() {
        let (nb, na) = (1_000, 1_000 + 90 * DAY);
        assert_eq!(renew_at(nb, na, 0.0), nb + 45 * DAY);
        assert_eq!(renew_at(nb, na, 1.0), nb + 72 * DAY);
        let mid = renew_at(nb, na, 0.5);
        assert!(mid > nb + 45 * DAY && mid < nb + 72 * DAY);
        // Out-of-range jitter is clamped; a nonsense validity renews at once.
        assert_eq!(renew_at(nb, na, 7.0), nb + 72 * DAY);
        assert_eq!(renew_at(nb, nb - 1, 0.3), nb);
    }

    #[test]
    fn time_until_renewal_counts_from_now_and_never_goes_negative() {
        // A 30 s certificate (33 s with its backdating): renewed 16 to 26 s in.
        let (nb, na) = (100, 133);
        assert_eq!(renew_in(100, nb, na, 0.0), Duration::from_secs(16));
        assert_eq!(renew_in(103, nb, na, 1.0), Duration::from_secs(23));
        assert_eq!(renew_in(500, nb, na, 0.5), Duration::ZERO, "overdue: now");
    }

    #[test]
    fn a_new_role_renews_at_once() {
        use Role::*;
        assert!(role_changed(Some(Worker), Some(Manager)));
        assert!(role_changed(Some(Manager), Some(Worker)));
        assert!(
            role_changed(None, Some(Worker)),
            "a certificate without a role"
        );
        assert!(!role_changed(Some(Worker), Some(Worker)));
        assert!(
            !role_changed(Some(Worker), None),
            "the state does not know us yet"
        );
    }
}
