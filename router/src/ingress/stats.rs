//! Counters of the routing mesh, per published port: the proxy thread counts into atomics
//! per connection (never per frame) and the API reads a snapshot.

use protocol::api::IngressPortStats;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One published port on this node.
#[derive(Debug, Default)]
pub struct PortCounters {
    pub service: String,
    pub mode: String,
    pub listening: AtomicBool,
    pub error: Mutex<Option<String>>,
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub refused: AtomicU64,
    pub reset: AtomicU64,
    pub dropped: AtomicU64,
    /// UDP mappings that made room for a new client at the port's cap.
    pub evicted: AtomicU64,
    /// Payload bytes from clients to tasks (TCP stream bytes, UDP datagram payloads; a
    /// PROXY header counts too), and back.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl PortCounters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` (the proxy thread is the only writer; nothing is added when `n` is 0).
    pub fn add(c: &AtomicU64, n: usize) {
        if n > 0 {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub fn dec(c: &AtomicU64) {
        let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// Records whether the port is open, and why not.
    pub fn set_listening(&self, result: Result<(), String>) {
        self.listening.store(result.is_ok(), Ordering::Relaxed);
        if let Ok(mut e) = self.error.lock() {
            *e = result.err();
        }
    }
}

/// Every published port's counters, by `PORT/PROTOCOL`.
#[derive(Debug, Default)]
pub struct Registry {
    ports: Mutex<BTreeMap<String, Arc<PortCounters>>>,
}

impl Registry {
    /// The counters of `key`, made if new (or if the port changed hands).
    pub fn port(&self, key: &str, service: &str, mode: &str) -> Arc<PortCounters> {
        let Ok(mut ports) = self.ports.lock() else {
            return Arc::default();
        };
        let entry = ports.entry(key.to_string()).or_default();
        if entry.service != service || entry.mode != mode {
            *entry = Arc::new(PortCounters {
                service: service.to_string(),
                mode: mode.to_string(),
                ..PortCounters::default()
            });
        }
        entry.clone()
    }

    /// Forgets ports no longer published here.
    pub fn retain(&self, keys: &[String]) {
        if let Ok(mut ports) = self.ports.lock() {
            ports.retain(|k, _| keys.contains(k));
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, IngressPortStats> {
        let Ok(ports) = self.ports.lock() else {
            return BTreeMap::new();
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ports
            .iter()
            .map(|(k, c)| {
                let stats = IngressPortStats {
                    service: c.service.clone(),
                    mode: c.mode.clone(),
                    listening: c.listening.load(Ordering::Relaxed),
                    error: c.error.lock().ok().and_then(|e| e.clone()),
                    accepted: get(&c.accepted),
                    active: get(&c.active),
                    refused: get(&c.refused),
                    reset: get(&c.reset),
                    dropped: get(&c.dropped),
                    evicted: get(&c.evicted),
                    bytes_in: get(&c.bytes_in),
                    bytes_out: get(&c.bytes_out),
                };
                (k.clone(), stats)
            })
            .collect()
    }
}
