//! SIGINT and SIGTERM for [`Server::serve_until_signal`](crate::Server::serve_until_signal),
//! with `signal-hook` (cargo feature `signals`, on by default).
//!
//! A signal handler may do almost nothing, so each signal only writes a byte to a pipe of its
//! own (signal-hook's self-pipe action); a watcher thread reads the pipes and acts: the first
//! signal starts a drain, a signal during a drain cuts what is left.
//!
//! Giving the signals back: signal-hook never uninstalls its OS-level handler, it only drops our
//! actions, and with no action left it would swallow the signal (it chains to the previous
//! handler only when that was a function). So, once per process and signal whose disposition
//! was the default, we also register an action that does what the default did (terminate)
//! whenever no `serve_until_signal` is running. An ignored signal stays ignored, and another
//! library's handler keeps being called, as signal-hook chains to it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use signal_hook::SigId;
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::control::{Control, lock};
use crate::wait::poll_until;

/// The signals that stop a server, with their names for the log.
const SIGNALS: [(i32, &str); 2] = [(SIGINT, "SIGINT"), (SIGTERM, "SIGTERM")];

/// What the process does with each of [`SIGNALS`] while no `serve_until_signal` runs.
struct Process {
    /// Per signal: `Some(armed)` if its disposition was the default, where `armed` makes our
    /// action emulate that default; `None` if something else handled (or ignored) it.
    restore: Vec<Option<Arc<AtomicBool>>>,
    /// Running `serve_until_signal` calls.
    active: usize,
}

static PROCESS: Mutex<Option<Process>> = Mutex::new(None);

/// Marks a `serve_until_signal` as running, disarming the default action, until dropped.
struct Active;

impl Active {
    /// `first_time` runs once per process, before signal-hook installs anything: it learns
    /// which signals had their default disposition.
    fn enter(first_time: impl FnOnce() -> io::Result<Vec<bool>>) -> io::Result<Active> {
        let mut p = lock(&PROCESS);
        if p.is_none() {
            let defaults = first_time()?;
            let restore = SIGNALS
                .iter()
                .zip(defaults)
                .map(|(&(sig, _), was_default)| {
                    was_default
                        .then(|| {
                            let armed = Arc::new(AtomicBool::new(false));
                            signal_hook::flag::register_conditional_default(sig, armed.clone())
                                .map(|_| armed)
                        })
                        .transpose()
                })
                .collect::<io::Result<_>>()?;
            *p = Some(Process { restore, active: 0 });
        }
        let p = p.as_mut().expect("initialised above");
        p.active += 1;
        for armed in p.restore.iter().flatten() {
            armed.store(false, Ordering::SeqCst);
        }
        Ok(Active)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let mut p = lock(&PROCESS);
        let Some(p) = p.as_mut() else { return };
        p.active -= 1;
        if p.active == 0 {
            for armed in p.restore.iter().flatten() {
                armed.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Whether `sig` has its default disposition (no handler installed, not ignored).
#[allow(unsafe_code)]
fn is_default_disposition(sig: i32) -> io::Result<bool> {
    // SAFETY: `libc::sigaction` is a plain C struct of integers, a signal set (an integer
    // array) and, on some targets, an `Option` of a function pointer; all-zero bytes are a
    // valid value of each, so `zeroed` makes a valid struct. With a null `act`, sigaction(2)
    // changes nothing: it only writes the current disposition into `old`, a live, exclusively
    // borrowed struct of exactly the type it expects, and whatever it writes is again a valid
    // value of those fields.
    let (rc, old) = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        let rc = libc::sigaction(sig, std::ptr::null(), &mut old);
        (rc, old)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(old.sa_sigaction == libc::SIG_DFL)
}

/// A pipe that one signal writes a byte to.
struct SignalPipe {
    name: &'static str,
    rx: OwnedFd,
    id: SigId,
}

/// SIGINT and SIGTERM routed to pipes for one `serve_until_signal`, and a pipe to stop its
/// watcher. Dropping it gives the signals back.
pub(crate) struct Watch {
    pipes: Vec<SignalPipe>,
    stop_rx: OwnedFd,
    stop_tx: OwnedFd,
    _active: Active,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    crate::wait::wake_pipe()
}

/// Reads everything in a non-blocking pipe; how many bytes (signals) it held.
fn empty(fd: &OwnedFd) -> usize {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while let Ok(k) = rustix::io::read(fd, &mut buf) {
        if k == 0 {
            break;
        }
        n += k;
    }
    n
}

impl Watch {
    /// Routes SIGINT and SIGTERM here until the watch is dropped.
    pub(crate) fn install() -> io::Result<Watch> {
        let active = Active::enter(|| {
            SIGNALS
                .iter()
                .map(|&(sig, _)| is_default_disposition(sig))
                .collect()
        })?;
        let (stop_rx, stop_tx) = pipe()?;
        let mut watch = Watch {
            pipes: Vec::new(),
            stop_rx,
            stop_tx,
            _active: active,
        };
        for (sig, name) in SIGNALS {
            let (rx, tx) = pipe()?;
            let id = signal_hook::low_level::pipe::register(sig, tx)?;
            watch.pipes.push(SignalPipe { name, rx, id });
        }
        Ok(watch)
    }

    /// Watches the signals until [`stop`](Self::stop): the first starts a drain of `control`
    /// (the serve loop returns and the caller drains), any later one, or one that arrives
    /// during a drain, cuts what is still running.
    pub(crate) fn run(&self, control: &Control, grace: Duration) {
        let mut seen = 0usize;
        loop {
            let mut fds: Vec<PollFd<'_>> = self
                .pipes
                .iter()
                .map(|p| PollFd::new(&p.rx, PollFlags::IN))
                .collect();
            fds.push(PollFd::new(&self.stop_rx, PollFlags::IN));
            if let Err(e) = poll_until(&mut fds, None) {
                log::error!("waiting for signals failed: {e}; retrying");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
            if fds.last().is_some_and(|f| !f.revents().is_empty()) {
                return;
            }
            drop(fds);
            for p in &self.pipes {
                for _ in 0..empty(&p.rx) {
                    if seen == 0 && !control.drain.is_draining() {
                        log::info!(
                            "{}: refusing new connections, letting in-flight requests finish \
                             for up to {grace:?} ({} again stops at once)",
                            p.name,
                            p.name
                        );
                        control.begin_drain();
                    } else if !control.drain.cut_requested() {
                        log::warn!(
                            "{} again: cutting the {} request(s) still running",
                            p.name,
                            control.active()
                        );
                        control.cut_now();
                    }
                    seen += 1;
                }
            }
        }
    }

    /// Ends [`run`](Self::run).
    pub(crate) fn stop(&self) {
        let _ = rustix::io::write(self.stop_tx.as_fd(), &[1]);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Our actions go first (closing their write ends), then `_active` re-arms the default.
        for p in self.pipes.drain(..) {
            signal_hook::low_level::unregister(p.id);
        }
    }
}
