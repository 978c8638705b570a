//! Master key files in the keys directory.
//!
//! `master.key` holds 64 hex digits (256 bits) and a newline, mode 0600.
//! It is written once (never overwritten) and refused when group or others
//! may read it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::vault::crypto::{MasterKey, KEY_LEN};

pub const MASTER_KEY_FILE: &str = "master.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path} already exists: refusing to overwrite a master key (move it away first if you really mean to replace it)")]
    Exists { path: PathBuf },
    #[error("no master key at {path}: run `vcn keygen --keys-dir {dir}` first")]
    Missing { path: PathBuf, dir: String },
    #[error("{path} may be read by group or others (mode {mode:o}): run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} is not a master key (expected 64 hex digits)")]
    Malformed { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the system random number generator failed")]
    Random,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn master_key_path(keys_dir: &Path) -> PathBuf {
    keys_dir.join(MASTER_KEY_FILE)
}

/// Writes a new random master key to `keys_dir/master.key` (creating the
/// directory with mode 0700), refusing to overwrite one. Returns its path.
pub fn generate(keys_dir: &Path) -> Result<PathBuf, KeyFileError> {
    use ring::rand::SecureRandom;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    ring::rand::SystemRandom::new()
        .fill(&mut key[..])
        .map_err(|_| KeyFileError::Random)?;
    write(keys_dir, &key)
}

/// Writes `key` as a new master key file.
pub fn write(keys_dir: &Path, key: &MasterKey) -> Result<PathBuf, KeyFileError> {
    if !keys_dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(keys_dir)
            .map_err(io(keys_dir))?;
    }
    let path = master_key_path(keys_dir);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeyFileError::Exists { path: path.clone() },
            _ => KeyFileError::Io {
                path: path.clone(),
                source: e,
            },
        })?;
    let mut text = Zeroizing::new(hex::encode(&key[..]));
    text.push('\n');
    file.write_all(text.as_bytes()).map_err(io(&path))?;
    file.sync_all().map_err(io(&path))?;
    if let Ok(dir) = fs::File::open(keys_dir) {
        let _ = dir.sync_all();
    }
    Ok(path)
}

/// Reads the master key, refusing a file that group or others may read.
pub fn load(keys_dir: &Path) -> Result<MasterKey, KeyFileError> {
    let path = master_key_path(keys_dir);
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyFileError::Missing {
                path,
                dir: keys_dir.display().to_string(),
            })
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions { path, mode });
    }
    let text = Zeroizing::new(fs::read_to_string(&path).map_err(io(&path))?);
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(text.trim(), &mut key[..])
        .map_err(|_| KeyFileError::Malformed { path: path.clone() })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_writes_0600_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let path = generate(&keys).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let first = load(&keys).unwrap();
        assert!(matches!(generate(&keys), Err(KeyFileError::Exists { .. })));
        assert_eq!(*load(&keys).unwrap(), *first, "the key must be unchanged");
    }

    #[test]
    fn load_refuses_readable_missing_and_malformed_keys() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(KeyFileError::Missing { .. })
        ));
        let path = generate(dir.path()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "not hex\n").unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(KeyFileError::Malformed { .. })
        ));
        // The error never echoes the file's content.
        fs::write(&path, format!("{}zz\n", "ab".repeat(31))).unwrap();
        assert!(!load(dir.path()).unwrap_err().to_string().contains("abab"));
    }
}
