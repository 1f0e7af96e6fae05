//! The admission pipeline: what runs on a connection between accept and the handler's `setup`.
//!
//! Stages run in a fixed order, that of [`StageKind`]: a PROXY-protocol header first (who the
//! client really is, when a load balancer stands in between), then a TLS handshake, then an
//! authentication handshake (HMAC or `multiprocessing`). Today's stage is authentication; the
//! others are added by implementing [`Stage`] and giving it a kind, without touching the accept
//! loop or the transports.
//!
//! Whatever the stages, admission has one deadline and one cap: every read and write of every
//! stage shares the handshake deadline, so a client that trickles bytes cannot stretch it, and
//! unfinished admissions are capped (like OpenSSH's `MaxStartups`): at the cap the oldest is cut,
//! so silent connections cannot starve honest clients. A stage that fails closes the connection
//! with a log line and a counter, and the handler never runs.

use std::collections::VecDeque;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::control::{Control, Counters, lock};
use crate::deadline::DeadlineIo;
use crate::log_limit::limited;
use crate::wait::deadline_after;
use crate::{Addr, Auth, Result, Stream};

/// Where a stage sits in the pipeline: stages run in the order these are declared. The PROXY
/// header and the TLS handshake, when they come, sit before `Auth`, in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum StageKind {
    /// The HMAC or `multiprocessing` handshake.
    Auth,
}

/// One step of admission, run on the connection's worker.
pub(crate) trait Stage: Send + Sync + 'static {
    /// Its place in the pipeline, and what its failures are counted as.
    fn kind(&self) -> StageKind;

    /// Refuses a configuration that could never admit anyone; called when the server is built.
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Runs the stage on `conn`; an error refuses the client.
    fn run(&self, conn: &mut Admitting<'_>) -> Result<()>;
}

/// A connection going through admission.
pub(crate) struct Admitting<'a> {
    stream: &'a Stream,
    deadline: Option<Instant>,
}

impl<'a> Admitting<'a> {
    /// The connection's I/O, every call bounded by the one admission deadline.
    pub(crate) fn io(&self) -> DeadlineIo<'a, Stream> {
        DeadlineIo::until(self.stream, self.deadline)
    }
}

impl Stage for Auth {
    fn kind(&self) -> StageKind {
        StageKind::Auth
    }

    fn check(&self) -> Result<()> {
        Auth::check(self)
    }

    fn run(&self, conn: &mut Admitting<'_>) -> Result<()> {
        self.serve(conn.io())
    }
}

/// The stages of one server, with the deadline and the cap they share.
pub(crate) struct Pipeline {
    stages: Vec<Box<dyn Stage>>,
    timeout: Duration,
    max_pending: Option<usize>,
    pending: Mutex<PendingTable>,
}

impl Default for Pipeline {
    fn default() -> Pipeline {
        Pipeline {
            stages: Vec::new(),
            timeout: Auth::DEFAULT_TIMEOUT,
            max_pending: None,
            pending: Mutex::new(PendingTable {
                cap: 1,
                next_id: 0,
                queue: VecDeque::new(),
            }),
        }
    }
}

impl Pipeline {
    /// Adds `stage` in its place, replacing a stage of the same kind.
    pub(crate) fn add(&mut self, stage: Box<dyn Stage>) {
        self.stages.retain(|s| s.kind() != stage.kind());
        let at = self.stages.partition_point(|s| s.kind() < stage.kind());
        self.stages.insert(at, stage);
    }

    /// The deadline of a whole admission, and the most that may be unfinished at once (`None`:
    /// derived from the dispatch limit when the server is built).
    pub(crate) fn set_limits(&mut self, timeout: Duration, max_pending: Option<usize>) {
        self.timeout = timeout;
        self.max_pending = max_pending;
    }

    /// Checks the stages and sizes the cap once the dispatch limit is known: half the workers
    /// may sit in admission, but never fewer than 4 (or all of a smaller pool), so that honest
    /// clients arriving together do not evict each other; 64 when nothing limits the workers.
    pub(crate) fn prepare(&mut self, limit: Option<usize>) -> Result<()> {
        for s in &self.stages {
            s.check()?;
        }
        let default = limit.map_or(64, |n| (n / 2).max(n.min(4)));
        lock(&self.pending).cap = self.max_pending.unwrap_or(default).max(1);
        Ok(())
    }

    /// Runs every stage on a new connection; true if the client may proceed to the handler.
    pub(crate) fn admit(&self, stream: &Stream, peer: &Addr, control: &Control) -> bool {
        if self.stages.is_empty() {
            return true;
        }
        let guard = self.enter(stream, control);
        let mut conn = Admitting {
            stream,
            deadline: deadline_after(self.timeout),
        };
        let mut result = Ok(());
        let mut failed = None;
        for stage in &self.stages {
            result = stage.run(&mut conn);
            if result.is_err() {
                failed = Some(stage.kind());
                break;
            }
        }
        let counters = &control.counters;
        let kept = guard.leave();
        match (result, failed) {
            _ if !kept => {
                limited!(
                    info,
                    "handshake with {peer} cut: too many unfinished handshakes"
                );
            }
            (Ok(()), _) => return true,
            (Err(e), _) if e.is_timeout() => {
                Counters::bump(&counters.handshake_timeouts);
                limited!(
                    warn,
                    "handshake with {peer} timed out after {:?}{}",
                    self.timeout,
                    e.detail().map(|d| format!(": {d}")).unwrap_or_default()
                );
            }
            (Err(e), Some(StageKind::Auth) | None) => {
                Counters::bump(&counters.auth_failures);
                limited!(warn, "authentication failed for {peer}: {e}");
            }
        }
        false
    }

    /// Registers an admission under the cap, cutting the oldest unfinished ones to make room.
    fn enter(&self, stream: &Stream, control: &Control) -> PendingGuard<'_> {
        let mut t = lock(&self.pending);
        while t.queue.len() >= t.cap {
            let Some(old) = t.queue.pop_front() else {
                break;
            };
            old.evicted.store(true, Ordering::Relaxed);
            let _ = old.stream.shutdown(Shutdown::Both);
            Counters::bump(&control.counters.handshake_evictions);
        }
        let entry = Arc::new(Pending {
            id: t.next_id,
            stream: stream.clone(),
            evicted: AtomicBool::new(false),
        });
        t.next_id += 1;
        t.queue.push_back(entry.clone());
        PendingGuard {
            pipeline: self,
            entry,
        }
    }
}

/// One unfinished admission, visible to newer ones that may need to evict it.
struct Pending {
    id: u64,
    stream: Stream,
    evicted: AtomicBool,
}

struct PendingTable {
    cap: usize,
    next_id: u64,
    queue: VecDeque<Arc<Pending>>,
}

/// Removes an admission from the pending table when it ends, however it ends.
struct PendingGuard<'a> {
    pipeline: &'a Pipeline,
    entry: Arc<Pending>,
}

impl PendingGuard<'_> {
    /// Leaves the table; false if a newer connection evicted this admission first (its socket
    /// is then shut down, so even a correct answer must not reach the handler).
    fn leave(&self) -> bool {
        let mut t = lock(&self.pipeline.pending);
        if let Some(i) = t.queue.iter().position(|p| p.id == self.entry.id) {
            t.queue.remove(i);
        }
        !self.entry.evicted.load(Ordering::Relaxed)
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}
