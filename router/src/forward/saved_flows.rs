//! The load balancer's established TCP flows, saved in the node's state directory
//! ([`naming::saved_flows`]) every second by the sweeper and offered back to the connection
//! table by the next run (`conntrack::Resumable`), so that connections to a VIP survive a
//! restart of overlayd: a flow keeps the backend it had. A flow made in the last second
//! before a crash is not in the file; its next segment is dropped as `lb_no_flow`, as every
//! flow's was before.
//!
//! One line per flow, `VNI PROTO CLIENT CLIENT_PORT VIP VIP_PORT BACKEND`. The file is
//! replaced by a rename, without fsync: it serves a restart of the daemon, which the page
//! cache survives, not one of the machine (after which no task runs either); an fsync a
//! second of a file the size of the table would cost more than it could save.

use crate::naming;
use datapath::conntrack::{FlowKey, Resumable};
use std::io::{self, Write};
use std::path::Path;

/// Writes `flows` as the node's saved flows, replacing the previous file.
pub fn save(state_dir: &Path, flows: &[Resumable]) -> io::Result<()> {
    let path = naming::saved_flows(state_dir);
    let tmp = path.with_extension("tmp");
    let mut out = io::BufWriter::new(std::fs::File::create(&tmp)?);
    for r in flows {
        let k = &r.key;
        writeln!(
            out,
            "{} {} {} {} {} {} {}",
            k.vni, k.proto, k.src, k.sport, k.dst, k.dport, r.backend_ip
        )?;
    }
    out.into_inner().map_err(|e| e.into_error())?;
    std::fs::rename(&tmp, &path)
}

/// The flows a previous run saved; none if it saved none. Lines that do not parse are
/// skipped (and counted in the result's second half).
pub fn load(state_dir: &Path) -> io::Result<(Vec<Resumable>, usize)> {
    let text = match std::fs::read_to_string(naming::saved_flows(state_dir)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((vec![], 0)),
        Err(e) => return Err(e),
    };
    let mut bad = 0;
    let flows = text
        .lines()
        .filter_map(|l| {
            let r = parse(l);
            bad += usize::from(r.is_none());
            r
        })
        .collect();
    Ok((flows, bad))
}

fn parse(line: &str) -> Option<Resumable> {
    let f: Vec<&str> = line.split(' ').collect();
    let [vni, proto, src, sport, dst, dport, backend] = f.as_slice() else {
        return None;
    };
    Some(Resumable {
        key: FlowKey {
            vni: vni.parse().ok()?,
            proto: proto.parse().ok()?,
            src: src.parse().ok()?,
            sport: sport.parse().ok()?,
            dst: dst.parse().ok()?,
            dport: dport.parse().ok()?,
        },
        backend_ip: backend.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_flows_load_back_and_bad_lines_are_counted() {
        let dir = std::env::temp_dir().join(format!("overlay-flows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir).unwrap(), (vec![], 0));
        let flows = vec![Resumable {
            key: FlowKey {
                vni: 4097,
                proto: 6,
                src: "10.0.0.5".parse().unwrap(),
                sport: 40000,
                dst: "10.0.0.2".parse().unwrap(),
                dport: 80,
            },
            backend_ip: "10.0.0.3".parse().unwrap(),
        }];
        save(&dir, &flows).unwrap();
        let mut text = std::fs::read_to_string(naming::saved_flows(&dir)).unwrap();
        assert_eq!(text, "4097 6 10.0.0.5 40000 10.0.0.2 80 10.0.0.3\n");
        text.push_str("4097 6 10.0.0.5 x 10.0.0.2 80 10.0.0.3\ngarbage\n");
        std::fs::write(naming::saved_flows(&dir), text).unwrap();
        assert_eq!(load(&dir).unwrap(), (flows, 2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
