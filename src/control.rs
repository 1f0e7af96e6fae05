//! What every thread of a server shares: the shutdown signal, the connection limit, the registry
//! of in-flight requests and the counters. [`ServerHandle`] is its public face.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Shutdown};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use crate::wait::{deadline_after, wait_until};

use crate::recorder::{Event, Recorded, Recorder, Stats};
use crate::{Addr, Stream};

/// Locks a mutex whose data stays consistent even if a holder panicked (we never panic while
/// holding these locks, and user code never runs under them).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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

/// A counting semaphore whose waits end early when shutdown is requested. The pool uses it for
/// idle workers and thread mode for its connection limit: the acceptor takes a permit *before*
/// accepting, so the excess waits in the kernel backlog, not in a queue of ours.
struct Limiter {
    state: Mutex<Slots>,
    freed: Condvar,
}

/// Free slots, and who waits for one: threads (notifying nobody is a wasted system call), and
/// at most one listener that waits on no thread (event mode's, out of its workers' set).
struct Slots {
    free: usize,
    waiting: usize,
    /// Re-arms that listener: the next permit released runs it, once.
    parked: Option<Rearm>,
}

/// What a freed permit runs for a listener that waits for one on no thread; see
/// [`Control::try_acquire_or_park`].
pub(crate) type Rearm = Box<dyn FnOnce() + Send>;

/// A slot under the connection limit, given back when the request ends.
pub(crate) struct Permit {
    control: Arc<Control>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(l) = &self.control.limiter {
            let mut slots = lock(&l.state);
            slots.free += 1;
            if slots.waiting > 0 {
                l.freed.notify_one();
            }
            let parked = slots.parked.take();
            let full = slots.waiting > 0 || parked.is_some();
            drop(slots);
            // Outside the lock: the listener's owner takes its own.
            if let Some(rearm) = parked {
                rearm();
            }
            // The pressure policy waits for this slot (the one it shed, leaving).
            let p = &self.control.pressure;
            if full && p.watched.load(Ordering::Relaxed) {
                drop(lock(&p.state));
                p.wake.notify_all();
            }
        }
    }
}

/// How long a drain waits for the serve loop to take what is queued in the backlog and close
/// the listener itself, before closing it regardless (see [`Control::begin_drain`]).
const BACKLOG_HANDOFF: Duration = Duration::from_millis(200);

/// How long a drain waits for the requests it cut to return (a handler blocked on its socket
/// returns at once; one that ignores it is given up on).
pub(crate) const CUT_WAIT: Duration = Duration::from_secs(1);

/// How a [`ServerHandle::shutdown_graceful`] went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Requests that finished on their own before the deadline.
    pub finished: u64,
    /// Requests still running at the deadline. Those on a connection had their socket shut
    /// down; a datagram request has none to cut and is only waited for.
    pub cut: u64,
    /// Of those cut, requests still running when the drain gave up waiting for them (a handler
    /// that ignores its socket, say).
    pub still_running: u64,
}

struct Registry {
    next_id: u64,
    live: HashMap<u64, Option<Stream>>,
    /// Open connections per client address, under `max_per_source` (only when it is set).
    sources: HashMap<IpAddr, usize>,
    completed: u64,
    /// `completed` when the current drain started, so that its report counts what finished
    /// since then, whoever started it.
    drain_base: u64,
    /// Threads in `wait_idle`; only they need to hear of a request ending.
    waiters: usize,
    /// The threads running `serve_forever` / `handle_request`, one entry per call. A request
    /// they have accepted but not yet registered is invisible to `live`, so a drain waits for
    /// them to leave first; `shutdown_and_wait` must not wait on its own thread.
    serving: Vec<ThreadId>,
    /// Event workers accepting for a serve loop, which waits for them before it returns: a
    /// `verify_request` hook run there must not wait for the loop in turn.
    accepting_for_loop: Vec<ThreadId>,
}

