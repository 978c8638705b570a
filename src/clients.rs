//! API clients: who may call the service, with which role, and for which
//! owner.
//!
//! Clients live in `clients.json` in the keys directory (mode 0600). Each
//! has a name, a role and, for a cardholder's widget, the one owner it acts
//! for. The service keeps only the SHA-256 of each key: keys are 256 random
//! bits, so a plain hash is as strong as a slow one, and a stolen file
//! gives no key. `vcn client add` prints a key once; a running server picks
//! new and removed clients up within a second, without a restart.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

use crate::domain::Owner;

pub const CLIENTS_FILE: &str = "clients.json";
const KEY_PREFIX: &str = "vcn_";

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// CardService: the bank's web app and the cardholder's widget.
    Cards,
    /// AuthorizationService: the authorisation switch.
    Switch,
    /// All of CardService, for any owner.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Cards => "cards",
            Role::Switch => "switch",
            Role::Admin => "admin",
        }
    }
}

/// One registered client as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientEntry {
    pub name: String,
    pub role: Role,
    /// Set for a client that acts for one cardholder only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Hex SHA-256 of the client's key (empty for a client identified by
    /// its certificate only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_sha256: String,
    /// Hex SHA-256 of the DER of the client's TLS certificate, for a client
    /// identified by mTLS (no bearer key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ClientsFile {
    clients: Vec<ClientEntry>,
}

/// An authenticated caller, as the request handlers see it.
#[derive(Clone, PartialEq, Eq)]
pub struct Client {
    pub name: String,
    pub role: Role,
    pub owner: Option<Owner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Client({} as {})", self.name, self.role.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    #[error("client name must be 1 to 64 letters, digits, '.', '_' or '-'")]
    BadName,
    #[error("a client named {0} already exists")]
    Exists(String),
    #[error("no client named {0}")]
    Unknown(String),
    #[error("--owner: {0}")]
    BadOwner(String),
    #[error("--owner is only for clients of role cards")]
    OwnerNeedsCards,
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("the system random number generator failed")]
    Random,
}

fn file_error(path: &Path) -> impl Fn(String) -> ClientsError + '_ {
    move |reason| ClientsError::File {
        path: path.to_path_buf(),
        reason,
    }
}

pub fn clients_path(keys_dir: &Path) -> PathBuf {
    keys_dir.join(CLIENTS_FILE)
}

fn read(path: &Path) -> Result<ClientsFile, ClientsError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| file_error(path)(format!("not a clients file: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientsFile::default()),
        Err(e) => Err(file_error(path)(e.to_string())),
    }
}

/// Replaces the file atomically: write a temporary file, sync, rename.
fn write(path: &Path, file: &ClientsFile) -> Result<(), ClientsError> {
    let err = file_error(path);
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| err(e.to_string()))?;
        }
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err(e.to_string()))?;
    let text = serde_json::to_vec_pretty(file).map_err(|e| err(e.to_string()))?;
    f.write_all(&text)
        .and_then(|_| f.sync_all())
        .map_err(|e| err(e.to_string()))?;
    fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
    if let Some(dir) = path.parent().and_then(|d| fs::File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn key_hash(key: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()))
}

/// Registers a client identified by its TLS client certificate (mTLS): no
/// bearer key. `cert_sha256` is [`crate::certs::fingerprint_der`] of it.
pub fn add_cert(
    keys_dir: &Path,
    name: &str,
    role: Role,
    owner: Option<&str>,
    cert_sha256: &str,
) -> Result<(), ClientsError> {
    let path = clients_path(keys_dir);
    let mut file = check_new(&path, name, role, owner)?;
    if file
        .clients
        .iter()
        .any(|c| c.cert_sha256.as_deref() == Some(cert_sha256))
    {
        return Err(ClientsError::Exists(format!(
            "with this certificate ({})",
            &cert_sha256[..16.min(cert_sha256.len())]
        )));
    }
    file.clients.push(ClientEntry {
        name: name.to_string(),
        role,
        owner: owner.map(str::to_string),
        key_sha256: String::new(),
        cert_sha256: Some(cert_sha256.to_string()),
        created_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    });
    write(&path, &file)
}

