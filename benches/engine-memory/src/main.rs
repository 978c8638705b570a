//! The vault's key pattern on fjall 2.11 and on fjall 3, to see what each
//! keeps in memory outside its block cache once the data is on disk.
//!
//! usage: engine-memory 2|3 DIR CARDS CACHE_MIB fill|flush|read|detok
//! - fill: write CARDS cards' keys (the sizes of a real vault's), one batch
//!   per card, with the audit entries put and later deleted as the sealer
//!   does;
//! - flush: write the memtables out (so a reopen replays no journal);
//! - read: reopen, print the resident memory, then time point reads (one
//!   hit on a card, one miss on a transaction id, as an Authorize does);
//! - detok: reopen, sample number index entries over the whole vault, then
//!   time Detokenize's two reads (the index entry, then its card), twice
//!   over: the first pass warms the cache, the second is the steady state.
//!
//! fjall 3 is opened as the service's engine opens it (16 MiB memtables).
//! `EXPECT_HITS=1` at fill builds it with `expect_point_read_hits` (no
//! filters on the last level).
//!
//! Not part of the service: no error handling beyond stopping with the
//! error.

use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// (VmRSS, VmHWM) in KiB.
fn rss_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds (user + system) of this process.
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rfind(')').map(|i| &s[i + 2..]).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// xorshift64: repeatable filler, nothing secret.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One card's keys as `IssueCard` writes them, with the sizes measured on a
/// 1.56 M-card vault: `c/` 29 + 259 bytes, `p/` 38 + 27, `o/` 47 + 0, `e/`
/// 20 + 78, and its pending audit entry (deleted once sealed).
fn card(i: u64, r: &mut Rng) -> Vec<(Vec<u8>, Vec<u8>)> {
    let id = format!("vc_{:016x}{:08x}", r.next(), i as u32);
    let owner = format!("bench-{}", i % 1024);
    vec![
        ([b"c/", id.as_bytes()].concat(), r.bytes(259)),
        (
            [&b"p/\0\0\0\x01"[..], &r.bytes(32)].concat(),
            [id.as_bytes(), b"\0", owner.as_bytes()].concat(),
        ),
        (format!("o/{owner}\0{i:016x}/{id}").into_bytes(), vec![]),
        (format!("e/{owner}\0{i:012}").into_bytes(), r.bytes(78)),
        (
            format!("a/{:020}/{i:08}", i * 1000).into_bytes(),
            vec![1; 300],
        ),
    ]
}

/// What the experiment needs of either engine.
trait Kv {
    const NAME: &'static str;
    /// Puts, then deletes, atomically.
    fn write(&self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) -> Result<()>;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Every `every`th key under `prefix`, at most `limit` of them.
    fn keys_with_prefix(&self, prefix: &[u8], limit: usize, every: usize) -> Result<Vec<Vec<u8>>>;
    fn flush(&self) -> Result<()>;
    fn sync(&self) -> Result<()>;
    /// Bloom filter bytes held in memory, where the engine says.
    fn filters(&self) -> Option<usize>;
}

struct Fjall2(fjall2::Keyspace, fjall2::PartitionHandle);
impl Kv for Fjall2 {
    const NAME: &'static str = "fjall 2.11";
    fn write(&self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) -> Result<()> {
        let mut b = self.0.batch();
        for (k, v) in puts {
            b.insert(&self.1, k, v);
        }
        for k in deletes {
            b.remove(&self.1, k);
        }
        Ok(b.commit()?)
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.1.get(key)?.map(|v| v.to_vec()))
    }
    fn keys_with_prefix(&self, prefix: &[u8], limit: usize, every: usize) -> Result<Vec<Vec<u8>>> {
        self.1
            .prefix(prefix)
            .step_by(every)
            .take(limit)
            .map(|kv| Ok(kv?.0.to_vec()))
            .collect()
    }
    fn flush(&self) -> Result<()> {
        Ok(self.1.rotate_memtable_and_wait()?)
    }
    fn sync(&self) -> Result<()> {
        Ok(self.0.persist(fjall2::PersistMode::SyncAll)?)
    }
    fn filters(&self) -> Option<usize> {
        use fjall2::AbstractTree;
        Some(self.1.tree.bloom_filter_size())
    }
}

struct Fjall3(fjall3::Database, fjall3::Keyspace);
impl Kv for Fjall3 {
    const NAME: &'static str = "fjall 3";
    fn write(&self, puts: Vec<(Vec<u8>, Vec<u8>)>, deletes: Vec<Vec<u8>>) -> Result<()> {
        let mut b = self.0.batch();
        for (k, v) in puts {
            b.insert(&self.1, k, v);
        }
        for k in deletes {
            b.remove(&self.1, k);
        }
        Ok(b.commit()?)
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.1.get(key)?.map(|v| v.to_vec()))
    }
    fn keys_with_prefix(&self, prefix: &[u8], limit: usize, every: usize) -> Result<Vec<Vec<u8>>> {
        self.1
            .prefix(prefix)
            .step_by(every)
            .take(limit)
            .map(|kv| Ok(kv.key()?.to_vec()))
            .collect()
    }
    fn flush(&self) -> Result<()> {
        Ok(self.1.rotate_memtable_and_wait()?)
    }
    fn sync(&self) -> Result<()> {
        Ok(self.0.persist(fjall3::PersistMode::SyncAll)?)
    }
    fn filters(&self) -> Option<usize> {
        None
    }
}