/// The state every thread of one server shares.
pub struct Control {
    shutdown: AtomicBool,
    draining: AtomicBool,
    /// A duplicate of the listening socket (stream servers only), so that a drain can stop the
    /// listening while `serve_forever` still holds the server; taken when it does.
    listening: Mutex<Option<OwnedFd>>,
    /// Set once a drain has shut the listener down: the server can never accept again.
    listener_closed: AtomicBool,
    /// Set by [`cut_now`](Self::cut_now): a drain stops waiting and cuts what is left, and
    /// closing the server no longer waits for handlers.
    cut_requested: AtomicBool,
    /// A serve loop waits for the next connection (rather than running a request, as in sync
    /// mode): at a drain it can take the backlog at once.
    accepting: AtomicBool,
    /// Set by a drain: the serve loop takes what is queued in the backlog, then closes the
    /// listener ([`begin_drain`](Self::begin_drain)).
    take_backlog: AtomicBool,
    waker: Waker,
    limiter: Option<Limiter>,
    /// The cap `limiter` enforces (`None`: sync mode, or no system limit known).
    max_connections: Option<usize>,
    /// Most connections at once from one client IP address.
    max_per_source: Option<usize>,
    registry: Mutex<Registry>,
    registry_changed: Condvar,
    /// Every count of the server, changed only through [`record`](Self::record).
    pub(crate) recorder: Recorder,
    pub(crate) local_addr: Addr,
    /// Called when a drain begins (readiness: `STOPPING=1`).
    drain_hook: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// The listener is shared with other processes (adopted from `LISTEN_FDS`): a drain stops
    /// accepting on it but must not shut it down, which would refuse clients for all of them.
    shared_listener: AtomicBool,
    /// The reaper's wake-up: its stop flag, and a newcomer waiting for a slot.
    pub(crate) pressure: Pressure,
}

/// What wakes the reaper besides its clock: a newcomer that found the server at
/// `max_connections` (it sheds the idlest connections at once), or the server closing.
#[derive(Default)]
pub(crate) struct Pressure {
    pub(crate) state: Mutex<PressureState>,
    pub(crate) wake: Condvar,
    /// A reaper runs (activity is tracked): only then is waking it worth a system call.
    pub(crate) watched: AtomicBool,
    /// A connection was shed for a newcomer and the accept loop has not taken its slot yet:
    /// shed no other until it has (the one shed leaves its registry entry before its slot).
    pub(crate) shed_pending: AtomicBool,
}

#[derive(Default)]
pub(crate) struct PressureState {
    pub(crate) stop: bool,
    pub(crate) wanted: bool,
}

impl Control {
    /// `limit`: the most requests in flight (`None`: sync mode, one at a time);
    /// `max_per_source`: the most connections from one client IP address; `listening`: a
    /// duplicate of the listening socket of a stream server, which a drain shuts down
    /// ([`stop_listening`](Self::stop_listening)), `None` for a datagram server.
    pub(crate) fn new(
        local_addr: Addr,
        limit: Option<usize>,
        max_per_source: Option<usize>,
        listening: Option<OwnedFd>,
    ) -> io::Result<Arc<Control>> {
        Ok(Arc::new(Control {
            shutdown: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            listening: Mutex::new(listening),
            listener_closed: AtomicBool::new(false),
            cut_requested: AtomicBool::new(false),
            accepting: AtomicBool::new(false),
            take_backlog: AtomicBool::new(false),
            waker: Waker::new()?,
            limiter: limit.map(|n| Limiter {
                state: Mutex::new(Slots {
                    free: n,
                    waiting: 0,
                    parked: None,
                }),
                freed: Condvar::new(),
            }),
            max_connections: limit,
            max_per_source,
            registry: Mutex::new(Registry {
                next_id: 0,
                live: HashMap::new(),
                sources: HashMap::new(),
                completed: 0,
                drain_base: 0,
                waiters: 0,
                serving: Vec::new(),
                accepting_for_loop: Vec::new(),
            }),
            registry_changed: Condvar::new(),
            recorder: Recorder::new(&local_addr),
            local_addr,
            drain_hook: OnceLock::new(),
            shared_listener: AtomicBool::new(false),
            pressure: Pressure::default(),
        }))
    }

