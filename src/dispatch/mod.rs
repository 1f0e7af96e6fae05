//! Dispatch: which thread runs an accepted request, and when. [`Dispatch::Sync`] runs it on the
//! serving thread, [`Dispatch::Thread`] on a thread of its own, [`Dispatch::Pool`] on one of a
//! fixed set of workers (`pool.rs`). The accept loop hands each request here with its permit
//! and ticket; what runs it is the transport's [`Service`].

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use crate::control::{Permit, Ticket};
use crate::transport::{Incoming, Service};
use crate::wait::Backoff;
use crate::worker::Ctx;

// epoll and eventfd: Linux only (`socketserver_portable` leaves it out on Linux too, for CI).
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
mod event;
mod pool;
mod threads;

#[cfg(all(target_os = "linux", not(socketserver_portable)))]
use event::Event;
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
pub(crate) use event::WorkersAccept;
use pool::Pool;
use threads::Threads;

/// How a server runs its requests.
///
/// Stream servers default to [`Thread`](Dispatch::Thread); datagram servers to
/// [`Sync`](Dispatch::Sync), as in Python, because serving datagrams concurrently reorders
/// their replies (see [`UdpServer`](crate::UdpServer)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Dispatch {
    /// One request at a time, on the thread that calls `serve_forever` (Python's `TCPServer`).
    /// Datagrams are answered in the order they arrived. The default of datagram servers.
    Sync,
    /// A thread per request (Python's `ThreadingTCPServer`), capped by
    /// [`Builder::max_connections`](crate::Builder::max_connections), whose default is what
    /// the system's limits allow. The default of stream servers. A thread whose request ends
    /// waits a few seconds for the next one before it exits, so a busy server does not pay for
    /// a new thread on every connection, and an idle one keeps none. Datagrams served this way
    /// are answered in whatever order their threads finish.
    #[default]
    Thread,
    /// A fixed pool of worker threads. When all are busy the server stops accepting, so the
    /// excess waits in the kernel's listen backlog. Datagrams served this way are answered in
    /// whatever order the workers finish them.
    Pool {
        /// Number of worker threads (at least 1).
        workers: usize,
    },
}

/// How a server runs its requests, event mode included: a [`Dispatch`], or
/// [`Builder::event`](crate::Builder::event), which only message handlers have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Run {
    Sync,
    Thread,
    Pool {
        workers: usize,
    },
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    Event {
        workers: usize,
    },
}

impl From<Dispatch> for Run {
    fn from(d: Dispatch) -> Run {
        match d {
            Dispatch::Sync => Run::Sync,
            Dispatch::Thread => Run::Thread,
            Dispatch::Pool { workers } => Run::Pool { workers },
        }
    }
}

impl Run {
    /// The most requests this mode runs at once, given the thread-mode cap.
    pub(crate) fn limit(self, max_connections: Option<usize>) -> Option<usize> {
        match self {
            Run::Sync => None,
            Run::Thread => max_connections,
            Run::Pool { workers } => Some(workers),
            #[cfg(all(target_os = "linux", not(socketserver_portable)))]
            Run::Event { .. } => max_connections,
        }
    }

    /// Whether connections park between messages (event mode).
    pub(crate) fn parks(self) -> bool {
        #[cfg(all(target_os = "linux", not(socketserver_portable)))]
        return matches!(self, Run::Event { .. });
        #[cfg(not(all(target_os = "linux", not(socketserver_portable))))]
        false
    }
}

/// The service and what its workers share: one per server, behind an `Arc`.
pub(crate) struct Shared<S> {
    pub(crate) service: S,
    pub(crate) ctx: Ctx,
}

/// An accepted request with its slot under the limit and its entry in the registry.
pub(crate) type Job<R> = (R, Permit, Ticket);

/// The accept loop's steps, for event workers that accept when the listener is ready.
pub(crate) trait Acceptor<R>: Send + Sync {
    /// The listener, to wait on.
    fn fd(&self) -> BorrowedFd<'_>;

