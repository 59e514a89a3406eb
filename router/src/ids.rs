//! Fresh random identifiers and secrets: ids of services, tasks and networks (as Swarm gives
//! them), and the secrets of encrypted networks' keys.

/// A random 25-character lowercase id, as Swarm gives services and tasks.
pub fn new_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..25)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A 256-bit secret from the system's random source (ring), for an encrypted network's key.
pub fn new_secret() -> [u8; protocol::esp::SECRET_LEN] {
    use ring::rand::SecureRandom;
    let mut s = [0u8; protocol::esp::SECRET_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut s)
        .expect("the system's random source works");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_swarm_shaped_and_distinct() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 25);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()));
        assert_ne!(a, b);
        assert_ne!(new_secret(), new_secret());
    }
}