    pub(crate) fn shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    pub(crate) fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        self.waker.wake();
        if let Some(l) = &self.limiter {
            // Taking the lock orders this notify after any waiter's flag check.
            drop(lock(&l.state));
            l.freed.notify_all();
        }
    }

    /// Stops listening, so that new clients are refused at once (TCP: RST, which the client sees
    /// as ECONNREFUSED; Unix: ECONNREFUSED) and a load balancer moves on, instead of waiting in
    /// the backlog of a server that will never accept them. On Linux, `shutdown(SHUT_RD)` on a
    /// listening TCP socket takes it out of the listening state; connections still queued in
    /// its backlog are reset, as nginx's and Go's closing of their listeners does. A running
    /// serve loop takes those first (see [`begin_drain`](Self::begin_drain)): a proxy that has
    /// sent a request on one cannot retry it. A Unix listener keeps its queued connections
    /// until the server is closed.
    ///
    /// Call only after [`request_shutdown`](Self::request_shutdown): the accept loop then
    /// takes the accept error that may follow for what it is, the end, not a failure.
    pub(crate) fn stop_listening(&self) {
        let Some(fd) = lock(&self.listening).take() else {
            return;
        };
        self.listener_closed.store(true, Ordering::Release);
        // A drain may wait for this (`begin_drain`).
        let r = lock(&self.registry);
        if r.waiters > 0 {
            self.registry_changed.notify_all();
        }
        drop(r);
        if self.shared_listener.load(Ordering::Acquire) {
            // Other processes accept from the same queue: leave it to them.
            return;
        }
        if let Err(e) = rustix::net::shutdown(&fd, rustix::net::Shutdown::Read) {
            log::warn!(
                "cannot stop listening on {}: {e}; new clients wait in the backlog until the \
                 server is closed",
                self.local_addr
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

    /// Marks a serve loop as running until the returned guard drops. When the last
    /// `serve_forever` leaves (`rearm`), the shutdown request is consumed, as in Python, so the
    /// server can serve again.
    pub(crate) fn serving(&self, rearm: bool) -> Serving<'_> {
        lock(&self.registry).serving.push(thread::current().id());
        Serving {
            control: self,
            rearm,
        }
    }

    /// Marks this thread (an event worker) as accepting for the serve loops until the guard
    /// drops; see `wait_serving_done`.
    pub(crate) fn accepting_for_loop(&self) -> AcceptingForLoop<'_> {
        lock(&self.registry)
            .accepting_for_loop
            .push(thread::current().id());
        AcceptingForLoop { control: self }
    }

    fn clear_shutdown(&self) {
        self.shutdown.store(false, Ordering::Release);
        self.waker.clear();
        if self.shutdown_requested() {
            self.waker.wake();
        }
    }

    pub(crate) fn waker_fd(&self) -> BorrowedFd<'_> {
        self.waker.rx.as_fd()
    }

    /// Takes a slot under the limit, waiting while none is free. `None` once shutdown is requested
    /// or the deadline passes. Without a limit, always a permit.
    pub(crate) fn acquire(self: &Arc<Self>, deadline: Option<Instant>) -> Option<Permit> {
        let Some(l) = &self.limiter else {
            return Some(Permit {
                control: self.clone(),
            });
        };
        let mut slots = lock(&l.state);
        loop {
            if self.shutdown_requested() {
                return None;
            }
            if slots.free > 0 {
                slots.free -= 1;
                self.pressure.shed_pending.store(false, Ordering::Relaxed);
                return Some(Permit {
                    control: self.clone(),
                });
            }
            slots.waiting += 1;
            // Full: the reaper sheds the idlest connections to make room. (Lock order: the
            // slots, then the reaper's state; the reaper never holds its own while it asks
            // for the slots.)
            if self.pressure.watched.load(Ordering::Relaxed) {
                lock(&self.pressure.state).wanted = true;
                self.pressure.wake.notify_all();
            }
            let woken = wait_until(&l.freed, slots, deadline);
            // Re-lock to undo the count even when the deadline had passed.
            slots = woken.unwrap_or_else(|| lock(&l.state));
            slots.waiting -= 1;
            if deadline.is_some_and(|d| Instant::now() >= d) && slots.free == 0 {
                return None;
            }
        }
    }

    /// Slots free right now under the limit; `None` without a limit.
    pub(crate) fn free_slots(&self) -> Option<usize> {
        self.limiter.as_ref().map(|l| lock(&l.state).free)
    }

    /// Takes a slot only if one is free right now.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let Some(l) = &self.limiter else {
            return Some(Permit {
                control: self.clone(),
            });
        };
        let mut slots = lock(&l.state);
        (slots.free > 0).then(|| {
            slots.free -= 1;
            self.pressure.shed_pending.store(false, Ordering::Relaxed);
            Permit {
                control: self.clone(),
            }
        })
    }

    /// Takes a slot if one is free right now; otherwise `rearm` waits for one, and the next
    /// permit released runs it (the caller's listener, which does not accept meanwhile, so that
    /// the newcomer waits in the backlog). A listener waiting so counts as a newcomer waiting:
    /// the pressure policy sheds an idle connection for it.
    pub(crate) fn try_acquire_or_park(self: &Arc<Self>, rearm: Rearm) -> Option<Permit> {
        let Some(l) = &self.limiter else {
            return Some(Permit {
                control: self.clone(),
            });
        };
        let mut slots = lock(&l.state);
        if slots.free > 0 {
            slots.free -= 1;
            self.pressure.shed_pending.store(false, Ordering::Relaxed);
            return Some(Permit {
                control: self.clone(),
            });
        }
        slots.parked = Some(rearm);
        // Lock order as in `acquire`: the slots, then the reaper's state.
        if self.pressure.watched.load(Ordering::Relaxed) {
            lock(&self.pressure.state).wanted = true;
            self.pressure.wake.notify_all();
        }
        None
    }

    /// Records a request as in flight until the ticket is dropped; `stream` lets a drain or the
    /// idle reaper shut its socket down. `source` is the client's IP address for a connection:
    /// `None` (refused) if that address already has `max_per_source` connections open.
    ///
    /// The count is kept per address as the accept loop saw it. A PROXY-protocol stage, which
    /// learns the real client address later, is meant to move the ticket's count from the
    /// proxy's address to the client's (and refuse it if that one is full); trusted proxies
    /// must then be exempt here.
    pub(crate) fn register(
        self: &Arc<Self>,
        stream: Option<Stream>,
        source: Option<IpAddr>,
    ) -> Option<Ticket> {
        let mut r = lock(&self.registry);
        let source = match (source, self.max_per_source) {
            (Some(ip), Some(max)) => {
                let open = r.sources.entry(ip).or_insert(0);
                if *open >= max {
                    return None;
                }
                *open += 1;
                Some(ip)
            }
            _ => None,
        };
        let id = r.next_id;
        r.next_id += 1;
        r.live.insert(id, stream);
        drop(r);
        self.record(Event::Opened);
        Some(Ticket {
            control: self.clone(),
            id,
            source,
        })
    }

    /// Counts one more connection from `ip` under `max_per_source`, until the claim is
    /// dropped: for a client that admission found (the real one behind a PROXY header), which
    /// the accept loop did not count. `None` if `ip` is at the cap; `Some(None)` without a cap.
    #[cfg_attr(not(feature = "proxy-protocol"), allow(dead_code))]
    pub(crate) fn claim_source(self: &Arc<Self>, ip: IpAddr) -> Option<Option<SourceClaim>> {
        let Some(max) = self.max_per_source else {
            return Some(None);
        };
        let ip = ip.to_canonical();
        let mut r = lock(&self.registry);
        let open = r.sources.entry(ip).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(Some(SourceClaim {
            control: self.clone(),
            ip,
        }))
    }

    /// The cap on requests in flight (`None` in sync mode).
    pub(crate) fn max_connections(&self) -> Option<usize> {
        self.max_connections
    }

    pub(crate) fn max_per_source(&self) -> Option<usize> {
        self.max_per_source
    }

    pub(crate) fn active(&self) -> usize {
        lock(&self.registry).live.len()
    }

    /// Waits until no request is in flight and no serve loop runs, or the deadline passes, or
    /// (with `until_cut`) [`cut_now`](Self::cut_now) is called; true if the server went idle.
    pub(crate) fn wait_idle(&self, deadline: Option<Instant>, until_cut: bool) -> bool {
        let mut r = lock(&self.registry);
        loop {
            let idle = r.live.is_empty() && r.serving.is_empty();
            if idle || (until_cut && self.cut_requested()) {
                return idle;
            }
            r.waiters += 1;
            let woken = wait_until(&self.registry_changed, r, deadline);
            r = woken.unwrap_or_else(|| lock(&self.registry));
            r.waiters -= 1;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return r.live.is_empty() && r.serving.is_empty();
            }
        }
    }

    /// Ends a drain's grace period now: the drain cuts what is still running at once, and
    /// closing the server no longer waits for handlers (a second Ctrl-C).
    #[cfg(feature = "signals")]
    pub(crate) fn cut_now(&self) {
        self.cut_requested.store(true, Ordering::Release);
        let r = lock(&self.registry);
        if r.waiters > 0 {
            self.registry_changed.notify_all();
        }
    }

    pub(crate) fn cut_requested(&self) -> bool {
        self.cut_requested.load(Ordering::Acquire)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether the accept loop waits for a slot: none is free under the limit.
    pub(crate) fn is_full(&self) -> bool {
        self.limiter.as_ref().is_some_and(|l| {
            let slots = lock(&l.state);
            slots.waiting + usize::from(slots.parked.is_some()) > slots.free
        })
    }

    /// A duplicate of the listening socket, for the pressure policy to see newcomers queue;
    /// `None` once the listener is closed (or for a datagram server).
    pub(crate) fn listener_dup(&self) -> Option<OwnedFd> {
        lock(&self.listening).as_ref()?.try_clone().ok()
    }

    /// The pressure policy: closes up to `n` connections that wait on their peers between
    /// units, those idle longest first (Envoy's overload manager; nginx's and Apache's
    /// keep-alive connections are the first to go when workers run short), less those cut
    /// already and not yet gone. Each is counted in `evicted` and given to `report` to log.
    /// True if it shed any.
    pub(crate) fn evict(&self, n: usize, mut report: impl FnMut(&Stream, Duration)) -> bool {
        if self.pressure.shed_pending.load(Ordering::Relaxed) {
            return false;
        }
        let r = lock(&self.registry);
        let leaving = r.live.values().flatten().filter(|s| s.was_cut()).count();
        let n = n.saturating_sub(leaving);
        if n == 0 {
            return false;
        }
        let mut idle: Vec<(Duration, &Stream)> = r
            .live
            .values()
            .flatten()
            .filter_map(|s| Some((s.idleness()?, s)))
            .collect();
        if idle.len() > n {
            idle.select_nth_unstable_by(n - 1, |a, b| b.0.cmp(&a.0));
            idle.truncate(n);
        }
        let mut shed = false;
        for (was_idle, s) in idle {
            if s.mark_cut() {
                self.pressure.shed_pending.store(true, Ordering::Relaxed);
                self.record(Event::Evicted);
                let _ = s.shutdown(Shutdown::Both);
                report(s, was_idle);
                shed = true;
            }
        }
        shed
    }

    /// Shuts down the sockets of the in-flight connections that `pick` selects.
    pub(crate) fn cut_where(&self, mut pick: impl FnMut(&Stream) -> bool) {
        let r = lock(&self.registry);
        for s in r.live.values().flatten() {
            if pick(s) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Waits until no serve loop runs; false at once, without waiting, if this thread runs one
    /// or accepts for one (it would wait for itself).
    pub(crate) fn wait_serving_done(&self) -> bool {
        let me = thread::current().id();
        let mut r = lock(&self.registry);
        if r.serving.contains(&me) || r.accepting_for_loop.contains(&me) {
            return false;
        }
        while !r.serving.is_empty() {
            r.waiters += 1;
            r = self
                .registry_changed
                .wait(r)
                .unwrap_or_else(|e| e.into_inner());
            r.waiters -= 1;
        }
        true
    }

    /// Starts a drain, or joins the one under way: new clients are refused and the serve
    /// loops asked to return.
    pub(crate) fn begin_drain(&self) {
        let me = thread::current().id();
        let loop_elsewhere = {
            let r = lock(&self.registry);
            r.serving.iter().any(|t| *t != me)
                && self.accepting.load(Ordering::Acquire)
                && self.still_listening()
                // An event worker's `verify_request`: the loop waits for it before it can.
                && !r.accepting_for_loop.contains(&me)
        };
        // A serve loop waiting for connections on another thread first takes those already
        // queued in the backlog (a balancer handed them over and sent their request: closing
        // the listener would reset them), then closes the listener itself; wait for that, as
        // long as such a loop runs, up to a bound. A loop busy with a request (sync mode) is
        // not waited for: new clients must be refused at once. The drain is under way
        // (`is_draining`) once the listener is closed.
        if loop_elsewhere {
            self.take_backlog.store(true, Ordering::Release);
            self.request_shutdown();
            let until = Instant::now() + BACKLOG_HANDOFF;
            let mut r = lock(&self.registry);
            // `stop_listening` and a serve loop leaving notify.
            while !self.listener_closed() && r.serving.iter().any(|t| *t != me) {
                r.waiters += 1;
                let Some(mut woken) = wait_until(&self.registry_changed, r, Some(until)) else {
                    r = lock(&self.registry);
                    r.waiters -= 1;
                    break;
                };
                woken.waiters -= 1;
                r = woken;
            }
        }
        let first = {
            let mut r = lock(&self.registry);
            let first = !self.draining.swap(true, Ordering::AcqRel);
            if first {
                r.drain_base = r.completed;
            }
            first
        };
        self.request_shutdown();
        self.stop_listening();
        // Event-mode connections parked between messages have nothing in flight: close them
        // now (their workers see the end of file and run `finish`). Pairs with the fence a
        // connection passes before it parks: either it is seen parked here, or it sees the drain.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.cut_where(|s| s.is_parked());
        if first && let Some(hook) = self.drain_hook.get() {
            hook();
        }
    }

    /// Sets what a drain calls when it begins (once per server).
    pub(crate) fn on_drain(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.drain_hook.set(hook);
    }

    /// Asks the serve loop to return once `n` connections have been accepted.
    #[cfg(feature = "signals")]
    pub(crate) fn set_accept_limit(&self, n: u64) {
        self.recorder.set_accept_limit(n);
    }

    /// Whether other processes may accept from this server's listener (it was inherited).
    pub(crate) fn listener_is_shared(&self) -> bool {
        self.shared_listener.load(Ordering::Acquire)
    }

    /// Marks the listener as shared with other processes; see `shared_listener`.
    pub(crate) fn set_shared_listener(&self) {
        self.shared_listener.store(true, Ordering::Release);
    }

    pub(crate) fn drain(&self, grace: Duration, cut_wait: Duration) -> DrainReport {
        struct Draining<'a>(&'a AtomicBool);
        impl Drop for Draining<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        self.begin_drain();
        let _draining = Draining(&self.draining);
        let idle = self.wait_idle(deadline_after(grace), true);
        let finished = {
            let r = lock(&self.registry);
            r.completed - r.drain_base
        };
        if idle {
            return DrainReport {
                finished,
                cut: 0,
                still_running: 0,
            };
        }
        let running = self.active() as u64;
        self.cut_where(|_| true);
        self.wait_idle(deadline_after(cut_wait), false);
        DrainReport {
            finished,
            cut: running,
            still_running: self.active() as u64,
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        self.recorder.snapshot(self.active() as u64)
    }

    /// The one way a count changes: `event` goes to the [`Recorder`], and what it asks of the
    /// server (the accept limit reached: stop serving) is done here.
    pub(crate) fn record(&self, event: Event<'_>) {
        if self.recorder.record(event) == Recorded::AcceptLimitReached {
            self.request_shutdown();
        }
    }
}

/// A running serve loop; see [`Control::serving`].
pub(crate) struct Serving<'a> {
    control: &'a Control,
    rearm: bool,
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        let c = self.control;
        let mut r = lock(&c.registry);
        let me = thread::current().id();
        if let Some(i) = r.serving.iter().position(|t| *t == me) {
            r.serving.swap_remove(i);
        }
        if r.serving.is_empty() && self.rearm {
            c.clear_shutdown();
        }
        if r.waiters > 0 {
            c.registry_changed.notify_all();
        }
    }
}

