//! A fixed pool of worker threads fed over a crossbeam channel.
//!
//! The channel never holds more jobs than there are idle workers: the acceptor takes a permit
//! (one per worker, see `Control::acquire`) before it accepts, so when every worker is busy the
//! next connection waits in the kernel's backlog, not in this process.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Sender, bounded};

use crate::worker::panic_message;

pub(crate) struct Pool<J> {
    tx: Option<Sender<J>>,
    workers: Vec<JoinHandle<()>>,
}

impl<J: Send + 'static> Pool<J> {
    pub(crate) fn new(
        workers: usize,
        stack_size: Option<usize>,
        run: Arc<dyn Fn(J) + Send + Sync>,
    ) -> io::Result<Pool<J>> {
        let (tx, rx) = bounded::<J>(workers);
        let mut pool = Pool {
            tx: Some(tx),
            workers: Vec::with_capacity(workers),
        };
        for i in 0..workers {
            let rx = rx.clone();
            let run = run.clone();
            let mut b = thread::Builder::new().name(format!("socketserver-worker-{i}"));
            if let Some(s) = stack_size {
                b = b.stack_size(s);
            }
            // On error, dropping `pool` disconnects the channel and joins the workers started.
            pool.workers.push(b.spawn(move || {
                for job in rx {
                    // `run` catches handler panics itself; this only guards the worker against a
                    // bug of ours, so that one bad request cannot shrink the pool.
                    if let Err(p) = catch_unwind(AssertUnwindSafe(|| run(job))) {
                        log::error!("worker survived an internal panic: {}", panic_message(&*p));
                    }
                }
            })?);
        }
        Ok(pool)
    }

    /// Hands a job to an idle worker. The caller holds a permit, so one is idle and this never
    /// blocks for long.
    pub(crate) fn submit(&self, job: J) {
        if let Some(tx) = &self.tx
            && tx.send(job).is_err()
        {
            log::error!("worker pool is gone; request dropped");
        }
    }

    /// Stops the workers once their current jobs end; with `join`, waits for that.
    pub(crate) fn close(mut self, join: bool) {
        self.tx = None;
        if !join {
            self.workers.clear();
        }
    }
}

impl<J> Drop for Pool<J> {
    fn drop(&mut self) {
        self.tx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
