//! Backups: a consistent copy of the vault's entries as stored (numbers
//! stay sealed), and restoring one into an empty data directory.
//!
//! File format: the 8 bytes `VCNBAK01`; entries as (u32 key length, key,
//! u32 value length, value), big-endian; then u32 0xFFFF_FFFF, the u64
//! number of entries and the SHA-256 of everything before it. A file cut
//! short or altered fails its checksum, and restore writes nothing.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::vault::embedded::{EngineKind, EngineOptions};
use crate::vault::records::KEY_CHECK_VALUE;
use crate::vault::store::{Store, StoreError, Write as StoreWrite};

const MAGIC: &[u8; 8] = b"VCNBAK01";
const END: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0} is not a vcn backup, or it is damaged: {1}")]
    Damaged(PathBuf, String),
    #[error("{0} already holds data: restore only into an empty or new data directory")]
    NotEmpty(PathBuf),
    #[error("this backup was made with another master key (check value {backup}, keys directory has {keys}): restore with the keys it was made with")]
    WrongKey { backup: String, keys: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Writes a backup of `store` to `path`; returns the number of entries.
pub async fn write(store: &dyn Store, path: &Path) -> Result<u64, BackupError> {
    let file_err = |e: std::io::Error| BackupError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut out = HashingWriter::new(BufWriter::new(File::create(path).map_err(file_err)?));
    out.write_all(MAGIC).map_err(file_err)?;
    let mut sink = |k: &[u8], v: &[u8]| -> Result<(), StoreError> {
        let io = |e: std::io::Error| StoreError::Unavailable(format!("writing the backup: {e}"));
        out.write_all(&(k.len() as u32).to_be_bytes()).map_err(io)?;
        out.write_all(k).map_err(io)?;
        out.write_all(&(v.len() as u32).to_be_bytes()).map_err(io)?;
        out.write_all(v).map_err(io)
    };
    let n = store.export(&mut sink).await?;
    out.write_all(&END.to_be_bytes()).map_err(file_err)?;
    out.write_all(&n.to_be_bytes()).map_err(file_err)?;
    let (mut inner, digest) = out.finish();
    inner.write_all(&digest).map_err(file_err)?;
    let file = inner.into_inner().map_err(|e| file_err(e.into_error()))?;
    file.sync_all().map_err(file_err)?;
    Ok(n)
}

/// A backup file whose checksum has been verified.
pub struct Backup {
    path: PathBuf,
}

impl Backup {
    /// Opens a backup and proves it whole (checksum over the entire file)
    /// before anything is read from it.
    pub fn open(path: &Path) -> Result<Backup, BackupError> {
        let damaged = |why: &str| BackupError::Damaged(path.to_path_buf(), why.to_string());
        let file = File::open(path).map_err(|e| BackupError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < (MAGIC.len() + 4 + 8 + 32) as u64 {
            return Err(damaged("too short"));
        }
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut r = BufReader::new(file);
        let mut remaining = len - 32;
        let mut buf = vec![0u8; 64 * 1024];
        while remaining > 0 {
            let take = remaining.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..take])
                .map_err(|_| damaged("cut short"))?;
            hasher.update(&buf[..take]);
            remaining -= take as u64;
        }
        let mut want = [0u8; 32];
        r.read_exact(&mut want).map_err(|_| damaged("cut short"))?;
        if hasher.finish().as_ref() != want {
            return Err(damaged("checksum mismatch"));
        }
        Ok(Backup {
            path: path.to_path_buf(),
        })
    }

    /// The entries, in order. The last item is an error if the entry count
    /// does not match.
    pub fn entries(&self) -> Result<Entries, BackupError> {
        let mut r = BufReader::new(File::open(&self.path).map_err(|e| BackupError::File {
            path: self.path.clone(),
            reason: e.to_string(),
        })?);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)
            .map_err(|_| self.damaged("cut short"))?;
        if &magic != MAGIC {
            return Err(self.damaged("not a vcn backup"));
        }
        Ok(Entries {
            reader: r,
            path: self.path.clone(),
            seen: 0,
            done: false,
        })
    }

    fn damaged(&self, why: &str) -> BackupError {
        BackupError::Damaged(self.path.clone(), why.to_string())
    }
}

pub struct Entries {
    reader: BufReader<File>,
    path: PathBuf,
    seen: u64,
    done: bool,
}

impl Iterator for Entries {
    type Item = Result<(Vec<u8>, Vec<u8>), BackupError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let damaged = |why: &str| {
            Some(Err(BackupError::Damaged(
                self.path.clone(),
                why.to_string(),
            )))
        };
        let Some(klen) = read_u32(&mut self.reader) else {
            self.done = true;
            return damaged("cut short");
        };
        if klen == END {
            self.done = true;
            let mut count = [0u8; 8];
            if self.reader.read_exact(&mut count).is_err() || u64::from_be_bytes(count) != self.seen
            {
                return damaged("entry count mismatch");
            }
            return None;
        }
        let entry = (|| {
            let key = read_bytes(&mut self.reader, klen)?;
            let vlen = read_u32(&mut self.reader)?;
            let value = read_bytes(&mut self.reader, vlen)?;
            Some((key, value))
        })();
        match entry {
            Some(e) => {
                self.seen += 1;
                Some(Ok(e))
            }
            None => {
                self.done = true;
                damaged("cut short")
            }
        }
    }
}

