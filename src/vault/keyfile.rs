//! Master key files in the keys directory.
//!
//! One master key per key version. A version's key is either one file of
//! 64 hex digits (256 bits) and a newline, or N component files that are
//! XORed together at start (split knowledge: no single custodian holds the
//! key). Version 1 keeps the historical names:
//!
//! | version | one file | components | recorded check value |
//! |---|---|---|---|
//! | 1 | `master.key` | `master.component1.key` ... | `master.kcv` |
//! | N ≥ 2 | `master.vN.key` | `master.vN.component1.key` ... | `master.vN.kcv` |
//!
//! Every file is written once (never overwritten), mode 0600, and refused
//! at load when group or others may read it or when it belongs to another
//! user than the one running the service. The `.kcv` file holds the key
//! check value printed at the key ceremony: when the combined components do
//! not give it, one of them is wrong and the service refuses to start.
//! Retired versions are moved to `retired/` and never read again.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::vault::crypto::{DataKeys, MasterKey, KEY_LEN};

pub const MASTER_KEY_FILE: &str = "master.key";
/// Where retired key files are moved: never read by the service.
pub const RETIRED_DIR: &str = "retired";
/// Most components a key may be split into.
pub const MAX_COMPONENTS: usize = 9;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path} already exists: refusing to overwrite a master key (move it away first if you really mean to replace it)")]
    Exists { path: PathBuf },
    #[error("no master key at {path}: run `vcn keygen --keys-dir {dir}` first")]
    Missing { path: PathBuf, dir: String },
    #[error("{path} may be read by group or others (mode {mode:o}): run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} belongs to user id {owner}, not to the user running vcn ({me}): run `chown {me} {path}`")]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} is not a master key (expected 64 hex digits)")]
    Malformed { path: PathBuf },
    #[error(
        "key version {version} has both a single key file and component files: keep one form only"
    )]
    Ambiguous { version: u32 },
    #[error("key version {version}: component files must be numbered 1 to {count} without gaps; component {missing} is missing")]
    ComponentGap {
        version: u32,
        count: usize,
        missing: usize,
    },
    #[error("key version {version}: the key components combine to check value {got}, but the key ceremony recorded {want} (in {path}): a component is wrong or missing")]
    ComponentsMismatch {
        version: u32,
        got: String,
        want: String,
        path: PathBuf,
    },
    #[error("--components must be 2 to {MAX_COMPONENTS} (or leave it out for a single key file)")]
    BadComponentCount,
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

fn stem(version: u32) -> String {
    if version == 1 {
        "master".to_string()
    } else {
        format!("master.v{version}")
    }
}

/// The single-file path of a key version.
pub fn version_path(keys_dir: &Path, version: u32) -> PathBuf {
    keys_dir.join(format!("{}.key", stem(version)))
}

/// The path of component `i` (from 1) of a key version.
pub fn component_path(keys_dir: &Path, version: u32, i: usize) -> PathBuf {
    keys_dir.join(format!("{}.component{i}.key", stem(version)))
}

/// The file holding the check value recorded when a version was made.
pub fn kcv_path(keys_dir: &Path, version: u32) -> PathBuf {
    keys_dir.join(format!("{}.kcv", stem(version)))
}

pub fn master_key_path(keys_dir: &Path) -> PathBuf {
    version_path(keys_dir, 1)
}

pub fn random_key() -> Result<MasterKey, KeyFileError> {
    use ring::rand::SecureRandom;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    ring::rand::SystemRandom::new()
        .fill(&mut key[..])
        .map_err(|_| KeyFileError::Random)?;
    Ok(key)
}

/// The key check value of a master key (16 hex digits, public).
pub fn check_value(key: &MasterKey) -> String {
    DataKeys::derive(key).check_value().to_string()
}

fn ensure_dir(keys_dir: &Path) -> Result<(), KeyFileError> {
    if !keys_dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(keys_dir)
            .map_err(io(keys_dir))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Creates `path` (and its directory) holding `text`, mode 0600, never
/// overwriting, synced: a secret of the service's own (audit key, webhook
/// secret). Read it back with [`read_secret_file`].
pub fn create_secret_file(path: &Path, text: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text)?;
    file.sync_all()
}

/// Reads a secret file, refusing one that group or others may read; the
/// error says how to fix it, and never holds the content.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, String> {
    let mode = fs::metadata(path)
        .map_err(|e| e.to_string())?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "may be read by group or others (mode {mode:o}): run `chmod 600 {}`",
            path.display()
        ));
    }
    Ok(Zeroizing::new(
        fs::read_to_string(path).map_err(|e| e.to_string())?,
    ))
}

/// Writes `text` to a new file of mode `mode`, refusing to overwrite.
fn write_new(path: &Path, text: &[u8], mode: u32) -> Result<(), KeyFileError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeyFileError::Exists {
                path: path.to_path_buf(),
            },
            _ => KeyFileError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    file.write_all(text).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    Ok(())
}

fn write_key(path: &Path, key: &MasterKey) -> Result<(), KeyFileError> {
    let mut text = Zeroizing::new(hex::encode(&key[..]));
    text.push('\n');
    write_new(path, text.as_bytes(), 0o600)
}

