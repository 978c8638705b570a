//! Failure counters: how many failed lookups (unknown numbers, wrong CVVs
//! or expiries) a client made, or failed authentications an address made,
//! in the current minute. Past the limit the client or address is refused
//! until the minute is over. The lock is held for a map lookup only, never
//! across I/O.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 10_000;

#[derive(Debug)]
pub struct FailureLimiter {
    max_per_minute: u32,
    counts: Mutex<HashMap<String, (Instant, u32)>>,
}

impl FailureLimiter {
    pub fn new(max_per_minute: u32) -> FailureLimiter {
        FailureLimiter {
            max_per_minute: max_per_minute.max(1),
            counts: Mutex::new(HashMap::new()),
        }
    }

    pub fn max_per_minute(&self) -> u32 {
        self.max_per_minute
    }

    /// Whether `who` is over the limit in the current minute.
    pub fn blocked(&self, who: &str) -> bool {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(who)
            .is_some_and(|(start, n)| start.elapsed() < WINDOW && *n >= self.max_per_minute)
    }

    /// Counts one failure of `who`; true when this one reached the limit.
    pub fn failed(&self, who: &str) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() >= SWEEP_AT {
            counts.retain(|_, (start, _)| start.elapsed() < WINDOW);
        }
        let entry = counts.entry(who.to_string()).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1 == self.max_per_minute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_past_the_limit_per_key() {
        let l = FailureLimiter::new(3);
        assert!(!l.failed("a") && !l.failed("a"));
        assert!(!l.blocked("a"));
        assert!(l.failed("a"), "the third failure reaches the limit");
        assert!(l.blocked("a"));
        assert!(!l.blocked("b"), "others are not affected");
    }
}
