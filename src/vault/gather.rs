//! When a group commit lets its round gather: the rule the sled committer
//! and the audit journal's writer share.
//!
//! Every round costs a sync and a wake-up of its writers whatever its
//! size, so fewer, fuller rounds cost less CPU per write. While writers
//! arrive together (the previous round came from more than one), the next
//! round is left to fill for the commit delay before it is taken; a writer
//! alone is never held back, nor a round already full, nor the last round
//! of a committer that is stopping.

use std::time::Duration;

/// The commit delay unless configured otherwise (`commit_delay_us`); the
/// figures that chose it are in BENCHMARKS.md ("Fewer, fuller commit
/// rounds").
pub const DEFAULT_COMMIT_DELAY: Duration = Duration::from_micros(500);

/// A round with this many writers is taken at once, busy or not.
pub const GATHER_ENOUGH: u64 = 256;

/// One committer's view of its recent rounds.
#[derive(Debug, Clone, Copy)]
pub struct Gather {
    /// How long a round may gather (zero: never).
    delay: Duration,
    /// Writers in the round taken last.
    previous: u64,
}

impl Gather {
    pub fn new(delay: Duration) -> Gather {
        Gather { delay, previous: 0 }
    }

    /// How long to let the round being collected, with `queued` writers so
    /// far, gather before taking it (never while `stopping`).
    pub fn wait_before_taking(&self, queued: u64, stopping: bool) -> Option<Duration> {
        (self.previous > 1 && queued < GATHER_ENOUGH && !stopping && !self.delay.is_zero())
            .then_some(self.delay)
    }

    /// A round of `writers` was taken.
    pub fn taken(&mut self, writers: u64) {
        self.previous = writers;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_busy_committer_waits_and_never_with_a_full_round() {
        let d = Duration::from_micros(500);
        let mut g = Gather::new(d);
        assert_eq!(g.wait_before_taking(1, false), None, "the first round");
        g.taken(1);
        assert_eq!(g.wait_before_taking(1, false), None, "after a lone writer");
        g.taken(2);
        assert_eq!(g.wait_before_taking(1, false), Some(d));
        assert_eq!(g.wait_before_taking(GATHER_ENOUGH - 1, false), Some(d));
        assert_eq!(
            g.wait_before_taking(GATHER_ENOUGH, false),
            None,
            "already full"
        );
        assert_eq!(g.wait_before_taking(1, true), None, "stopping");
        g.taken(1);
        assert_eq!(g.wait_before_taking(5, false), None, "the load went away");
        let mut off = Gather::new(Duration::ZERO);
        off.taken(100);
        assert_eq!(off.wait_before_taking(1, false), None);
    }
}