    /// The next connection, under `permit` (taken first: without one, the listener waits for
    /// it, and the connection in the backlog), without waiting.
    fn try_next(&self, permit: Permit) -> Taken<Job<R>>;

    /// Counts and logs a [`Taken::Failed`]; how long to wait before accepting again.
    fn failed(&self, err: &io::Error, backoff: &mut Backoff) -> Duration;
}

/// What [`Acceptor::try_next`] took.
pub(crate) enum Taken<J> {
    /// A connection to serve.
    Job(J),
    /// A connection refused (closed and counted) or a transient error: try again.
    Refused,
    /// None queued.
    Empty,
    /// A shutdown: accept no more for the serve loops that are stopping.
    Stop,
    /// An error that retrying at once cannot fix (out of descriptors): back off.
    Failed(io::Error),
}

impl<S: Service> Shared<S> {
    fn run(&self, (req, permit, ticket): Job<S::Request>) {
        self.service.serve(req, &self.ctx);
        // The ticket first: whoever the permit wakes sees this request as finished.
        drop(ticket);
        drop(permit);
    }
}

/// The running form of a [`Run`].
pub(crate) struct Dispatcher<S: Service> {
    shared: Arc<Shared<S>>,
    mode: Mode<S>,
}

enum Mode<S: Service> {
    Sync,
    Thread(Threads<Job<S::Request>>),
    Pool(Pool<Job<S::Request>>),
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    Event(Event<S>),
}

impl<S: Service> Dispatcher<S> {
    /// Starts the workers `run` needs (none in sync and thread mode).
    pub(crate) fn start(
        run_as: Run,
        stack_size: Option<usize>,
        shared: Arc<Shared<S>>,
    ) -> io::Result<Dispatcher<S>> {
        let s = shared.clone();
        let run = Arc::new(move |job| s.run(job));
        let mode = match run_as {
            Run::Sync => Mode::Sync,
            Run::Thread => Mode::Thread(Threads::new(stack_size, run)),
            Run::Pool { workers } => Mode::Pool(Pool::new(workers, stack_size, run)?),
            #[cfg(all(target_os = "linux", not(socketserver_portable)))]
            Run::Event { workers } => Mode::Event(Event::new(workers, stack_size, shared.clone())?),
        };
        Ok(Dispatcher { shared, mode })
    }

    /// Runs `job` (on this thread in sync mode). Fails only when a thread cannot be started;
    /// the request is then dropped, which closes its socket.
    pub(crate) fn dispatch(&self, job: Job<S::Request>) -> io::Result<()> {
        match &self.mode {
            Mode::Sync => self.shared.run(job),
            Mode::Pool(pool) => pool.submit(job),
            #[cfg(all(target_os = "linux", not(socketserver_portable)))]
            Mode::Event(event) => event.submit(job)?,
            Mode::Thread(threads) => {
                let peer = job.0.peer().clone();
                threads.submit(job).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot start a thread for {peer}: {e}"))
                })?;
            }
        }
        Ok(())
    }

    /// In event mode, has the workers accept from `acceptor` until the returned guard drops
    /// (see `event.rs`). `None` in the other modes, or if the listener cannot join the set.
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    pub(crate) fn workers_accept(
        &self,
        acceptor: Arc<dyn Acceptor<S::Request>>,
    ) -> Option<WorkersAccept<'_, S>> {
        match &self.mode {
            Mode::Event(event) => event.accept_from(acceptor),
            _ => None,
        }
    }

    /// Stops the workers once their current requests end; with `join`, waits for that.
    pub(crate) fn close(self, join: bool) {
        match self.mode {
            Mode::Pool(pool) => pool.close(join),
            #[cfg(all(target_os = "linux", not(socketserver_portable)))]
            Mode::Event(event) => event.close(join),
            Mode::Sync | Mode::Thread(_) => {}
        }
    }
}
