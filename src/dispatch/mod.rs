//! Dispatch: which thread runs an accepted request, and when. [`Dispatch::Sync`] runs it on the
//! serving thread, [`Dispatch::Thread`] on a thread of its own, [`Dispatch::Pool`] on one of a
//! fixed set of workers (`pool.rs`). The accept loop hands each request here with its permit
//! and ticket; what runs it is the transport's [`Service`].

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::control::{Permit, Ticket};
use crate::transport::{Incoming, Service};
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
    /// Stream servers only, with a [`MessageRequestHandler`](crate::MessageRequestHandler):
    /// a worker is held only while a message is served. Between messages a connection is
    /// parked in an epoll set, holding no thread and no buffer, so idle connections cost their
    /// socket and the handler's own state; a pipelined message is served without parking;
    /// PROXY headers, TLS handshakes and authentication handshakes park too while the client
    /// (or the load balancer) sends them. Like Apache's event MPM, with a blocking handler API.
    /// No worker waits on a peer: the sockets are non-blocking, a message that needs input not
    /// yet arrived is taken back and run again when it comes, output the socket cannot take is
    /// queued (and the connection not read while more than 64 KiB waits), so clients that stop
    /// reading or stop mid-message stall nobody (see
    /// [`MessageHandler`](crate::MessageHandler)). The read and write timeouts do not apply:
    /// nothing blocks for them to bound; the idle timeout and minimum data rate do.
    /// The workers take turns waiting on the set and serve a batch of ready connections per
    /// wake-up (64 between them, at least 8 each): one worker per core suits handlers that do
    /// not block for long; more if they do (a handler that blocks delays the connections of
    /// its batch). The workers accept too: the listener is in their set, so a new connection
    /// is accepted, checked (`verify_request`, the caps) and started by the worker that sees
    /// it, with no hand-over between threads. The thread that runs `serve_forever` runs the
    /// `service_actions` hook, and accepts only when the workers cannot: no free slot under
    /// `max_connections` (it waits for one, while new clients wait in the backlog) or an
    /// accept error to back off from (out of descriptors).
    /// Capped by [`Builder::max_connections`](crate::Builder::max_connections), whose default
    /// is what the descriptor limit allows. Linux only.
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    #[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
    Event {
        /// Number of worker threads (at least 1).
        workers: usize,
    },
}

impl Dispatch {
    /// The most requests this mode runs at once, given the thread-mode cap.
    pub(crate) fn limit(self, max_connections: Option<usize>) -> Option<usize> {
        match self {
            Dispatch::Sync => None,
            Dispatch::Thread => max_connections,
            Dispatch::Pool { workers } => Some(workers),
            #[cfg(all(target_os = "linux", not(socketserver_portable)))]
            Dispatch::Event { .. } => max_connections,
        }
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

    /// The next connection, without waiting.
    fn try_next(&self) -> Taken<Job<R>>;
}

/// What [`Acceptor::try_next`] took.
pub(crate) enum Taken<J> {
    /// A connection to serve.
    Job(J),
    /// A connection refused (closed and counted) or a transient error: try again.
    Refused,
    /// None queued.
    Empty,
    /// No free slot, an error that needs backoff, or a shutdown: the serving thread takes over.
    HandOver,
}

impl<S: Service> Shared<S> {
    fn run(&self, (req, permit, ticket): Job<S::Request>) {
        self.service.serve(req, &self.ctx);
        // The ticket first: whoever the permit wakes sees this request as finished.
        drop(ticket);
        drop(permit);
    }
}

/// The running form of a [`Dispatch`].
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
    /// Starts the workers `dispatch` needs (none but in pool mode).
    pub(crate) fn start(
        dispatch: Dispatch,
        stack_size: Option<usize>,
        shared: Arc<Shared<S>>,
    ) -> io::Result<Dispatcher<S>> {
        let s = shared.clone();
        let run = Arc::new(move |job| s.run(job));
        let mode = match dispatch {
            Dispatch::Sync => Mode::Sync,
            Dispatch::Thread => Mode::Thread(Threads::new(stack_size, run)),
            Dispatch::Pool { workers } => Mode::Pool(Pool::new(workers, stack_size, run)?),
            #[cfg(all(target_os = "linux", not(socketserver_portable)))]
            Dispatch::Event { workers } => {
                Mode::Event(Event::new(workers, stack_size, shared.clone())?)
            }
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
