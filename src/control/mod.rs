//! What every thread of a server shares, in parts with one job each: [`Shutdown`] (the
//! shutdown flag and waker, the serve loops, the listener a drain closes), [`Limits`] (the
//! connection limit and the per-source cap), [`Registry`] (the requests in flight, for a drain
//! and the reaper to cut), the [`Recorder`] (every count), and [`Drain`]'s state. `Control`
//! holds them and does what needs several: admitting a request into the registry under the
//! per-source cap, draining, and the pressure policy's shedding. [`ServerHandle`] is its public
//! face.

mod limits;
mod registry;
mod shutdown;

use std::io;
use std::net::{IpAddr, Shutdown as SocketShutdown};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub(crate) use self::limits::{Limits, Permit, SourceClaim};
use self::registry::{Entry, Registry};
pub(crate) use self::shutdown::Shutdown;
use crate::recorder::{Event, Recorded, Recorder, Stats};
use crate::wait::deadline_after;
pub(crate) use crate::wait::lock;
use crate::{Addr, Stream};

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

/// A drain's own state: whether one runs, whether it was told to cut now, where it started.
#[derive(Default)]
pub(crate) struct Drain {
    draining: AtomicBool,
    /// Set by [`Control::cut_now`]: a drain stops waiting and cuts what is left, and closing
    /// the server no longer waits for handlers.
    cut_requested: AtomicBool,
    /// Requests completed when the current drain started, so that its report counts what
    /// finished since then, whoever started it.
    base: AtomicU64,
    /// Called when a drain begins (readiness: `STOPPING=1`).
    hook: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Drain {
    pub(crate) fn cut_requested(&self) -> bool {
        self.cut_requested.load(Ordering::Acquire)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Sets what a drain calls when it begins (once per server).
    pub(crate) fn on_drain(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.hook.set(hook);
    }
}

/// The state every thread of one server shares.
pub struct Control {
    pub(crate) shutdown: Shutdown,
    pub(crate) limits: Arc<Limits>,
    registry: Arc<Registry>,
    /// Every count of the server, changed only through [`record`](Self::record).
    pub(crate) recorder: Recorder,
    pub(crate) drain: Drain,
    pub(crate) local_addr: Addr,
}

impl Control {
    /// `limit`: the most requests in flight (`None`: sync mode, one at a time);
    /// `max_per_source`: the most connections from one client IP address; `listening`: a
    /// duplicate of the listening socket of a stream server, which a drain shuts down
    /// ([`Shutdown::stop_listening`]), `None` for a datagram server.
    pub(crate) fn new(
        local_addr: Addr,
        limit: Option<usize>,
        max_per_source: Option<usize>,
        listening: Option<OwnedFd>,
    ) -> io::Result<Arc<Control>> {
        Ok(Arc::new(Control {
            shutdown: Shutdown::new(listening)?,
            limits: Arc::new(Limits::new(limit, max_per_source)),
            registry: Arc::new(Registry::default()),
            recorder: Recorder::new(&local_addr),
            drain: Drain::default(),
            local_addr,
        }))
    }

    /// Asks the serve loops to return, and wakes whoever waits for a slot to see it.
    pub(crate) fn request_shutdown(&self) {
        self.shutdown.request();
        self.limits.wake_waiters();
    }

    /// Takes a slot under the limit, waiting while none is free; `None` once shutdown is
    /// requested or the deadline passes.
    pub(crate) fn acquire(&self, deadline: Option<Instant>) -> Option<Permit> {
        self.limits.acquire(&self.shutdown, deadline)
    }

    /// The one way a count changes: `event` goes to the [`Recorder`], and what it asks of the
    /// server (the accept limit reached: stop serving) is done here.
    pub(crate) fn record(&self, event: Event<'_>) {
        if self.recorder.record(event) == Recorded::AcceptLimitReached {
            self.request_shutdown();
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        self.recorder.snapshot(self.active() as u64)
    }

    pub(crate) fn active(&self) -> usize {
        self.registry.active()
    }

    /// Records a request as in flight until the ticket is dropped; `stream` lets a drain or the
    /// idle reaper shut its socket down. `source` is the client's IP address for a connection:
    /// `None` (refused) if that address already has `max_per_source` connections open.
    ///
    /// The count is kept per address as the accept loop saw it. A PROXY-protocol stage, which
    /// learns the real client address later, counts the client it found instead
    /// ([`Limits::claim_source`]); the accept loop then leaves the count to it.
    pub(crate) fn register(
        self: &Arc<Self>,
        stream: Option<Stream>,
        source: Option<IpAddr>,
    ) -> Option<Ticket> {
        let source = match source {
            Some(ip) => self.limits.claim_source(ip)?,
            None => None,
        };
        let entry = self.registry.insert(stream);
        self.record(Event::Opened);
        Some(Ticket {
            control: self.clone(),
            _entry: entry,
            _source: source,
        })
    }

    /// Waits until no request is in flight and no serve loop runs, or the deadline passes, or
    /// (with `until_cut`) [`cut_now`](Self::cut_now) is called; true if the server went idle.
    /// The serve loops are waited for first: only they (and the event workers accepting for
    /// them, which they wait for) register requests.
    pub(crate) fn wait_idle(&self, deadline: Option<Instant>, until_cut: bool) -> bool {
        let stop = || until_cut && self.drain.cut_requested();
        self.shutdown.wait_no_loop(deadline, &stop) && self.registry.wait_empty(deadline, &stop)
    }

    /// Ends a drain's grace period now: the drain cuts what is still running at once, and
    /// closing the server no longer waits for handlers (a second Ctrl-C).
    #[cfg(feature = "signals")]
    pub(crate) fn cut_now(&self) {
        self.drain.cut_requested.store(true, Ordering::Release);
        self.shutdown.notify();
        self.registry.wake();
    }

    /// The pressure policy: closes up to `n` connections that wait on their peers between
    /// units, those idle longest first (Envoy's overload manager; nginx's and Apache's
    /// keep-alive connections are the first to go when workers run short), less those cut
    /// already and not yet gone. Each is counted in `evicted` and given to `report` to log.
    /// True if it shed any.
    pub(crate) fn evict(&self, n: usize, mut report: impl FnMut(&Stream, Duration)) -> bool {
        let pressure = &self.limits.pressure;
        if pressure.shed_pending.load(Ordering::Relaxed) {
            return false;
        }
        let mut leaving = 0;
        let mut idle: Vec<(Duration, Stream)> = Vec::new();
        self.registry.each(|s| {
            leaving += usize::from(s.was_cut());
            if let Some(d) = s.idleness() {
                idle.push((d, s.clone()));
            }
        });
        let n = n.saturating_sub(leaving);
        if n == 0 {
            return false;
        }
        if idle.len() > n {
            idle.select_nth_unstable_by(n - 1, |a, b| b.0.cmp(&a.0));
            idle.truncate(n);
        }
        let mut shed = false;
        for (was_idle, s) in idle {
            if s.mark_cut() {
                pressure.shed_pending.store(true, Ordering::Relaxed);
                self.record(Event::Evicted);
                let _ = s.shutdown(SocketShutdown::Both);
                report(&s, was_idle);
                shed = true;
            }
        }
        shed
    }

    /// Shuts down the sockets of the in-flight connections that `pick` selects.
    pub(crate) fn cut_where(&self, mut pick: impl FnMut(&Stream) -> bool) {
        self.registry.each(|s| {
            if pick(s) {
                let _ = s.shutdown(SocketShutdown::Both);
            }
        });
    }

    /// Starts a drain, or joins the one under way: new clients are refused and the serve
    /// loops asked to return.
    pub(crate) fn begin_drain(&self) {
        let me = thread::current().id();
        // A serve loop waiting for connections on another thread first takes those already
        // queued in the backlog (a balancer handed them over and sent their request: closing
        // the listener would reset them), then closes the listener itself; wait for that, as
        // long as such a loop runs, up to a bound. A loop busy with a request (sync mode) is
        // not waited for: new clients must be refused at once. The drain is under way
        // (`is_draining`) once the listener is closed.
        if self.shutdown.loop_elsewhere_accepting(me) {
            self.shutdown.want_backlog();
            self.request_shutdown();
            self.shutdown
                .wait_handoff(me, Instant::now() + BACKLOG_HANDOFF);
        }
        let first = !self.drain.draining.swap(true, Ordering::AcqRel);
        if first {
            self.drain
                .base
                .store(self.registry.completed(), Ordering::Release);
        }
        self.request_shutdown();
        self.shutdown.stop_listening(&self.local_addr);
        // Event-mode connections parked between messages have nothing in flight: close them
        // now (their workers see the end of file and run `finish`). Pairs with the fence a
        // connection passes before it parks: either it is seen parked here, or it sees the drain.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.cut_where(|s| s.is_parked());
        if first && let Some(hook) = self.drain.hook.get() {
            hook();
        }
    }

    pub(crate) fn drain(&self, grace: Duration, cut_wait: Duration) -> DrainReport {
        struct Draining<'a>(&'a AtomicBool);
        impl Drop for Draining<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        self.begin_drain();
        let _draining = Draining(&self.drain.draining);
        let idle = self.wait_idle(deadline_after(grace), true);
        let finished = self.registry.completed() - self.drain.base.load(Ordering::Acquire);
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
}

/// Marks one request as in flight; dropping it marks it done (and gives back its client's
/// count under `max_per_source`).
pub(crate) struct Ticket {
    control: Arc<Control>,
    _entry: Entry,
    _source: Option<SourceClaim>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.control.record(Event::Closed);
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
        self.control.shutdown.wait_serving_done()
    }

    /// Whether a shutdown has been requested and not yet consumed by `serve_forever` returning.
    pub fn is_shutdown_requested(&self) -> bool {
        self.control.shutdown.requested()
    }

    /// Whether [`shutdown_graceful`](Self::shutdown_graceful) is in progress. A handler serving
    /// several requests on one connection should check it between requests and return, so that
    /// it finishes before the deadline instead of being cut in the middle of a reply.
    pub fn is_draining(&self) -> bool {
        self.control.drain.is_draining()
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
        self.control.limits.max_connections()
    }

    /// The most connections at once from one client IP address
    /// ([`Builder::max_per_source`](crate::Builder::max_per_source)); `None`: no such cap.
    pub fn max_per_source(&self) -> Option<usize> {
        self.control.limits.max_per_source()
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
            .field("shutdown_requested", &self.control.shutdown.requested())
            .finish()
    }
}