fn read_u32(r: &mut impl Read) -> Option<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok()?;
    Some(u32::from_be_bytes(b))
}

fn read_bytes(r: &mut impl Read, len: u32) -> Option<Vec<u8>> {
    if len > 64 * 1024 * 1024 {
        return None;
    }
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v).ok()?;
    Some(v)
}

/// Restores a backup into `data_dir` (which must be empty or absent), as a
/// vault on `engine` (a backup's format is the same for every engine). When
/// `key_check_value` is given, the backup must have been made with that key.
pub async fn restore(
    from: &Path,
    data_dir: &Path,
    engine: EngineKind,
    key_check_value: Option<&str>,
) -> Result<u64, BackupError> {
    if std::fs::read_dir(data_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(BackupError::NotEmpty(data_dir.to_path_buf()));
    }
    // Check the whole file, its structure and the key before writing anything.
    let backup = Backup::open(from)?;
    let mut backup_kcv = None;
    for entry in backup.entries()? {
        let (k, v) = entry?;
        if k == KEY_CHECK_VALUE {
            backup_kcv = Some(String::from_utf8_lossy(&v).to_string());
        }
    }
    if let (Some(keys), Some(backup)) = (key_check_value, &backup_kcv) {
        if keys != backup {
            return Err(BackupError::WrongKey {
                backup: backup.clone(),
                keys: keys.to_string(),
            });
        }
    }
    let store = crate::vault::embedded::open(data_dir, engine, &EngineOptions::default())?;
    let mut batch = Vec::new();
    let mut n = 0;
    for entry in backup.entries()? {
        let (k, v) = entry?;
        batch.push(StoreWrite::Put(k, v));
        n += 1;
        if batch.len() >= 10_000 {
            let writes = std::mem::take(&mut batch);
            store.update(&[], &mut |_| writes.clone()).await?;
        }
    }
    if !batch.is_empty() {
        store.update(&[], &mut |_| batch.clone()).await?;
    }
    store.sync().await?;
    Ok(n)
}

/// A writer that hashes what passes through it.
struct HashingWriter<W: Write> {
    inner: W,
    hash: ring::digest::Context,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    fn finish(self) -> (W, Vec<u8>) {
        (self.inner, self.hash.finish().as_ref().to_vec())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From a sled vault into a fjall one: how a vault changes engine.
    #[tokio::test]
    async fn round_trip_across_engines_and_damage_is_detected() {
        use crate::vault::embedded::{engine_of, SledStore};
        let dir = tempfile::tempdir().unwrap();
        let src = SledStore::open(&dir.path().join("a"), &EngineOptions::default()).unwrap();
        let writes: Vec<StoreWrite> = (0..500u32)
            .map(|i| StoreWrite::Put(format!("c/{i:05}").into_bytes(), vec![i as u8; 50]))
            .chain([StoreWrite::Put(KEY_CHECK_VALUE.to_vec(), b"kcv1".to_vec())])
            .collect();
        src.update(&[], &mut |_| writes.clone()).await.unwrap();
        let file = dir.path().join("b.vcnbak");
        assert_eq!(write(&src, &file).await.unwrap(), 501);

        let c = dir.path().join("c");
        let err = restore(&file, &c, EngineKind::Fjall, Some("other"))
            .await
            .unwrap_err();
        assert!(matches!(err, BackupError::WrongKey { .. }), "{err}");
        assert_eq!(
            restore(&file, &c, EngineKind::Fjall, Some("kcv1"))
                .await
                .unwrap(),
            501
        );
        assert_eq!(engine_of(&c).unwrap(), Some(EngineKind::Fjall));
        // Opened as what it is, whatever a new vault would be.
        let restored =
            crate::vault::embedded::open(&c, EngineKind::Sled, &EngineOptions::default()).unwrap();
        assert_eq!(
            restored.get(b"c/00042").await.unwrap(),
            Some(vec![42u8; 50])
        );
        let err = restore(&file, &c, EngineKind::Fjall, None)
            .await
            .unwrap_err();
        assert!(matches!(err, BackupError::NotEmpty(_)));

        let mut bytes = std::fs::read(&file).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        assert!(matches!(
            restore(&file, &dir.path().join("d"), EngineKind::Fjall, None).await,
            Err(BackupError::Damaged(..))
        ));
        assert!(
            !dir.path().join("d").exists(),
            "nothing written from a damaged backup"
        );
        std::fs::write(&file, &bytes[..mid]).unwrap();
        assert!(matches!(
            restore(&file, &dir.path().join("e"), EngineKind::Sled, None).await,
            Err(BackupError::Damaged(..))
        ));
    }
}
