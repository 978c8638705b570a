//! Never start an empty vault on an existing installation.
//!
//! The first time a vault is created, `installation.json` is written beside
//! the master key: the keys directory then knows it serves a vault. If a
//! later start finds the store empty (a data directory that went missing,
//! a volume that did not mount, a database URL pointing elsewhere), the
//! server refuses instead of creating a fresh, empty vault and declining
//! every live card. `vcn serve --new-vault` starts afresh on purpose.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const MARKER_FILE: &str = "installation.json";

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// Where the vault was created (data directory or database).
    store: String,
    /// Key check value of the master key it was created with.
    key_check_value: String,
    /// RFC 3339.
    created_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallationError {
    #[error(
        "the vault at {store} is empty, but {marker} says this installation created a vault at {was} on {created}: \
         refusing to start an empty vault over an existing installation. Restore the data (vcn restore), fix the \
         data directory or store setting, or pass --new-vault to start a new, empty vault on purpose"
    )]
    EmptyStore {
        store: String,
        marker: PathBuf,
        was: String,
        created: String,
    },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

fn marker_path(keys_dir: &Path) -> PathBuf {
    keys_dir.join(MARKER_FILE)
}

/// What the keys directory's marker said when it was read: read it
/// BEFORE asking the store whether it holds a vault. Instances that share
/// a database (and a keys directory) may start at once on an empty one:
/// the first writes the vault's key check value to the store, then the
/// marker. Read in that order, a marker that is there means the store
/// check that follows sees the vault; read the other way round, the
/// second instance could see the store still empty and then the first's
/// marker, and refuse a vault that exists.
#[derive(Debug)]
pub struct Recorded {
    /// The marker file read (named in a refusal).
    path: PathBuf,
    /// What it held, or `None` when there was none.
    marker: Option<Marker>,
}

/// Reads the keys directory's marker (see [`Recorded`] for when).
pub fn recorded(keys_dir: &Path) -> Result<Recorded, InstallationError> {
    let path = marker_path(keys_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Recorded { path, marker: None })
        }
        Err(e) => {
            return Err(InstallationError::File {
                path,
                reason: e.to_string(),
            })
        }
    };
    let m: Marker = serde_json::from_str(&text).map_err(|e| InstallationError::File {
        path: path.clone(),
        reason: format!("not an installation marker: {e}"),
    })?;
    Ok(Recorded {
        path,
        marker: Some(m),
    })
}

/// Refuses an empty store when the keys directory had served a vault by
/// the time `recorded` was read, and the store was asked after that.
pub fn check(
    recorded: Recorded,
    store: &str,
    store_has_vault: bool,
    new_vault: bool,
) -> Result<(), InstallationError> {
    if store_has_vault || new_vault {
        return Ok(());
    }
    match recorded.marker {
        None => Ok(()),
        Some(m) => Err(InstallationError::EmptyStore {
            store: store.to_string(),
            marker: recorded.path,
            was: m.store,
            created: m.created_at,
        }),
    }
}

/// Records that this keys directory now serves a vault.
pub fn record(
    keys_dir: &Path,
    store: &str,
    key_check_value: &str,
) -> Result<(), InstallationError> {
    let path = marker_path(keys_dir);
    let marker = Marker {
        store: store.to_string(),
        key_check_value: key_check_value.to_string(),
        created_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    };
    let err = |e: std::io::Error| InstallationError::File {
        path: path.clone(),
        reason: e.to_string(),
    };
    let text = serde_json::to_vec_pretty(&marker).unwrap_or_default();
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    if let Ok(dir) = std::fs::File::open(keys_dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_now(dir: &Path, has_vault: bool, new_vault: bool) -> Result<(), InstallationError> {
        check(recorded(dir)?, "data", has_vault, new_vault)
    }

    #[test]
    fn an_empty_store_is_refused_only_after_a_vault_was_recorded() {
        let dir = tempfile::tempdir().unwrap();
        check_now(dir.path(), false, false).unwrap();
        record(dir.path(), "data", "0123456789abcdef").unwrap();
        let err = check_now(dir.path(), false, false).unwrap_err();
        assert!(err.to_string().contains("--new-vault"), "{err}");
        check_now(dir.path(), true, false).unwrap();
        check_now(dir.path(), false, true).unwrap();
    }

    /// Two instances starting at once on one empty database: the second
    /// read the marker (none yet), then the first created the vault and
    /// recorded it, then the second found the store... as it was when it
    /// looked, empty. What was read first decides: it starts.
    #[test]
    fn a_marker_written_after_it_was_read_does_not_refuse_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let before = recorded(dir.path()).unwrap();
        record(dir.path(), "db", "0123456789abcdef").unwrap();
        check(before, "db", false, false).unwrap();
        // Read after it was written, the marker refuses an empty store.
        let after = recorded(dir.path()).unwrap();
        assert!(check(after, "db", false, false).is_err());
    }

    #[test]
    fn a_marker_that_is_not_one_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MARKER_FILE), "{").unwrap();
        let err = recorded(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(MARKER_FILE) && err.contains("not an installation marker"),
            "{err}"
        );
    }
}
