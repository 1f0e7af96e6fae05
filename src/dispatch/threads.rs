//! The threads of [`Dispatch::Thread`](super::Dispatch::Thread): a thread per request, reused.
//!
//! Spawning a thread per connection costs a `clone`, a stack mapping and its teardown: under
//! churn that halved the connection rate against a pre-spawned pool. So, like Java's cached
//! thread pool, a thread whose request ends waits [`KEEP_ALIVE`] for the next one, and exits
//! if none comes. Every request still has a thread of its own: a new one is started whenever
//! no finished thread is waiting, so nothing ever queues behind a busy thread.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use crate::worker::panic_message;

/// How long a thread whose request ended waits for the next before it exits.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(3);

pub(crate) struct Threads<J> {
    /// A zero-capacity channel: a send succeeds only into the hands of a waiting thread.
    handoff: Sender<J>,
    waiting: Receiver<J>,
    stack_size: Option<usize>,
    run: Arc<dyn Fn(J) + Send + Sync>,
}

impl<J: Send + 'static> Threads<J> {
    pub(crate) fn new(stack_size: Option<usize>, run: Arc<dyn Fn(J) + Send + Sync>) -> Threads<J> {
        let (handoff, waiting) = bounded(0);
        Threads {
            handoff,
            waiting,
            stack_size,
            run,
        }
    }

    /// Runs `job` on a thread that is waiting for one, or on a new thread.
    pub(crate) fn submit(&self, job: J) -> io::Result<()> {
        let job = match self.handoff.try_send(job) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => job,
        };
        let (run, waiting) = (self.run.clone(), self.waiting.clone());
        let mut b = thread::Builder::new();
        if let Some(s) = self.stack_size {
            b = b.stack_size(s);
        }
        // On failure the closure, and with it the job, is dropped: the socket closes.
        b.spawn(move || {
            let mut job = job;
            loop {
                // `run` catches handler panics itself; this only guards against a bug of ours.
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| run(job))) {
                    log::error!(
                        "request thread survived an internal panic: {}",
                        panic_message(&*p)
                    );
                }
                // Ends on the keep-alive timeout, or at once when the server closes (the
                // sender is dropped).
                match waiting.recv_timeout(KEEP_ALIVE) {
                    Ok(next) => job = next,
                    Err(_) => return,
                }
            }
        })?;
        Ok(())
    }
}
