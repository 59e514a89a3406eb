//! `overlayctl flows`: the node's load-balanced flows as a table, or followed (`-f`): the
//! table read twice a second and compared, so that watching costs the datapath nothing but
//! the reads (a flow that starts and ends between two reads is missed; a closed TCP flow
//! stays in the table for two seconds, so its end is seen), and the drop counters compared
//! the same way.

use crate::client::Client;
use crate::table;
use protocol::api::{DatapathStats, FlowInfo};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// How often `-f` reads the table.
const EVERY: Duration = Duration::from_millis(500);

fn secs(ms: u64) -> String {
    format!("{}s", ms / 1000)
}

/// Frames and bytes, as `12/3.4K`.
fn moved(frames: u64, bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{frames}/{bytes}"),
        _ => format!("{frames}/{v:.1}{}", UNITS[unit]),
    }
}

/// Where the backend runs: its node's name, or its address if the node is not known.
fn node(f: &FlowInfo) -> String {
    match f.backend_node.is_empty() {
        true => f.backend_at.clone(),
        false => f.backend_node.clone(),
    }
}

pub fn print(flows: &[FlowInfo]) {
    let rows: Vec<Vec<String>> = flows
        .iter()
        .map(|f| {
            vec![
                f.proto.clone(),
                f.client.clone(),
                f.vip.clone(),
                f.backend.clone(),
                node(f),
                f.state.clone(),
                secs(f.age_ms),
                secs(f.idle_ms),
                moved(f.frames_out, f.bytes_out),
                moved(f.frames_back, f.bytes_back),
                f.service.clone(),
            ]
        })
        .collect();
    table::print(
        &[
            "PROTO", "CLIENT", "VIP", "BACKEND", "NODE", "STATE", "AGE", "IDLE", "OUT", "BACK",
            "SERVICE",
        ],
        &rows,
    );
}

/// One flow as a line of the `-f` stream.
fn line(sign: char, f: &FlowInfo) -> String {
    format!(
        "{sign} {} {} {} -> {} ({}) {} {} out {} back {}",
        f.service,
        f.proto,
        f.client,
        f.vip,
        f.backend,
        node(f),
        f.state,
        moved(f.frames_out, f.bytes_out),
        moved(f.frames_back, f.bytes_back)
    )
}

/// The identity of a flow across reads.
fn key(f: &FlowInfo) -> (String, String, String) {
    (f.proto.clone(), f.client.clone(), f.vip.clone())
}

/// What changed between two reads of the table: flows that started, flows that ended (as
/// last seen), and flows that closed or were reset.
fn changes(before: &HashMap<(String, String, String), FlowInfo>, now: &[FlowInfo]) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for f in now {
        let k = key(f);
        match before.get(&k) {
            None => out.push(line('+', f)),
            Some(b) if b.state != f.state && (f.state == "closed" || f.state == "reset") => {
                out.push(line('~', f))
            }
            Some(_) => {}
        }
        seen.insert(k);
    }
    for (k, f) in before {
        if !seen.contains(k) {
            out.push(line('-', f));
        }
    }
    out
}

pub async fn follow(c: &Client, path: &str) -> anyhow::Result<()> {
    let mut flows: HashMap<(String, String, String), FlowInfo> = HashMap::new();
    let mut drops: BTreeMap<String, u64> = c.get::<DatapathStats>("/datapath/stats").await?.drops;
    let first: Vec<FlowInfo> = c.get(path).await?;
    for f in &first {
        println!("{}", line('=', f));
    }
    flows.extend(first.into_iter().map(|f| (key(&f), f)));
    loop {
        tokio::time::sleep(EVERY).await;
        let now: Vec<FlowInfo> = c.get(path).await?;
        for l in changes(&flows, &now) {
            println!("{l}");
        }
        flows = now.into_iter().map(|f| (key(&f), f)).collect();
        let d = c.get::<DatapathStats>("/datapath/stats").await?.drops;
        for (reason, n) in &d {
            let new = n.saturating_sub(drops.get(reason).copied().unwrap_or(0));
            if new > 0 {
                println!("! drop {reason} x{new}");
            }
        }
        drops = d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(client: &str, state: &str) -> FlowInfo {
        FlowInfo {
            service: "web".into(),
            proto: "tcp".into(),
            client: client.into(),
            vip: "10.0.0.2:80".into(),
            backend: "10.0.0.5:80".into(),
            backend_at: "local".into(),
            state: state.into(),
            age_ms: 1500,
            idle_ms: 0,
            ..FlowInfo::default()
        }
    }

    #[test]
    fn follow_reports_starts_closes_and_ends() {
        let before: HashMap<_, _> = [
            flow("10.0.0.9:1000", "established"),
            flow("10.0.0.9:1001", "established"),
        ]
        .into_iter()
        .map(|f| (key(&f), f))
        .collect();
        let now = vec![
            flow("10.0.0.9:1000", "closed"),
            flow("10.0.0.9:1002", "syn_sent"),
        ];
        let mut got = changes(&before, &now);
        got.sort();
        assert_eq!(
            got,
            vec![
                "+ web tcp 10.0.0.9:1002 -> 10.0.0.2:80 (10.0.0.5:80) local syn_sent out 0/0 back 0/0",
                "- web tcp 10.0.0.9:1001 -> 10.0.0.2:80 (10.0.0.5:80) local established out 0/0 back 0/0",
                "~ web tcp 10.0.0.9:1000 -> 10.0.0.2:80 (10.0.0.5:80) local closed out 0/0 back 0/0",
            ]
        );
    }
}