/// An event worker accepting for the serve loops; see [`Control::accepting_for_loop`].
pub(crate) struct AcceptingForLoop<'a> {
    control: &'a Control,
}

impl Drop for AcceptingForLoop<'_> {
    fn drop(&mut self) {
        let mut r = lock(&self.control.registry);
        let me = thread::current().id();
        if let Some(i) = r.accepting_for_loop.iter().position(|t| *t == me) {
            r.accepting_for_loop.swap_remove(i);
        }
    }
}

/// Marks one request as in flight; dropping it marks it done.
pub(crate) struct Ticket {
    control: Arc<Control>,
    id: u64,
    /// The client address counted against `max_per_source`, if any.
    source: Option<IpAddr>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut r = lock(&self.control.registry);
        r.live.remove(&self.id);
        if let Some(ip) = self.source
            && let Some(open) = r.sources.get_mut(&ip)
        {
            *open -= 1;
            if *open == 0 {
                r.sources.remove(&ip);
            }
        }
        r.completed += 1;
        if r.waiters > 0 {
            self.control.registry_changed.notify_all();
        }
        drop(r);
        self.control.record(Event::Closed);
    }
}

/// One connection counted against `max_per_source` for a client that admission found; see
/// [`Control::claim_source`].
pub(crate) struct SourceClaim {
    control: Arc<Control>,
    ip: IpAddr,
}

