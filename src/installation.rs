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

/// Refuses an empty store when the keys directory has served a vault.
pub fn check(
    keys_dir: &Path,
    store: &str,
    store_has_vault: bool,
    new_vault: bool,
) -> Result<(), InstallationError> {
    if store_has_vault || new_vault {
        return Ok(());
    }
    let path = marker_path(keys_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
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
    Err(InstallationError::EmptyStore {
        store: store.to_string(),
        marker: path,
        was: m.store,
        created: m.created_at,
    })
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

    #[test]
    fn an_empty_store_is_refused_only_after_a_vault_was_recorded() {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path(), "data", false, false).unwrap();
        record(dir.path(), "data", "0123456789abcdef").unwrap();
        let err = check(dir.path(), "data", false, false).unwrap_err();
        assert!(err.to_string().contains("--new-vault"), "{err}");
        check(dir.path(), "data", true, false).unwrap();
        check(dir.path(), "data", false, true).unwrap();
    }
}
