//! Waiting with deadlines: the one place that turns an optional deadline into a `poll` timeout
//! or a condition-variable wait, so that no caller can overflow an `Instant` or spin.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, Timespec};
use rustix::io::Errno;

/// The instant `after` from now; `None` (no deadline) when that is beyond what `Instant` can
/// represent, so `Duration::MAX` means "forever" instead of a panic.
pub(crate) fn deadline_after(after: Duration) -> Option<Instant> {
    Instant::now().checked_add(after)
}

/// What a wait ended with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Polled {
    /// Something is ready, or a signal interrupted the wait: look again.
    Ready,
    /// The deadline passed.
    TimedOut,
}

/// Waits until one of `fds` is ready or `deadline` passes (`None`: no deadline).
pub(crate) fn poll_until(fds: &mut [PollFd<'_>], deadline: Option<Instant>) -> io::Result<Polled> {
    let timeout = deadline.map(|d| {
        let left = d.saturating_duration_since(Instant::now());
        Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        })
    });
    match rustix::event::poll(fds, timeout.as_ref()) {
        Ok(0) => Ok(Polled::TimedOut),
        Ok(_) | Err(Errno::INTR) => Ok(Polled::Ready),
        Err(e) => Err(e.into()),
    }
}

/// A non-blocking, close-on-exec pipe (read end, write end): the self-pipes that wake a `poll`
/// (shutdown, signals).
pub(crate) fn wake_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    #[cfg(target_os = "linux")]
    let pipe = rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::NONBLOCK | rustix::pipe::PipeFlags::CLOEXEC,
    )?;
    // Without pipe2 (macOS, for one), the flags follow the pipe: a fork in between may inherit
    // it, which costs that child two descriptors, nothing more.
    #[cfg(not(target_os = "linux"))]
    let pipe = {
        let pipe = rustix::pipe::pipe()?;
        for fd in [&pipe.0, &pipe.1] {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
            rustix::fs::fcntl_setfl(fd, rustix::fs::OFlags::NONBLOCK)?;
        }
        pipe
    };
    Ok(pipe)
}

/// Locks a mutex whose data stays consistent even if a holder panicked (we never panic while
/// holding these locks, and user code never runs under them).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` until notified or `deadline` passes. `None` if the deadline had already passed;
/// otherwise the guard, re-locked (the caller re-checks its condition either way).
pub(crate) fn wait_until<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    deadline: Option<Instant>,
) -> Option<MutexGuard<'a, T>> {
    Some(match deadline {
        None => cv.wait(guard).unwrap_or_else(|e| e.into_inner()),
        Some(d) => {
            let left = d.checked_duration_since(Instant::now())?;
            cv.wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner())
                .0
        }
    })
}

/// Exponential backoff for accept errors that retrying at once cannot fix (out of descriptors,
/// out of memory): Python retries at once and spins the CPU; tiny_http gives up for good.
#[derive(Default)]
pub(crate) struct Backoff {
    failures: u64,
    delay: Duration,
}

impl Backoff {
    pub(crate) const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    pub(crate) fn next(&mut self) -> Duration {
        self.failures += 1;
        self.delay = if self.delay.is_zero() {
            Self::FIRST
        } else {
            (self.delay * 2).min(Self::MAX)
        };
        self.delay
    }

    /// Failures in a row so far.
    pub(crate) fn failures(&self) -> u64 {
        self.failures
    }

    pub(crate) fn reset(&mut self) {
        if self.failures > 0 {
            log::info!("accepting again after {} failed attempts", self.failures);
        }
        *self = Backoff::default();
    }
}