impl Drop for SourceClaim {
    fn drop(&mut self) {
        let mut r = lock(&self.control.registry);
        if let Some(open) = r.sources.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                r.sources.remove(&self.ip);
            }
        }
    }
}

/// A cloneable handle to a running server: request shutdown from any thread (a handler
/// included), drain it gracefully, read its counters.
///
/// Obtained from [`Server::handle`](crate::Server::handle) or, inside a handler, from the
/// request ([`Request::server`](crate::Request::server)).
#[derive(Clone)]
pub struct ServerHandle {
    pub(crate) control: Arc<Control>,
}

impl ServerHandle {
    /// Asks `serve_forever` to return. It never blocks and never deadlocks, whichever thread calls
    /// it (a handler of a synchronous server included): the accept loop wakes at once, accepts
    /// nothing more, and returns. Requests already in flight go on; join them with
    /// [`Server::close`](crate::Server::close) or cut them with
    /// [`shutdown_graceful`](Self::shutdown_graceful). Called before `serve_forever` starts, it
    /// makes `serve_forever` return at once.
    ///
    /// With [`Dispatch::Sync`](crate::Dispatch::Sync) a request runs on the serving thread
    /// itself, so `serve_forever` returns when the request being served (if any) ends.
    ///
    /// Unlike Python's `shutdown()`, it does not wait for `serve_forever` to return (which is
    /// what makes Python's deadlock when called from a handler of a synchronous server): use
    /// [`shutdown_and_wait`](Self::shutdown_and_wait) to wait.
    pub fn shutdown(&self) {
        self.control.request_shutdown();
    }

