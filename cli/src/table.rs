//! Docker-style plain tables: upper-case headers, columns padded to their widest cell and
//! separated by three spaces.

pub fn print(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// "5 seconds ago" style ages, as `docker service ps` shows them.
pub fn ago(since: u64, now: u64) -> String {
    let d = now.saturating_sub(since);
    match d {
        0..=1 => "1 second ago".into(),
        2..=59 => format!("{d} seconds ago"),
        60..=119 => "1 minute ago".into(),
        120..=3599 => format!("{} minutes ago", d / 60),
        3600..=7199 => "1 hour ago".into(),
        _ => format!("{} hours ago", d / 3600),
    }
}

pub fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}
