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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};

use crate::worker::panic_message;

/// How long a thread whose request ended waits for the next before it exits.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(3);

pub(crate) struct Threads<J> {
    jobs: Sender<J>,
    shared: Arc<Shared<J>>,
    stack_size: Option<usize>,
}

struct Shared<J> {
    waiting: Receiver<J>,
    /// Threads that have finished a request and not been promised a job yet. A thread counts
    /// itself here *before* it waits, so that a connection accepted while it is still on its
    /// way to the channel goes to it rather than to a new thread (a rendezvous channel, which
    /// hands over only to a thread already waiting, started a thread on most connections
    /// under churn). Taking one is a promise: the job follows on the channel.
    idle: AtomicUsize,
    run: Arc<dyn Fn(J) + Send + Sync>,
}

impl<J: Send + 'static> Threads<J> {
    pub(crate) fn new(stack_size: Option<usize>, run: Arc<dyn Fn(J) + Send + Sync>) -> Threads<J> {
        let (jobs, waiting) = unbounded();
        Threads {
            jobs,
            shared: Arc::new(Shared {
                waiting,
                idle: AtomicUsize::new(0),
                run,
            }),
            stack_size,
        }
    }

    /// Runs `job` on a thread that is idle, or on a new thread.
    pub(crate) fn submit(&self, job: J) -> io::Result<()> {
        let idle = &self.shared.idle;
        let mut n = idle.load(Ordering::Acquire);
        while n > 0 {
            match idle.compare_exchange_weak(n, n - 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // Promised to an idle thread, which will not exit before it receives it.
                    // The receivers live as long as `self.shared`, so this cannot fail.
                    let _ = self.jobs.send(job);
                    return Ok(());
                }
                Err(now) => n = now,
            }
        }
        let shared = self.shared.clone();
        let mut b = thread::Builder::new();
        if let Some(s) = self.stack_size {
            b = b.stack_size(s);
        }
        // On failure the closure, and with it the job, is dropped: the socket closes.
        b.spawn(move || shared.work(job))?;
        Ok(())
    }
}

impl<J: Send + 'static> Shared<J> {
    fn work(&self, mut job: J) {
        loop {
            // `run` catches handler panics itself; this only guards against a bug of ours.
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| (self.run)(job))) {
                log::error!(
                    "request thread survived an internal panic: {}",
                    panic_message(&*p)
                );
            }
            self.idle.fetch_add(1, Ordering::AcqRel);
            job = match self.next() {
                Some(next) => next,
                None => return,
            };
        }
    }

    /// The next job, or `None` when the keep-alive ends with no job promised to this thread,
    /// or the server closes (the sender is dropped).
    fn next(&self) -> Option<J> {
        loop {
            match self.waiting.recv_timeout(KEEP_ALIVE) {
                Ok(job) => return Some(job),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {}
            }
            // Leave the idle count, unless every idle thread has been promised a job: then one
            // of those jobs is this thread's, on its way.
            let mut n = self.idle.load(Ordering::Acquire);
            loop {
                if n == 0 {
                    break;
                }
                match self
                    .idle
                    .compare_exchange_weak(n, n - 1, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => return None,
                    Err(now) => n = now,
                }
            }
        }
    }
}
