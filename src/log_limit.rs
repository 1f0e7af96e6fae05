//! Rate-limited log lines for everything a remote peer can trigger (a failed handshake, an
//! oversized datagram, a handler error): a flood of bad input must not become a flood of log.
//!
//! `limited!` logs like `log::warn!` and friends, but each call site lets
//! through at most [`BURST`] lines per second; the rest are counted, and the next line that
//! gets through says how many were held back ("N more like this in the last second").

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::stream::now_millis;

/// Lines a call site may log per second before it is held back.
pub(crate) const BURST: u64 = 10;

/// How long a call site must stay quiet after holding lines back before the flusher reports
/// them (`(N more like this ...)`): the burst is over by then.
const QUIET: u64 = 250;

/// The state of one call site.
pub(crate) struct Limit {
    /// The second (on `now_millis`'s clock) that `count` counts.
    second: AtomicU64,
    count: AtomicU64,
    held_back: AtomicU64,
    /// When the last line was held back (`now_millis`).
    last_held: AtomicU64,
    level: log::Level,
    target: &'static str,
    /// The first line held back since the last report: what the report is like.
    sample: Mutex<Option<String>>,
    registered: AtomicBool,
}

impl Limit {
    pub(crate) const fn new(level: log::Level, target: &'static str) -> Limit {
        Limit {
            second: AtomicU64::new(0),
            count: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
            last_held: AtomicU64::new(0),
            level,
            target,
            sample: Mutex::new(None),
            registered: AtomicBool::new(false),
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
            None
        }
    }

    /// A line was held back: counted, and reported by the flusher once the burst is over
    /// (if no line gets through before, whose own text says how many). `line` makes the
    /// line's text, called only for the first one held back since the last report.
    pub(crate) fn hold(&'static self, line: impl FnOnce() -> String) {
        self.last_held.store(now_millis(), Ordering::Relaxed);
        if self.held_back.fetch_add(1, Ordering::Relaxed) == 0 {
            *self.sample.lock().unwrap_or_else(|e| e.into_inner()) = Some(line());
        }
        if !self.registered.swap(true, Ordering::Relaxed) {
            flusher()
                .sites
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self);
        }
        flusher().wake();
    }

    /// The flusher's look: reports what was held back once the site has been quiet for
    /// [`QUIET`]. Whether anything is still held back.
    fn flush(&self, now: u64) -> bool {
        if self.held_back.load(Ordering::Relaxed) == 0 {
            return false;
        }
        if now.saturating_sub(self.last_held.load(Ordering::Relaxed)) < QUIET {
            return true;
        }
        let n = self.held_back.swap(0, Ordering::Relaxed);
        let sample = self
            .sample
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        if n > 0 {
            log::log!(target: self.target, self.level, "({n} more like this in the last second: {sample})");
        }
        false
    }
}

/// The call sites that have held lines back, and the thread that reports them when their
/// bursts end: started on the first line held back in the process, and asleep (parked, no
/// timer) while nothing is held back.
struct Flusher {
    sites: Mutex<Vec<&'static Limit>>,
    thread: OnceLock<std::thread::Thread>,
}

impl Flusher {
    fn wake(&'static self) {
        let thread = self.thread.get_or_init(|| {
            let spawned = std::thread::Builder::new()
                .name("socketserver-log".into())
                .spawn(move || self.run());
            match spawned {
                Ok(h) => h.thread().clone(),
                // No thread to be had: the next line that gets through still says how many.
                Err(_) => std::thread::current(),
            }
        });
        if thread.name() == Some("socketserver-log") {
            thread.unpark();
        }
    }

    fn run(&self) {
        loop {
            let sites: Vec<&'static Limit> =
                self.sites.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let now = now_millis();
            let pending = sites.iter().filter(|s| s.flush(now)).count();
            if pending == 0 {
                std::thread::park();
            } else {
                std::thread::sleep(Duration::from_millis(QUIET / 2));
            }
        }
    }
}

fn flusher() -> &'static Flusher {
    static F: OnceLock<Flusher> = OnceLock::new();
    F.get_or_init(|| Flusher {
        sites: Mutex::new(Vec::new()),
        thread: OnceLock::new(),
    })
}

/// `log::Level` of a level's macro name.
#[doc(hidden)]
macro_rules! level_of {
    (error) => {
        log::Level::Error
    };
    (warn) => {
        log::Level::Warn
    };
    (info) => {
        log::Level::Info
    };
    (debug) => {
        log::Level::Debug
    };
    (trace) => {
        log::Level::Trace
    };
}

/// Logs at `$level` (`error`, `warn`, `info`, ...) at most [`BURST`] times per second from this
/// call site; the next line after a burst says how many were held back, and if none comes,
/// a line of its own does once the burst is over (`(N more like this ...)`), so the lines and
/// the counts they give account for every event.
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::Limit =
            $crate::log_limit::Limit::new($crate::log_limit::level_of!($level), module_path!());
        match LIMIT.admit() {
            Some(0) => log::$level!($($arg)+),
            Some(held_back) => log::$level!(
                "{} ({} more like this in the last second)",
                format_args!($($arg)+),
                held_back
            ),
            None => LIMIT.hold(|| format!($($arg)+)),
        }
    }};
}

pub(crate) use {level_of, limited};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_let_through_then_held_back_and_counted() {
        let limit = Limit::new(log::Level::Warn, "test");
        // All within one second (the test takes microseconds; retry if it straddles one).
        for _ in 0..3 {
            let start = now_millis() / 1000;
            let let_through = (0..100)
                .filter(|_| match limit.admit() {
                    Some(_) => true,
                    None => {
                        limit.held_back.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                })
                .count();
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