/// Checks a new client's name, role and owner; the file as it is.
fn check_new(
    path: &Path,
    name: &str,
    role: Role,
    owner: Option<&str>,
) -> Result<ClientsFile, ClientsError> {
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !name_ok {
        return Err(ClientsError::BadName);
    }
    if let Some(o) = owner {
        Owner::parse("owner", o).map_err(|e| ClientsError::BadOwner(e.reason))?;
        if role != Role::Cards {
            return Err(ClientsError::OwnerNeedsCards);
        }
    }
    let file = read(path)?;
    if file.clients.iter().any(|c| c.name == name) {
        return Err(ClientsError::Exists(name.to_string()));
    }
    Ok(file)
}

/// Registers a client and returns its key (shown once, never stored).
pub fn add(
    keys_dir: &Path,
    name: &str,
    role: Role,
    owner: Option<&str>,
) -> Result<String, ClientsError> {
    let path = clients_path(keys_dir);
    let mut file = check_new(&path, name, role, owner)?;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ClientsError::Random)?;
    let key = format!("{KEY_PREFIX}{}", hex::encode(bytes));
    zeroize::Zeroize::zeroize(&mut bytes);
    file.clients.push(ClientEntry {
        name: name.to_string(),
        role,
        owner: owner.map(str::to_string),
        key_sha256: key_hash(&key),
        cert_sha256: None,
        created_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    });
    write(&path, &file)?;
    Ok(key)
}

pub fn list(keys_dir: &Path) -> Result<Vec<ClientEntry>, ClientsError> {
    Ok(read(&clients_path(keys_dir))?.clients)
}

pub fn remove(keys_dir: &Path, name: &str) -> Result<(), ClientsError> {
    let path = clients_path(keys_dir);
    let mut file = read(&path)?;
    let before = file.clients.len();
    file.clients.retain(|c| c.name != name);
    if file.clients.len() == before {
        return Err(ClientsError::Unknown(name.to_string()));
    }
    write(&path, &file)
}

/// The clients a running server knows, reloaded when the file changes.
pub struct Registry {
    path: PathBuf,
    state: RwLock<Loaded>,
    /// When the file was last looked at, in ms since `epoch`, plus one (0:
    /// not yet).
    last_check_ms: AtomicU64,
    epoch: Instant,
}

/// What identifies one version of the clients file: it is always replaced
/// by a rename, so a new version has a new inode even within one mtime tick.
type Stamp = Option<(u64, SystemTime, u64)>;

#[derive(Default)]
struct Loaded {
    stamp: Stamp,
    by_hash: HashMap<String, Arc<Client>>,
    by_cert: HashMap<String, Arc<Client>>,
}

/// How often a server looks at the clients file for changes (removals are
/// seen within this).
const RECHECK: Duration = Duration::from_millis(1000);
/// An unknown key looks at the file at once (a stat), so a client added
/// while the server runs works on its first call.
const RECHECK_ON_MISS: Duration = Duration::ZERO;

impl Registry {
    pub fn open(keys_dir: &Path) -> Result<Registry, ClientsError> {
        let r = Registry {
            path: clients_path(keys_dir),
            state: RwLock::new(Loaded::default()),
            last_check_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        r.reload()?;
        Ok(r)
    }

    pub fn len(&self) -> usize {
        self.state
            .read()
            .map(|s| s.by_hash.len() + s.by_cert.len())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn stamp(&self) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&self.path).ok()?;
        Some((m.ino(), m.modified().ok()?, m.len()))
    }

    fn reload(&self) -> Result<(), ClientsError> {
        let stamp = self.stamp();
        let file = read(&self.path)?;
        let mut by_hash = HashMap::new();
        let mut by_cert = HashMap::new();
        for c in file.clients {
            let owner = match c.owner.as_deref().map(|o| Owner::parse("owner", o)) {
                Some(Ok(o)) => Some(o),
                Some(Err(_)) => {
                    tracing::warn!(client = %c.name, "client skipped: its owner is not valid");
                    continue;
                }
                None => None,
            };
            let client = Arc::new(Client {
                name: c.name,
                role: c.role,
                owner,
            });
            if let Some(fp) = c.cert_sha256 {
                by_cert.insert(fp, client.clone());
            }
            if !c.key_sha256.is_empty() {
                by_hash.insert(c.key_sha256, client);
            }
        }
        if let Ok(mut s) = self.state.write() {
            *s = Loaded {
                stamp,
                by_hash,
                by_cert,
            };
        }
        Ok(())
    }

