//! Stopping the serve loops: the shutdown flag and the self-pipe that wakes a blocked accept
//! loop, which loops run (and which event workers accept for them), and the listener that a
//! drain stops listening on.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::{self, ThreadId};
use std::time::Instant;

use crate::Addr;
use crate::wait::{lock, wait_until};

/// A self-pipe that the accept loop polls next to its listener: writing one byte wakes it at once,
/// which is how `shutdown()` stops a blocked `serve_forever` without Python's 0.5 s polling.
/// The byte stays in the pipe until the request is consumed, so every waiter sees it.
struct Waker {
    rx: OwnedFd,
    tx: OwnedFd,
}

impl Waker {
    fn new() -> io::Result<Waker> {
        let (rx, tx) = crate::wait::wake_pipe()?;
        Ok(Waker { rx, tx })
    }

    fn wake(&self) {
        // A full pipe (EAGAIN) is already readable, which is all a wake needs.
        let _ = rustix::io::write(&self.tx, &[1]);
    }

    fn clear(&self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = rustix::io::read(&self.rx, &mut buf) {
            if n == 0 {
                break;
            }
        }
    }
}

/// The serve loops of a server, and who waits for them to change.
#[derive(Default)]
struct Loops {
    /// The threads running `serve_forever` / `handle_request`, one entry per call. A request
    /// they have accepted but not yet registered is invisible to the registry, so a drain waits
    /// for them to leave first; `shutdown_and_wait` must not wait on its own thread.
    serving: Vec<ThreadId>,
    /// Event workers accepting for a serve loop, which waits for them before it returns: a
    /// `verify_request` hook run there must not wait for the loop in turn.
    accepting_for_loop: Vec<ThreadId>,
    /// Threads waiting on `changed`; only they need to hear of a loop leaving.
    waiters: usize,
}

/// The shutdown signal of one server and what it stops.
pub(crate) struct Shutdown {
    requested: AtomicBool,
    waker: Waker,
    loops: Mutex<Loops>,
    /// A serve loop left, the listener closed, or a drain was told to cut now.
    changed: Condvar,
    /// A serve loop waits for the next connection (rather than running a request, as in sync
    /// mode): at a drain it can take the backlog at once.
    accepting: AtomicBool,
    /// Set by a drain: the serve loop takes what is queued in the backlog, then closes the
    /// listener.
    take_backlog: AtomicBool,
    /// A duplicate of the listening socket (stream servers only), so that a drain can stop the
    /// listening while `serve_forever` still holds the server; taken when it does.
    listening: Mutex<Option<OwnedFd>>,
    /// Set once a drain has shut the listener down: the server can never accept again.
    listener_closed: AtomicBool,
    /// The listener is shared with other processes (adopted from `LISTEN_FDS`): a drain stops
    /// accepting on it but must not shut it down, which would refuse clients for all of them.
    shared_listener: AtomicBool,
}

impl Shutdown {
    pub(crate) fn new(listening: Option<OwnedFd>) -> io::Result<Shutdown> {
        Ok(Shutdown {
            requested: AtomicBool::new(false),
            waker: Waker::new()?,
            loops: Mutex::new(Loops::default()),
            changed: Condvar::new(),
            accepting: AtomicBool::new(false),
            take_backlog: AtomicBool::new(false),
            listening: Mutex::new(listening),
            listener_closed: AtomicBool::new(false),
            shared_listener: AtomicBool::new(false),
        })
    }

    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Sets the flag and wakes the accept loop (the connection limit's waiters are woken by
    /// `Control::request_shutdown`, which calls this).
    pub(crate) fn request(&self) {
        self.requested.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn clear(&self) {
        self.requested.store(false, Ordering::Release);
        self.waker.clear();
        if self.requested() {
            self.waker.wake();
        }
    }

    pub(crate) fn waker_fd(&self) -> BorrowedFd<'_> {
        self.waker.rx.as_fd()
    }

    /// Wakes whoever waits for the loops to change (a drain told to cut now).
    pub(crate) fn notify(&self) {
        let l = lock(&self.loops);
        if l.waiters > 0 {
            self.changed.notify_all();
        }
    }

    /// Marks a serve loop as running until the returned guard drops. When the last
    /// `serve_forever` leaves (`rearm`), the shutdown request is consumed, as in Python, so the
    /// server can serve again.
    pub(crate) fn serving(&self, rearm: bool) -> Serving<'_> {
        lock(&self.loops).serving.push(thread::current().id());
        Serving {
            shutdown: self,
            rearm,
        }
    }