fn run<E: Kv>(kv: E, cards: u64, mode: &str) -> Result<()> {
    let name = E::NAME;
    println!(
        "{name} opened: rss/hwm KiB {:?}, filters {:?}",
        rss_kib(),
        kv.filters()
    );
    let started = Instant::now();
    match mode {
        "fill" => {
            let mut r = Rng(0x9E37_79B9_7F4A_7C15 ^ cards);
            let mut pending = Vec::new();
            for i in 0..cards {
                let puts = card(i, &mut r);
                pending.push(puts[4].0.clone());
                let sealed = if pending.len() >= 64 {
                    std::mem::take(&mut pending)
                } else {
                    vec![]
                };
                kv.write(puts, sealed)?;
                if i % 1_000_000 == 0 {
                    println!(
                        "  {i} cards at {:?}: rss/hwm KiB {:?}",
                        started.elapsed(),
                        rss_kib()
                    );
                }
            }
            kv.sync()?;
            println!(
                "{name} filled {cards} cards in {:?}: rss/hwm KiB {:?}, filters {:?}",
                started.elapsed(),
                rss_kib(),
                kv.filters()
            );
        }
        "flush" => {
            kv.flush()?;
            kv.sync()?;
            // Let compactions the flush started run.
            std::thread::sleep(Duration::from_secs(20));
            println!(
                "{name} flushed: rss/hwm KiB {:?}, filters {:?}",
                rss_kib(),
                kv.filters()
            );
        }
        "read" => {
            let ids: Vec<Vec<u8>> = kv.keys_with_prefix(b"c/", 2_000_000 / 7 + 1, 7)?;
            println!(
                "{name} sampled {} card keys: rss/hwm KiB {:?}",
                ids.len(),
                rss_kib()
            );
            let mut r = Rng(7);
            let reads = 400_000u64;
            let (cpu, wall) = (cpu_s(), Instant::now());
            let mut hits = 0u64;
            for j in 0..reads {
                let k = &ids[(r.next() % ids.len() as u64) as usize];
                hits += u64::from(kv.get(k)?.is_some());
                let miss = format!("t/txn-{j}-{}", r.next());
                hits += u64::from(kv.get(miss.as_bytes())?.is_some()) * 1_000_000;
            }
            println!(
                "{name} {hits} hits of {reads}, {reads} misses: {:.2} us CPU per get, wall {:?}: rss/hwm KiB {:?}, filters {:?}",
                (cpu_s() - cpu) * 1e6 / (2 * reads) as f64,
                wall.elapsed(),
                rss_kib(),
                kv.filters()
            );
        }
        "detok" => {
            let entries: Vec<Vec<u8>> = kv.keys_with_prefix(b"p/", usize::MAX, 16)?;
            println!(
                "{name} sampled {} index entries: rss/hwm KiB {:?}",
                entries.len(),
                rss_kib()
            );
            let mut r = Rng(11);
            let reads = 300_000u64;
            for pass in ["cold", "warm"] {
                let (cpu, wall) = (cpu_s(), Instant::now());
                let mut found = 0u64;
                for _ in 0..reads {
                    let k = &entries[(r.next() % entries.len() as u64) as usize];
                    let value = kv.get(k)?.ok_or("index entry missing")?;
                    let id = value.split(|b| *b == 0).next().unwrap_or(&[]);
                    found += u64::from(kv.get(&[b"c/", id].concat())?.is_some());
                }
                println!(
                    "{name} detok {pass}: {found} cards of {reads}: {:.2} us CPU per detok, wall {:?}: rss/hwm KiB {:?}",
                    (cpu_s() - cpu) * 1e6 / reads as f64,
                    wall.elapsed(),
                    rss_kib(),
                );
            }
        }
        other => return Err(format!("mode {other}: expected fill, flush, read or detok").into()),
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, which, dir, cards, cache_mib, mode] = &args[..] else {
        return Err("usage: engine-memory 2|3 DIR CARDS CACHE_MIB fill|flush|read|detok".into());
    };
    let cards: u64 = cards.parse()?;
    let cache = cache_mib.parse::<u64>()? << 20;
    match which.as_str() {
        "2" => {
            let ks = fjall2::Config::new(dir).cache_size(cache).open()?;
            let part = ks.open_partition("vault", fjall2::PartitionCreateOptions::default())?;
            run(Fjall2(ks, part), cards, mode)
        }
        "3" => {
            let db = fjall3::Database::builder(dir).cache_size(cache).open()?;
            let expect_hits = std::env::var("EXPECT_HITS").is_ok_and(|v| v == "1");
            let ks = db.keyspace("vault", || {
                fjall3::KeyspaceCreateOptions::default()
                    .max_memtable_size(16 << 20)
                    .expect_point_read_hits(expect_hits)
            })?;
            run(Fjall3(db, ks), cards, mode)
        }
        other => Err(format!("engine {other}: expected 2 or 3").into()),
    }
}
