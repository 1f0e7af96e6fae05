//! Rate-limited log lines for everything a remote peer can trigger (a failed handshake, an
//! oversized datagram, a handler error): a flood of bad input must not become a flood of log.
//!
//! `limited!` logs like `log::warn!` and friends, but each call site lets
//! through at most [`BURST`] lines per second; the rest are counted, and the next line that
//! gets through says how many were held back ("N more like this in the last second").

use std::sync::atomic::{AtomicU64, Ordering};

use crate::stream::now_millis;

/// Lines a call site may log per second before it is held back.
pub(crate) const BURST: u64 = 10;

/// The state of one call site.
pub(crate) struct Limit {
    /// The second (on `now_millis`'s clock) that `count` counts.
    second: AtomicU64,
    count: AtomicU64,
    held_back: AtomicU64,
}

impl Limit {
    pub(crate) const fn new() -> Limit {
        Limit {
            second: AtomicU64::new(0),
            count: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now; if so, how many were held back since the last one.
    pub(crate) fn admit(&self) -> Option<u64> {
        let now = now_millis() / 1000;
        let second = self.second.load(Ordering::Relaxed);
        if second != now
            && self
                .second
                .compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Logs at `$level` (`error`, `warn`, `info`, ...) at most [`BURST`] times per second from this
/// call site; the next line after a burst says how many were held back.
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::Limit = $crate::log_limit::Limit::new();
        if let Some(held_back) = LIMIT.admit() {
            if held_back == 0 {
                log::$level!($($arg)+);
            } else {
                log::$level!(
                    "{} ({} more like this in the last second)",
                    format_args!($($arg)+),
                    held_back
                );
            }
        }
    }};
}

pub(crate) use limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_let_through_then_held_back_and_counted() {
        let limit = Limit::new();
        // All within one second (the test takes microseconds; retry if it straddles one).
        for _ in 0..3 {
            let start = now_millis() / 1000;
            let let_through = (0..100).filter(|_| limit.admit().is_some()).count();
            if now_millis() / 1000 == start {
                assert_eq!(let_through as u64, BURST);
                assert_eq!(limit.held_back.load(Ordering::Relaxed), 100 - BURST);
                // The first line of the next second says how many were held back.
                std::thread::sleep(std::time::Duration::from_millis(1000 - now_millis() % 1000));
                assert_eq!(limit.admit(), Some(100 - BURST));
                assert_eq!(limit.admit(), Some(0));
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        panic!("could not run 100 admits within one second");
    }
}