/// Writes a new random master key to `keys_dir/master.key` (creating the
/// directory with mode 0700), refusing to overwrite one. Returns its path.
pub fn generate(keys_dir: &Path) -> Result<PathBuf, KeyFileError> {
    let key = random_key()?;
    write(keys_dir, &key)
}

/// Writes `key` as a new master key file (version 1).
pub fn write(keys_dir: &Path, key: &MasterKey) -> Result<PathBuf, KeyFileError> {
    let (mut paths, _) = write_version(keys_dir, 1, key, 1)?;
    Ok(paths.remove(0))
}

/// What a key ceremony produced: the files written and the check value.
#[derive(Debug)]
pub struct Generated {
    pub version: u32,
    pub paths: Vec<PathBuf>,
    pub check_value: String,
}

/// Makes a new random key of `version`: one file (`components` 1) or
/// `components` files whose XOR is the key. Records its check value.
pub fn generate_version(
    keys_dir: &Path,
    version: u32,
    components: usize,
) -> Result<Generated, KeyFileError> {
    let key = random_key()?;
    let (paths, check_value) = write_version(keys_dir, version, &key, components)?;
    Ok(Generated {
        version,
        paths,
        check_value,
    })
}

fn write_version(
    keys_dir: &Path,
    version: u32,
    key: &MasterKey,
    components: usize,
) -> Result<(Vec<PathBuf>, String), KeyFileError> {
    if components == 0 || components > MAX_COMPONENTS {
        return Err(KeyFileError::BadComponentCount);
    }
    ensure_dir(keys_dir)?;
    // Refuse before writing anything when this version exists in any form.
    for p in std::iter::once(version_path(keys_dir, version))
        .chain((1..=MAX_COMPONENTS).map(|i| component_path(keys_dir, version, i)))
    {
        if p.exists() {
            return Err(KeyFileError::Exists { path: p });
        }
    }
    let kcv = check_value(key);
    let mut paths = vec![];
    if components == 1 {
        let p = version_path(keys_dir, version);
        write_key(&p, key)?;
        paths.push(p);
    } else {
        // Components 1..N-1 random; the last makes the XOR the key.
        let mut last = Zeroizing::new(**key);
        for i in 1..components {
            let c = random_key()?;
            for (l, b) in last.iter_mut().zip(c.iter()) {
                *l ^= b;
            }
            let p = component_path(keys_dir, version, i);
            write_key(&p, &c)?;
            paths.push(p);
        }
        let p = component_path(keys_dir, version, components);
        write_key(&p, &last)?;
        paths.push(p);
    }
    let kcv_file = kcv_path(keys_dir, version);
    let _ = fs::remove_file(&kcv_file);
    write_new(&kcv_file, format!("{kcv}\n").as_bytes(), 0o600)?;
    sync_dir(keys_dir);
    Ok((paths, kcv))
}

/// The user id this process runs as.
fn my_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Reads one key file, refusing one that group or others may read or that
/// another user owns.
fn read_key(path: &Path) -> Result<MasterKey, KeyFileError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let me = my_uid();
    if meta.uid() != me {
        return Err(KeyFileError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io(path))?);
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(text.trim(), &mut key[..]).map_err(|_| KeyFileError::Malformed {
        path: path.to_path_buf(),
    })?;
    Ok(key)
}

/// The key versions present in `keys_dir` (not retired), by their files.
pub fn versions(keys_dir: &Path) -> Result<Vec<u32>, KeyFileError> {
    let mut found = std::collections::BTreeSet::new();
    let entries = match fs::read_dir(keys_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(keys_dir)(e)),
    };
    for entry in entries {
        let name = entry.map_err(io(keys_dir))?.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("master") else {
            continue;
        };
        let Some(rest) = rest.strip_suffix(".key") else {
            continue;
        };
        let (version, rest) = match rest.strip_prefix(".v") {
            Some(r) => {
                let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
                match digits.parse::<u32>() {
                    Ok(v) if v >= 2 => (v, r[digits.len()..].to_string()),
                    _ => continue,
                }
            }
            None => (1, rest.to_string()),
        };
        let is_component = rest
            .strip_prefix(".component")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if rest.is_empty() || is_component {
            found.insert(version);
        }
    }
    Ok(found.into_iter().collect())
}

