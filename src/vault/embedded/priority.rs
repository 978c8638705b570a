//! The engine's own threads (memtable flushes, compactions) at a lower CPU
//! priority than the threads that answer calls.
//!
//! On a box with few cores, an LSM's compactions compete with the request
//! threads for the same CPU; on a large vault, the writes a burst of calls
//! makes start compactions that take most of it (BENCHMARKS.md, sessions 12
//! to 14). What must be fast is the answer; a compaction can run a little
//! later. So the engine's threads run at a higher *nice* value: when the
//! CPU is contended the scheduler gives them a small share, and when it is
//! idle they get all of it. The same practice as RocksDB's
//! `LowerThreadPoolCPUPriority`.
//!
//! fjall starts its threads itself and names them, so they are found by
//! name among the threads an engine's open started (`/proc/self/task`) and
//! moved with `setpriority`, which on Linux sets one thread's nice value.
//! Raising one's own nice value needs no privilege. Elsewhere than Linux
//! this does nothing.

use std::collections::BTreeSet;

/// A thread id of this process.
pub type Tid = u64;

/// The highest (lowest priority) nice value Linux has.
pub const MAX_NICE: i32 = 19;

/// This process's threads now: taken before an engine opens, so that only
/// the threads its open started are moved after it.
pub fn threads() -> BTreeSet<Tid> {
    imp::threads()
}

/// Sets the nice value of each thread started since `before` whose name is
/// one of `names` to `nice`, and returns their ids. A `nice` of 0 moves
/// nothing (the threads keep the process's priority). A thread that cannot
/// be moved (gone since, or a refusal) is left as it is and not returned:
/// a lower priority is an optimisation, never a reason to fail an open.
pub fn lower(before: &BTreeSet<Tid>, names: &[&str], nice: i32) -> Vec<Tid> {
    if nice <= 0 {
        return Vec::new();
    }
    threads()
        .difference(before)
        .copied()
        .filter(|&tid| imp::name(tid).is_some_and(|n| names.contains(&n.as_str())))
        .filter(|&tid| imp::set_nice(tid, nice.min(MAX_NICE)))
        .collect()
}

/// A thread's nice value, when it can be read.
pub fn nice_of(tid: Tid) -> Option<i32> {
    imp::nice_of(tid)
}

/// Runs `open` and returns what it returned, with the name and nice value
/// of each thread it started that is still running: what the engines'
/// tests check their threads with.
#[cfg(test)]
pub fn started_by<T>(open: impl FnOnce() -> T) -> (T, Vec<(String, i32)>) {
    let before = threads();
    let value = open();
    let started = threads()
        .difference(&before)
        .filter_map(|&tid| Some((imp::name(tid)?, nice_of(tid)?)))
        .collect();
    (value, started)
}

/// The calling thread's nice value: what the threads it starts begin with
/// (the tests may run under `nice`).
#[cfg(all(test, target_os = "linux"))]
pub fn own_nice() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    nice_of(unsafe { libc::gettid() } as Tid).unwrap_or(0)
}

#[cfg(target_os = "linux")]
mod imp {
    use super::Tid;
    use std::collections::BTreeSet;

    pub fn threads() -> BTreeSet<Tid> {
        std::fs::read_dir("/proc/self/task")
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn name(tid: Tid) -> Option<String> {
        let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
        Some(comm.trim_end_matches('\n').to_string())
    }

    pub fn set_nice(tid: Tid, nice: i32) -> bool {
        let Ok(id) = libc::id_t::try_from(tid) else {
            return false;
        };
        // SAFETY: setpriority reads no memory of ours; on Linux,
        // PRIO_PROCESS with a thread id sets that one thread's nice value.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, id, nice) == 0 }
    }

    pub fn nice_of(tid: Tid) -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        // The name (field 2) is in parentheses and may hold spaces: count
        // fields from the last ')'. Nice is field 19, the 17th after it.
        let rest = &stat[stat.rfind(')')? + 1..];
        rest.split_whitespace().nth(16)?.parse().ok()
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::Tid;
    use std::collections::BTreeSet;

    pub fn threads() -> BTreeSet<Tid> {
        BTreeSet::new()
    }

    pub fn name(_: Tid) -> Option<String> {
        None
    }

    pub fn set_nice(_: Tid, _: i32) -> bool {
        false
    }

    pub fn nice_of(_: Tid) -> Option<i32> {
        None
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Starts a thread named `name` that reports its id and waits to be
    /// told to end.
    fn named(name: &str) -> (Tid, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (end_tx, end_rx) = mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                let tid = unsafe { libc::gettid() };
                tid_tx.send(tid as Tid).unwrap();
                let _ = end_rx.recv();
            })
            .unwrap();
        (tid_rx.recv().unwrap(), end_tx, handle)
    }

    #[test]
    fn only_new_threads_with_a_listed_name_are_moved() {
        let base = own_nice();
        let target = (base + 5).min(MAX_NICE);
        let (old, end_old, old_handle) = named("vcn-nice-a");
        let before = threads();
        assert!(before.contains(&old));
        let (new, end_new, new_handle) = named("vcn-nice-a");
        let (other, end_other, other_handle) = named("vcn-nice-b");

        let moved = lower(&before, &["vcn-nice-a"], target);
        assert_eq!(moved, vec![new]);
        assert_eq!(nice_of(new), Some(target));
        // Started before the open, or another name: left as they were.
        assert_eq!(nice_of(old), Some(base));
        assert_eq!(nice_of(other), Some(base));

        for end in [end_old, end_new, end_other] {
            end.send(()).unwrap();
        }
        for h in [old_handle, new_handle, other_handle] {
            h.join().unwrap();
        }
    }

    #[test]
    fn nice_zero_moves_nothing_and_values_past_19_are_19() {
        let base = own_nice();
        let before = threads();
        let (tid, end, handle) = named("vcn-nice-c");
        assert!(lower(&before, &["vcn-nice-c"], 0).is_empty());
        assert_eq!(nice_of(tid), Some(base));
        assert_eq!(lower(&before, &["vcn-nice-c"], 40), vec![tid]);
        assert_eq!(nice_of(tid), Some(MAX_NICE));
        end.send(()).unwrap();
        handle.join().unwrap();
    }
}