    /// Marks this thread (an event worker) as accepting for the serve loops until the guard
    /// drops; see [`wait_serving_done`](Self::wait_serving_done).
    pub(crate) fn accepting_for_loop(&self) -> AcceptingForLoop<'_> {
        lock(&self.loops)
            .accepting_for_loop
            .push(thread::current().id());
        AcceptingForLoop { shutdown: self }
    }

    /// Waits until no serve loop runs; false at once, without waiting, if this thread runs one
    /// or accepts for one (it would wait for itself).
    pub(crate) fn wait_serving_done(&self) -> bool {
        let me = thread::current().id();
        let mut l = lock(&self.loops);
        if l.serving.contains(&me) || l.accepting_for_loop.contains(&me) {
            return false;
        }
        while !l.serving.is_empty() {
            l.waiters += 1;
            l = self.changed.wait(l).unwrap_or_else(|e| e.into_inner());
            l.waiters -= 1;
        }
        true
    }

    /// Waits until no serve loop runs, `deadline` passes or `stop` says so; true if none runs.
    pub(crate) fn wait_no_loop(&self, deadline: Option<Instant>, stop: &dyn Fn() -> bool) -> bool {
        let mut l = lock(&self.loops);
        loop {
            if l.serving.is_empty() || stop() {
                return l.serving.is_empty();
            }
            l.waiters += 1;
            let woken = wait_until(&self.changed, l, deadline);
            l = woken.unwrap_or_else(|| lock(&self.loops));
            l.waiters -= 1;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return l.serving.is_empty();
            }
        }
    }

    /// Whether a serve loop on another thread than `me` waits for connections on a listener
    /// still open, and `me` is not an event worker accepting for it (the loop waits for that
    /// worker before it can take anything).
    pub(crate) fn loop_elsewhere_accepting(&self, me: ThreadId) -> bool {
        let l = lock(&self.loops);
        l.serving.iter().any(|t| *t != me)
            && self.accepting.load(Ordering::Acquire)
            && self.still_listening()
            && !l.accepting_for_loop.contains(&me)
    }

    /// Asks the serve loops to take the backlog and close the listener (once they see the
    /// shutdown requested).
    pub(crate) fn want_backlog(&self) {
        self.take_backlog.store(true, Ordering::Release);
    }

    /// Waits until the listener is closed, no loop but `me` runs, or `until`.
    pub(crate) fn wait_handoff(&self, me: ThreadId, until: Instant) {
        let mut l = lock(&self.loops);
        // `stop_listening` and a serve loop leaving notify.
        while !self.listener_closed() && l.serving.iter().any(|t| *t != me) {
            l.waiters += 1;
            let Some(mut woken) = wait_until(&self.changed, l, Some(until)) else {
                lock(&self.loops).waiters -= 1;
                break;
            };
            woken.waiters -= 1;
            l = woken;
        }
    }

    /// Stops listening, so that new clients are refused at once (TCP: RST, which the client sees
    /// as ECONNREFUSED; Unix: ECONNREFUSED) and a load balancer moves on, instead of waiting in
    /// the backlog of a server that will never accept them. On Linux, `shutdown(SHUT_RD)` on a
    /// listening TCP socket takes it out of the listening state; connections still queued in
    /// its backlog are reset, as nginx's and Go's closing of their listeners does. A running
    /// serve loop takes those first (see `Control::begin_drain`): a proxy that has sent a
    /// request on one cannot retry it. A Unix listener keeps its queued connections until the
    /// server is closed. `addr` names the server in the log.
    ///
    /// Call only after [`request`](Self::request): the accept loop then takes the accept error
    /// that may follow for what it is, the end, not a failure.
    pub(crate) fn stop_listening(&self, addr: &Addr) {
        let Some(fd) = lock(&self.listening).take() else {
            return;
        };
        self.listener_closed.store(true, Ordering::Release);
        // A drain may wait for this (`hand_backlog_over`).
        self.notify();
        if self.shared_listener.load(Ordering::Acquire) {
            // Other processes accept from the same queue: leave it to them.
            return;
        }
        if let Err(e) = rustix::net::shutdown(&fd, rustix::net::Shutdown::Read) {
            log::warn!(
                "cannot stop listening on {addr}: {e}; new clients wait in the backlog until the \
                 server is closed"
            );
        }
    }

    /// Marks a serve loop as waiting for the next connection (true) or handling one (false).
    pub(crate) fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::Release);
    }

    /// Whether a drain wants the serve loop to take the backlog and close the listener.
    pub(crate) fn backlog_wanted(&self) -> bool {
        self.take_backlog.load(Ordering::Acquire) && self.still_listening()
    }

    /// Whether this is a stream server whose listener a drain has yet to close.
    pub(crate) fn still_listening(&self) -> bool {
        lock(&self.listening).is_some()
    }

    /// Whether a drain has closed the listener: `serve_forever` then returns at once.
    pub(crate) fn listener_closed(&self) -> bool {
        self.listener_closed.load(Ordering::Acquire)
    }

    /// A duplicate of the listening socket, for the pressure policy to see newcomers queue;
    /// `None` once the listener is closed (or for a datagram server).
    pub(crate) fn listener_dup(&self) -> Option<OwnedFd> {
        lock(&self.listening).as_ref()?.try_clone().ok()
    }

    /// Whether other processes may accept from this server's listener (it was inherited).
    pub(crate) fn listener_is_shared(&self) -> bool {
        self.shared_listener.load(Ordering::Acquire)
    }

    /// Marks the listener as shared with other processes; see `shared_listener`.
    pub(crate) fn set_shared_listener(&self) {
        self.shared_listener.store(true, Ordering::Release);
    }
}

/// A running serve loop; see [`Shutdown::serving`].
pub(crate) struct Serving<'a> {
    shutdown: &'a Shutdown,
    rearm: bool,
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        let s = self.shutdown;
        let mut l = lock(&s.loops);
        let me = thread::current().id();
        if let Some(i) = l.serving.iter().position(|t| *t == me) {
            l.serving.swap_remove(i);
        }
        if l.serving.is_empty() && self.rearm {
            s.clear();
        }
        if l.waiters > 0 {
            s.changed.notify_all();
        }
    }
}

/// An event worker accepting for the serve loops; see [`Shutdown::accepting_for_loop`].
pub(crate) struct AcceptingForLoop<'a> {
    shutdown: &'a Shutdown,
}

impl Drop for AcceptingForLoop<'_> {
    fn drop(&mut self) {
        let mut l = lock(&self.shutdown.loops);
        let me = thread::current().id();
        if let Some(i) = l.accepting_for_loop.iter().position(|t| *t == me) {
            l.accepting_for_loop.swap_remove(i);
        }
    }
}