    /// Reloads the file if it changed since it was read, at most once per
    /// `min_gap`.
    fn refresh(&self, min_gap: Duration) {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_check_ms.swap(now, Ordering::Relaxed);
        if !min_gap.is_zero() && last != 0 && now.saturating_sub(last) < min_gap.as_millis() as u64
        {
            // Not due yet: put back when the last look was.
            let _ = self.last_check_ms.compare_exchange(
                now,
                last,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return;
        }
        let stamp = self.stamp();
        let changed = self.state.read().map(|s| s.stamp != stamp).unwrap_or(true);
        if changed {
            match self.reload() {
                Ok(()) => tracing::info!(clients = self.len(), "clients file reloaded"),
                // Keep serving the clients we know rather than none.
                Err(e) => tracing::error!(error = %e, "clients file could not be reloaded"),
            }
        }
    }

    /// The client registered with the TLS certificate of this fingerprint.
    pub fn authenticate_cert(&self, cert_sha256: &str) -> Option<Arc<Client>> {
        self.refresh(RECHECK);
        let find = || {
            self.state
                .read()
                .ok()
                .and_then(|s| s.by_cert.get(cert_sha256).cloned())
        };
        find().or_else(|| {
            self.refresh(RECHECK_ON_MISS);
            find()
        })
    }

    /// The client a key belongs to, if any.
    pub fn authenticate(&self, key: &str) -> Option<Arc<Client>> {
        self.refresh(RECHECK);
        let hash = key_hash(key);
        let find = || {
            self.state
                .read()
                .ok()
                .and_then(|s| s.by_hash.get(&hash).cloned())
        };
        find().or_else(|| {
            self.refresh(RECHECK_ON_MISS);
            find()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_authenticate_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let key = add(dir.path(), "web", Role::Cards, None).unwrap();
        assert!(key.starts_with("vcn_") && key.len() == 68);
        let text = fs::read_to_string(clients_path(dir.path())).unwrap();
        assert!(!text.contains(&key[4..]), "the key itself is never stored");
        let reg = Registry::open(dir.path()).unwrap();
        let c = reg.authenticate(&key).unwrap();
        assert_eq!(
            (c.name.as_str(), c.role, c.owner.clone()),
            ("web", Role::Cards, None)
        );
        assert!(reg.authenticate("vcn_wrong").is_none());
        assert!(matches!(
            add(dir.path(), "web", Role::Admin, None),
            Err(ClientsError::Exists(_))
        ));
        remove(dir.path(), "web").unwrap();
        assert!(matches!(
            remove(dir.path(), "web"),
            Err(ClientsError::Unknown(_))
        ));
        assert!(list(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn owner_pinning_is_for_cards_clients_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = add(dir.path(), "widget-1", Role::Cards, Some("cust-1")).unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        assert_eq!(
            reg.authenticate(&key)
                .unwrap()
                .owner
                .as_ref()
                .unwrap()
                .as_str(),
            "cust-1"
        );
        assert!(matches!(
            add(dir.path(), "sw", Role::Switch, Some("x")),
            Err(ClientsError::OwnerNeedsCards)
        ));
        assert!(matches!(
            add(dir.path(), "bad name", Role::Switch, None),
            Err(ClientsError::BadName)
        ));
        assert!(matches!(
            add(dir.path(), "w2", Role::Cards, Some("")),
            Err(ClientsError::BadOwner(_))
        ));
    }

    #[test]
    fn a_running_registry_sees_new_clients() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).unwrap();
        assert!(reg.is_empty());
        let key = add(dir.path(), "late", Role::Switch, None).unwrap();
        assert_eq!(reg.authenticate(&key).unwrap().name, "late");
        remove(dir.path(), "late").unwrap();
        let other = add(dir.path(), "late", Role::Switch, None).unwrap();
        assert_eq!(
            reg.authenticate(&other).unwrap().name,
            "late",
            "a rewrite in the same instant is seen"
        );
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(
            reg.authenticate(&key).is_none(),
            "the removed key stops working"
        );
    }
}
