//! This run's epoch for encrypted networks: one more than the last run's, kept in the state
//! directory (not secret) through [`durable::write_atomic`], so fsync'd before any key is
//! derived with it. Sending keys are derived with the node's name and epoch, and sequence
//! numbers start again at 1 at every start: an epoch used twice would seal two datagrams
//! under one (key, nonce) pair, which breaks AES-GCM. So an epoch that cannot be kept is
//! not used at all: the daemon starts, and its datapath seals nothing
//! (`esp_no_epoch`) until a start that can keep one.
//!
//! The epoch has 24 bits: each worker's epoch is this one above the worker's lane
//! (`datapath::keys::lane_epoch`).

use crate::durable;
use crate::naming;
use std::io;
use std::path::{Path, PathBuf};

const MASK: u32 = 0x00ff_ffff;

/// Why this run has no epoch.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error("reading the ESP epoch from {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the ESP epoch file {path} holds {text:?}, not a number (remove it to start from a random epoch)")]
    Garbled { path: PathBuf, text: String },
    #[error("keeping the ESP epoch in {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The epoch of this run: the last one kept in `state_dir` plus one (a random one, far
/// from the wrap, on a first start), once it is durably on disk.
pub fn next(state_dir: &Path) -> Result<u32, EpochError> {
    let path = naming::esp_epoch_file(state_dir);
    let epoch = match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(last) => last.wrapping_add(1) & MASK,
            Err(_) => return Err(EpochError::Garbled { path, text }),
        },
        // A first start: 2^23 restarts before the wrap.
        Err(e) if e.kind() == io::ErrorKind::NotFound => rand::random::<u32>() & (MASK >> 1),
        Err(source) => return Err(EpochError::Read { path, source }),
    };
    match durable::write_atomic(&path, epoch.to_string().as_bytes(), durable::PUBLIC) {
        Ok(()) => Ok(epoch),
        Err(source) => Err(EpochError::Write { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("overlay-epoch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn each_start_is_one_more_and_kept() {
        let d = tempdir("kept");
        let first = next(&d).unwrap();
        assert!(first <= MASK >> 1);
        assert_eq!(next(&d).unwrap(), first + 1);
        let on_disk = std::fs::read_to_string(naming::esp_epoch_file(&d)).unwrap();
        assert_eq!(on_disk, (first + 1).to_string());
        std::fs::write(naming::esp_epoch_file(&d), MASK.to_string()).unwrap();
        assert_eq!(next(&d).unwrap(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_epoch_that_cannot_be_kept_is_refused() {
        // The temporary file's place is taken by a directory: the write fails, even as
        // root (which file modes would not stop).
        let d = tempdir("unwritable");
        std::fs::write(naming::esp_epoch_file(&d), "41").unwrap();
        std::fs::create_dir(d.join(".esp-epoch.tmp")).unwrap();
        let e = next(&d).unwrap_err();
        assert!(matches!(e, EpochError::Write { .. }), "{e}");
        assert!(e.to_string().contains("keeping the ESP epoch in"), "{e}");
        // The last kept epoch is untouched: the next start that can write goes on from it.
        std::fs::remove_dir(d.join(".esp-epoch.tmp")).unwrap();
        assert_eq!(next(&d).unwrap(), 42);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unreadable_or_garbled_epoch_is_refused() {
        let d = tempdir("garbled");
        std::fs::write(naming::esp_epoch_file(&d), "forty-one").unwrap();
        assert!(matches!(next(&d), Err(EpochError::Garbled { .. })));
        std::fs::remove_file(naming::esp_epoch_file(&d)).unwrap();
        std::fs::create_dir(naming::esp_epoch_file(&d)).unwrap();
        assert!(matches!(next(&d), Err(EpochError::Read { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