/// Loads one key version: its single file, or its components XORed and
/// checked against the recorded check value.
pub fn load_version(keys_dir: &Path, version: u32) -> Result<MasterKey, KeyFileError> {
    let single = version_path(keys_dir, version);
    let components: Vec<usize> = (1..=MAX_COMPONENTS)
        .filter(|&i| component_path(keys_dir, version, i).exists())
        .collect();
    let key = match (single.exists(), components.is_empty()) {
        (true, false) => return Err(KeyFileError::Ambiguous { version }),
        (true, true) => read_key(&single)?,
        (false, true) => {
            return Err(KeyFileError::Missing {
                path: single,
                dir: keys_dir.display().to_string(),
            })
        }
        (false, false) => {
            let count = *components.last().unwrap_or(&0);
            if let Some(missing) = (1..=count).find(|i| !components.contains(i)) {
                return Err(KeyFileError::ComponentGap {
                    version,
                    count,
                    missing,
                });
            }
            let mut key = Zeroizing::new([0u8; KEY_LEN]);
            for i in 1..=count {
                let c = read_key(&component_path(keys_dir, version, i))?;
                for (k, b) in key.iter_mut().zip(c.iter()) {
                    *k ^= b;
                }
            }
            key
        }
    };
    let recorded = kcv_path(keys_dir, version);
    if let Ok(text) = fs::read_to_string(&recorded) {
        let want = text.trim().to_string();
        let got = check_value(&key);
        if !want.is_empty() && want != got {
            return Err(KeyFileError::ComponentsMismatch {
                version,
                got,
                want,
                path: recorded,
            });
        }
    }
    Ok(key)
}

/// Every key version in `keys_dir`, loaded and checked; Missing when there
/// is none.
pub fn load_all(keys_dir: &Path) -> Result<BTreeMap<u32, MasterKey>, KeyFileError> {
    let versions = versions(keys_dir)?;
    if versions.is_empty() {
        return Err(KeyFileError::Missing {
            path: master_key_path(keys_dir),
            dir: keys_dir.display().to_string(),
        });
    }
    let mut out = BTreeMap::new();
    for v in versions {
        out.insert(v, load_version(keys_dir, v)?);
    }
    Ok(out)
}

/// Reads the version-1 master key, refusing a file that group or others
/// may read.
pub fn load(keys_dir: &Path) -> Result<MasterKey, KeyFileError> {
    load_version(keys_dir, 1)
}

/// Moves every file of `version` into `keys_dir/retired/`, where the
/// service never looks. Returns the files moved.
pub fn retire(keys_dir: &Path, version: u32) -> Result<Vec<PathBuf>, KeyFileError> {
    let retired = keys_dir.join(RETIRED_DIR);
    ensure_dir(&retired)?;
    let mut moved = vec![];
    let candidates = std::iter::once(version_path(keys_dir, version))
        .chain((1..=MAX_COMPONENTS).map(|i| component_path(keys_dir, version, i)))
        .chain(std::iter::once(kcv_path(keys_dir, version)));
    for p in candidates {
        if p.exists() {
            let Some(name) = p.file_name() else { continue };
            let to = retired.join(name);
            fs::rename(&p, &to).map_err(io(&p))?;
            moved.push(to);
        }
    }
    sync_dir(keys_dir);
    sync_dir(&retired);
    Ok(moved)
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
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(KeyFileError::Permissions { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::remove_file(kcv_path(dir.path(), 1)).unwrap();
        fs::write(&path, "not hex\n").unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(KeyFileError::Malformed { .. })
        ));
        // The error never echoes the file's content.
        fs::write(&path, format!("{}zz\n", "ab".repeat(31))).unwrap();
        assert!(!load(dir.path()).unwrap_err().to_string().contains("abab"));
    }

    #[test]
    fn a_key_owned_by_another_user_is_refused() {
        if my_uid() != 0 {
            eprintln!("skipped: changing a file's owner needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = generate(dir.path()).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(
            matches!(err, KeyFileError::Owner { owner: 65534, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chown"), "{err}");
    }

    #[test]
    fn components_combine_to_the_key_and_a_wrong_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate_version(dir.path(), 1, 3).unwrap();
        assert_eq!(g.paths.len(), 3);
        for p in &g.paths {
            assert_eq!(fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let key = load(dir.path()).unwrap();
        assert_eq!(check_value(&key), g.check_value);
        // No single component is the key.
        for p in &g.paths {
            assert_ne!(*read_key(p).unwrap(), *key);
        }
        // A wrong component: the XOR no longer gives the recorded value.
        let p2 = component_path(dir.path(), 1, 2);
        fs::remove_file(&p2).unwrap();
        write_key(&p2, &random_key().unwrap()).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("a component is wrong"), "{err}");
        assert!(err.contains(&g.check_value), "{err}");
        // A missing one is named.
        fs::remove_file(&p2).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("component 2 is missing"), "{err}");
        assert!(matches!(
            generate_version(dir.path(), 2, 10),
            Err(KeyFileError::BadComponentCount)
        ));
    }

    #[test]
    fn versions_are_found_and_retired_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path()).unwrap();
        generate_version(dir.path(), 2, 2).unwrap();
        generate_version(dir.path(), 3, 1).unwrap();
        fs::write(dir.path().join("clients.json"), "{}").unwrap();
        assert_eq!(versions(dir.path()).unwrap(), vec![1, 2, 3]);
        assert_eq!(load_all(dir.path()).unwrap().len(), 3);
        assert!(matches!(
            generate_version(dir.path(), 2, 1),
            Err(KeyFileError::Exists { .. })
        ));
        let moved = retire(dir.path(), 1).unwrap();
        assert_eq!(moved.len(), 2, "{moved:?}");
        assert_eq!(versions(dir.path()).unwrap(), vec![2, 3]);
        assert!(dir.path().join("retired/master.key").exists());
    }
}
