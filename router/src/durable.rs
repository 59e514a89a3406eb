//! The one way this node writes durable state: [`write_atomic`]. The state file, the ESP
//! epoch, the Docker plugin's names, and the cluster's keys and certificates all go through
//! it, so a crash at any point leaves either the old file or the new one, never a torn or
//! empty one, and every file has the mode its writer chose (0600 for secrets and for
//! anything holding user environment).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of files that hold secrets or user environment.
pub const PRIVATE: u32 = 0o600;
/// Mode of files anyone on the machine may read.
pub const PUBLIC: u32 = 0o644;

/// The temporary file `path` is written to first: in the same directory (a rename never
/// crosses file systems), hidden, and recognisable.
fn temporary(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(".tmp");
    Ok(path.with_file_name(tmp))
}

/// Replaces `path` with `bytes`, durably and atomically, with file mode `mode`: writes a
/// temporary file in the same directory, fsyncs it, renames it over `path`, and fsyncs the
/// directory. Writers of one path must not run at once (each writer here holds its own
/// lock or runs once).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temporary(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // A temporary file a crash left behind may have another mode: start afresh.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode asked for, not what the umask left of it.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("overlay-durable-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn replaces_contents_with_the_mode_asked_and_leaves_no_temporary() {
        let dir = tempdir("replace");
        let path = dir.join("state.json");
        write_atomic(&path, b"first", PRIVATE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(mode_of(&path), 0o600);
        write_atomic(&path, b"second, longer", PUBLIC).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        assert_eq!(mode_of(&path), 0o644);
        write_atomic(&path, b"3", PRIVATE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"3", "no tail of the longer file");
        assert_eq!(mode_of(&path), 0o600);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"], "no temporary left");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_leftover_temporary_does_not_leak_its_mode() {
        let dir = tempdir("leftover");
        let path = dir.join("ca.key");
        let tmp = temporary(&path).unwrap();
        fs::write(&tmp, b"half written").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o666)).unwrap();
        write_atomic(&path, b"secret", PRIVATE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        assert_eq!(mode_of(&path), 0o600);
        assert!(!tmp.exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempdir("failed");
        let path = dir.join("esp-epoch");
        write_atomic(&path, b"41", PUBLIC).unwrap();
        // A directory where the file should be: the rename fails.
        let blocked = dir.join("blocked");
        fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(write_atomic(&blocked, b"x", PUBLIC).is_err());
        assert!(!temporary(&blocked).unwrap().exists());
        assert_eq!(fs::read(&path).unwrap(), b"41");
        let _ = fs::remove_dir_all(&dir);
    }
}
