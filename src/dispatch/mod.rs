//! Dispatch: which thread runs an accepted request, and when. [`Dispatch::Sync`] runs it on the
//! serving thread, [`Dispatch::Thread`] on a thread of its own, [`Dispatch::Pool`] on one of a
//! fixed set of workers (`pool.rs`). The accept loop hands each request here with its permit
//! and ticket; what runs it is the transport's [`Service`].

use std::io;
use std::sync::Arc;
use std::thread;

use crate::control::{Permit, Ticket};
use crate::transport::{Incoming, Service};
use crate::worker::Ctx;

mod pool;

use pool::Pool;

/// How a server runs its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Dispatch {
    /// One request at a time, on the thread that calls `serve_forever` (Python's `TCPServer`).
    Sync,
    /// A new thread per request (Python's `ThreadingTCPServer`), capped by
    /// [`Builder::max_connections`](crate::Builder::max_connections), whose default is what
    /// the system's limits allow. Finished threads are reaped as they end. The default.
    #[default]
    Thread,
    /// A fixed pool of worker threads. When all are busy the server stops accepting, so the
    /// excess waits in the kernel's listen backlog.
    Pool {
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
    mode: Mode<S::Request>,
}

enum Mode<R> {
    Sync,
    Thread { stack_size: Option<usize> },
    Pool(Pool<Job<R>>),
}

impl<S: Service> Dispatcher<S> {
    /// Starts the workers `dispatch` needs (none but in pool mode).
    pub(crate) fn start(
        dispatch: Dispatch,
        stack_size: Option<usize>,
        shared: Arc<Shared<S>>,
    ) -> io::Result<Dispatcher<S>> {
        let mode = match dispatch {
            Dispatch::Sync => Mode::Sync,
            Dispatch::Thread => Mode::Thread { stack_size },
            Dispatch::Pool { workers } => {
                let s = shared.clone();
                Mode::Pool(Pool::new(
                    workers,
                    stack_size,
                    Arc::new(move |job| s.run(job)),
                )?)
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
            Mode::Thread { stack_size } => {
                let peer = job.0.peer().clone();
                let shared = self.shared.clone();
                let mut b = thread::Builder::new();
                if let Some(s) = stack_size {
                    b = b.stack_size(*s);
                }
                b.spawn(move || shared.run(job)).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot start a thread for {peer}: {e}"))
                })?;
            }
        }
        Ok(())
    }

    /// Stops the workers once their current requests end; with `join`, waits for that.
    pub(crate) fn close(self, join: bool) {
        if let Mode::Pool(pool) = self.mode {
            pool.close(join);
        }
    }
}