    /// Python's `shutdown()`: asks `serve_forever` to return, as [`shutdown`](Self::shutdown)
    /// does, then waits until every `serve_forever` and `handle_request` call of this server has
    /// returned. Requests in flight go on, as with `shutdown`.
    ///
    /// Python's blocks forever when called on the thread that runs `serve_forever` (a handler
    /// of a synchronous server, say): it waits for itself. This one detects that case, and a
    /// `verify_request` hook run by an event worker accepting for the loop, and does not wait:
    /// it requests the shutdown and returns false; the loop returns when the current request
    /// ends. Otherwise it returns true once no serve loop runs (at once if none did).
    pub fn shutdown_and_wait(&self) -> bool {
        self.control.request_shutdown();
        self.control.wait_serving_done()
    }

    /// Whether a shutdown has been requested and not yet consumed by `serve_forever` returning.
    pub fn is_shutdown_requested(&self) -> bool {
        self.control.shutdown_requested()
    }

    /// Whether [`shutdown_graceful`](Self::shutdown_graceful) is in progress. A handler serving
    /// several requests on one connection should check it between requests and return, so that
    /// it finishes before the deadline instead of being cut in the middle of a reply.
    pub fn is_draining(&self) -> bool {
        self.control.is_draining()
    }

    /// Stops accepting, lets in-flight requests finish until `grace` has passed, then shuts down
    /// the sockets of those still running (so handlers blocked on them return) and waits up to one
    /// more second for them. Reports how many finished and how many were cut.
    ///
    /// The listener of a stream server stops listening at once: a client that connects during
    /// the drain is refused (`ECONNREFUSED`) within a round trip, rather than hanging in the
    /// backlog until the server closes, so that it (or a load balancer) retries elsewhere. The
    /// connections already queued in the backlog are served first by `serve_forever`, if it is
    /// running (those a load balancer has sent a request on could not be retried); without a
    /// serve loop they are reset. Unlike
    /// after [`shutdown`](Self::shutdown), the server cannot serve again after a drain:
    /// `serve_forever` returns at once; close it.
    ///
    /// This blocks the caller: call it from a signal-handling thread or the thread that owns the
    /// server, not from a handler (it would wait for itself until the deadline).
    pub fn shutdown_graceful(&self, grace: Duration) -> DrainReport {
        self.control.drain(grace, CUT_WAIT)
    }

    /// A snapshot of the server's counters.
    pub fn stats(&self) -> Stats {
        self.control.stats()
    }

    /// The cap on requests in flight: in thread mode
    /// [`Builder::max_connections`](crate::Builder::max_connections), or the default derived
    /// from the system's limits; in pool mode the number of workers. `None` in sync mode (one
    /// request at a time, on the serving thread), and in thread mode if no system limit could
    /// be read.
    pub fn max_connections(&self) -> Option<usize> {
        self.control.max_connections()
    }

    /// The most connections at once from one client IP address
    /// ([`Builder::max_per_source`](crate::Builder::max_per_source)); `None`: no such cap.
    pub fn max_per_source(&self) -> Option<usize> {
        self.control.max_per_source()
    }

    /// The address the server is bound to (for TCP, with the real port when bound to port 0).
    pub fn local_addr(&self) -> &Addr {
        &self.control.local_addr
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.control.local_addr)
            .field("shutdown_requested", &self.control.shutdown_requested())
            .finish()
    }
}
