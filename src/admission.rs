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

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::auth::AuthStep;
use crate::control::{Control, SourceClaim, lock};
use crate::deadline::DeadlineIo;
use crate::log_limit::limited;
use crate::observe::{self, AdmissionFailure};
use crate::recorder::{Event, Outcome};
use crate::wait::deadline_after;
use crate::{Addr, Auth, Result, Stream};

/// Where a stage sits in the pipeline: stages run in the order these are declared. The PROXY
/// header and the TLS handshake, when they come, sit before `Auth`, in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum StageKind {
    /// The PROXY-protocol header (`proxy/stage.rs`): who the client really is.
    #[cfg(feature = "proxy-protocol")]
    Proxy,
    /// The TLS handshake (feature `tls`).
    #[cfg(feature = "tls")]
    Tls,
    /// The HMAC or `multiprocessing` handshake.
    Auth,
}

impl StageKind {
    /// The stage's name in the `tracing` events (a TLS stage must be named `tls`: the span's
    /// `tls` field is set when it admits a connection).
    pub(crate) const fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "proxy-protocol")]
            StageKind::Proxy => "proxy",
            #[cfg(feature = "tls")]
            StageKind::Tls => "tls",
            StageKind::Auth => "auth",
        }
    }
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

    /// Event mode: runs the stage up to its first wait for the peer, so that the connection
    /// can park until the answer is there instead of holding a worker while the client thinks
    /// (or stays silent). The default runs the whole stage, blocking.
    fn start(&self, conn: &mut Admitting<'_>) -> Result<Progress> {
        self.run(conn).map(|()| Progress::Done)
    }

    /// Takes the server's `verify_request` hook, to run it once the stage knows the real
    /// client (after a PROXY header); by default hands it back (the accept loop runs it).
    fn take_verify(&mut self, hook: VerifyHook) -> Option<VerifyHook> {
        Some(hook)
    }
}

/// A server's `verify_request` hook.
pub(crate) type VerifyHook = Box<dyn Fn(&Addr) -> bool + Send + Sync>;

/// What admission learnt of a connection, handed on to its request and kept until the
/// connection ends.
#[derive(Default)]
pub(crate) struct Learnt {
    /// The PROXY header the connection came with.
    #[cfg(feature = "proxy-protocol")]
    pub(crate) proxy: Option<Arc<crate::proxy::ProxyInfo>>,
    /// The connection's place under `max_per_source`, counted for the client a stage found
    /// (the accept loop counted nobody).
    #[cfg_attr(not(feature = "proxy-protocol"), allow(dead_code))]
    pub(crate) source: Option<SourceClaim>,
}

/// How far a stage got in event mode.
pub(crate) enum Progress {
    /// The stage is over: on to the next one.
    Done,
    /// The stage waits for the peer: park until `ready` holds of the bytes received (or the
    /// peer hangs up, or [`PEEK_MAX`] bytes are there), then run `then`.
    Wait(Resume),
}

/// Whether the bytes waiting (peeked, not read) make a whole answer.
pub(crate) type Ready = Box<dyn Fn(&[u8]) -> bool + Send>;

/// The rest of a stage.
pub(crate) type Rest = Box<dyn FnOnce(&mut Admitting<'_>) -> Result<Progress> + Send>;

/// The rest of a stage, after a wait for the peer.
pub(crate) struct Resume {
    /// Whether the answer is whole; `None`: any input will do, and the rest reads what there is
    /// without waiting (and parks again if it was not enough), so nothing is peeked first.
    pub(crate) ready: Option<Ready>,
    /// The rest of the stage, run once it is; `None`: the whole stage, [`Stage::run`] (a stage
    /// that only waits for its input to be whole before it reads it).
    pub(crate) then: Option<Rest>,
}

/// How long a connection has for the whole of admission, every stage together, unless
/// [`Builder::handshake_timeout`](crate::Builder::handshake_timeout) says otherwise.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The default cap on unfinished admissions in event mode.
pub(crate) const PARKED_CAP: usize = 1024;

/// The most a parked stage peeks at to see whether its answer is whole: more than any
/// handshake message (`multiprocessing`'s are at most 256 bytes plus a 4-byte length) or
/// PROXY header (16 + 1536 bytes).
pub(crate) const PEEK_MAX: usize = 2048;

/// A connection going through admission.
pub(crate) struct Admitting<'a> {
    stream: &'a Stream,
    deadline: Option<Instant>,
    #[cfg_attr(not(feature = "proxy-protocol"), allow(dead_code))]
    control: &'a Arc<Control>,
    /// The client as admission knows it: the socket's peer until a stage learns better (the
    /// real client behind a proxy).
    pub(crate) peer: Addr,
    /// What the stages learnt so far.
    pub(crate) learnt: Learnt,
}

impl<'a> Admitting<'a> {
    /// The server's shared state: counters, limits.
    #[cfg_attr(not(feature = "proxy-protocol"), allow(dead_code))]
    pub(crate) fn control(&self) -> &'a Arc<Control> {
        self.control
    }

    /// The connection's I/O, every call bounded by the one admission deadline.
    pub(crate) fn io(&self) -> DeadlineIo<'a, Stream> {
        let io = DeadlineIo::until(self.stream, self.deadline);
        // After a TLS handshake, the stages that follow speak inside TLS.
        #[cfg(feature = "tls")]
        let io = io.with_tls(self.stream.tls_session());
        io
    }
}

#[cfg(feature = "tls")]
impl Stage for crate::Tls {
    fn kind(&self) -> StageKind {
        StageKind::Tls
    }

    fn check(&self) -> Result<()> {
        crate::Tls::check(self)
    }

    fn run(&self, conn: &mut Admitting<'_>) -> Result<()> {
        self.handshake(conn.stream, conn.deadline)
    }

    fn start(&self, conn: &mut Admitting<'_>) -> Result<Progress> {
        tls_progress(self.accept()?, conn)
    }
}

/// A TLS handshake step as the pipeline's progress: parks until the client sends more (any
/// byte: a record's worth would be fewer wake-ups for a trickling client, but rustls may hold
/// part of a record already, so peeked bytes need not start one; and the step reads what
/// there is without waiting, so a wake-up with nothing costs it one failed read, as a peek
/// would).
#[cfg(feature = "tls")]
fn tls_progress(tls: rustls::ServerConnection, conn: &mut Admitting<'_>) -> Result<Progress> {
    Ok(
        match crate::Tls::handshake_now(tls, conn.stream, conn.deadline)? {
            None => Progress::Done,
            Some(tls) => Progress::Wait(Resume {
                ready: None,
                then: Some(Box::new(move |conn| tls_progress(tls, conn))),
            }),
        },
    )
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

    fn start(&self, conn: &mut Admitting<'_>) -> Result<Progress> {
        let step = self.begin(conn.io())?;
        Ok(auth_progress(self.clone(), step))
    }
}

/// An authentication step as the pipeline's progress: waits carry the rest of the handshake.
fn auth_progress(auth: Auth, step: AuthStep) -> Progress {
    match step {
        AuthStep::Done => Progress::Done,
        AuthStep::Wait(need, state) => Progress::Wait(Resume {
            ready: Some(Box::new(move |received| need.is_met(received))),
            then: Some(Box::new(move |conn| {
                let next = auth.resume(state, conn.io())?;
                Ok(auth_progress(auth, next))
            })),
        }),
    }
}

/// The stages of one server, with the deadline and the cap they share.
pub(crate) struct Pipeline {
    stages: Vec<Box<dyn Stage>>,
    timeout: Duration,
    max_pending: Option<usize>,
    pending: Arc<Mutex<PendingTable>>,
}

/// An event-mode admission parked until its peer answers: which stage waits, the rest of it,
/// and its place under the cap.
pub(crate) struct Parked {
    stage: usize,
    resume: Resume,
    deadline: Option<Instant>,
    guard: PendingGuard,
    /// What the stages before learnt, kept across the wait.
    peer: Addr,
    learnt: Learnt,
}

impl Parked {
    /// Whether the stage read all there was before it waited (a TLS handshake step): only a
    /// new signal on the connection can bring what it waits for, so there is nothing to look
    /// at until then.
    pub(crate) fn read_all(&self) -> bool {
        self.resume.ready.is_none()
    }
}

/// Where a parked admission goes on from: a stage, what to run of it, and what was learnt.
struct At {
    stage: usize,
    step: Step,
    peer: Addr,
    learnt: Learnt,
}

/// What to run of a stage.
enum Step {
    /// Its [`Stage::start`].
    Start,
    /// The rest it left after a wait.
    Rest(Rest),
    /// All of it ([`Stage::run`]), now that its input is whole.
    Run,
}

/// An admitted event-mode connection: the client as admission found it (the real one behind a
/// proxy) and what the stages learnt.
pub(crate) struct Admitted {
    pub(crate) peer: Addr,
    pub(crate) learnt: Learnt,
}

/// Where an event-mode admission stands.
pub(crate) enum Admission {
    /// Every stage passed: on to the handler.
    Admitted(Box<Admitted>),
    /// Waiting for the peer, on no thread.
    Parked(Parked),
    /// Refused (counted and logged): close the connection.
    Refused,
}

impl Default for Pipeline {
    fn default() -> Pipeline {
        Pipeline {
            stages: Vec::new(),
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending: None,
            pending: Arc::new(Mutex::new(PendingTable {
                cap: 1,
                cut_when_full: None,
                next_id: 0,
                queue: VecDeque::new(),
            })),
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

    /// The deadline of a whole admission: every stage of a connection together.
    pub(crate) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The most admissions that may be unfinished at once (unset: derived from the dispatch
    /// limit when the server is built).
    pub(crate) fn set_max_pending(&mut self, max: usize) {
        self.max_pending = Some(max);
    }

    /// Checks the stages and sizes the cap once the dispatch limit is known.
    ///
    /// A cap the user set is applied as it is. Otherwise, with a limit of `n` workers (pool) or
    /// connections (capped thread mode), handshakes may take any worker, and the oldest
    /// unfinished one is cut when a new connection takes the last free worker, once at least
    /// half of them (at least 4, or all of a smaller pool) are handshakes: silent connections
    /// then always leave a worker for the next client, and an honest client has as many newer
    /// connections as possible to answer within (`n` - 1 under a flood, where a fixed cap of
    /// `n / 2` gave it half that), while a busy server with a few handshakes cuts none. 64 when
    /// nothing limits the workers.
    ///
    /// In event mode (`parked`), an unfinished admission waits on no thread: only its socket
    /// is held, so the cap is [`PARKED_CAP`], and an honest client caught in a flood of silent
    /// connections has that many newer ones to answer within.
    pub(crate) fn prepare(&mut self, limit: Option<usize>, parked: bool) -> Result<()> {
        if self.timeout.is_zero() {
            return Err(crate::Error::config("handshake_timeout must be positive"));
        }
        if self.max_pending == Some(0) {
            return Err(crate::Error::config(
                "max_pending_handshakes must be at least 1",
            ));
        }
        for s in &self.stages {
            s.check()?;
        }
        let (cap, cut_when_full) = match (self.max_pending, limit) {
            (Some(max), _) => (max, None),
            (None, _) if parked => (PARKED_CAP, None),
            (None, Some(n)) => (n, Some((n / 2).max(n.min(4)))),
            (None, None) => (64, None),
        };
        let mut t = lock(&self.pending);
        t.cap = cap.max(1);
        t.cut_when_full = cut_when_full;
        Ok(())
    }

    /// Whether there is any stage to run.
    pub(crate) fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Hands `hook` (`verify_request`) to the stage that runs it; back if none does.
    pub(crate) fn take_verify(&mut self, hook: VerifyHook) -> Option<VerifyHook> {
        let mut hook = Some(hook);
        for s in &mut self.stages {
            hook = s.take_verify(hook?);
        }
        hook
    }

    /// Whether a stage learns who the client is (a PROXY header): the accept loop then leaves
    /// `verify_request` and the per-source count to it.
    pub(crate) fn learns_client(&self) -> bool {
        #[cfg(feature = "proxy-protocol")]
        return self.stages.iter().any(|s| s.kind() == StageKind::Proxy);
        #[cfg(not(feature = "proxy-protocol"))]
        false
    }

    /// Runs every stage on a new connection from `peer`; what they learnt if the client may
    /// proceed to the handler (`peer` is then the client they found), `None` if not.
    pub(crate) fn admit(
        &self,
        stream: &Stream,
        peer: &mut Addr,
        control: &Arc<Control>,
    ) -> Option<Learnt> {
        if self.stages.is_empty() {
            control.record(Event::Admission(Outcome::NoStages));
            return Some(Learnt::default());
        }
        let guard = self.enter(stream, control, None);
        let mut conn = Admitting {
            stream,
            deadline: deadline_after(self.timeout),
            control,
            peer: peer.clone(),
            learnt: Learnt::default(),
        };
        let mut result = Ok(());
        let mut failed = None;
        for stage in &self.stages {
            let started = Instant::now();
            result = stage.run(&mut conn);
            observe::stage_event(stage.kind().name(), result.is_ok(), started.elapsed());
            if result.is_err() {
                failed = Some(stage.kind());
                break;
            }
        }
        if !self.conclude(result, failed, guard.leave(), peer, control) {
            return None;
        }
        *peer = conn.peer;
        Some(conn.learnt)
    }

    /// Event mode: starts admitting a new connection, running the stages until one waits for
    /// the peer.
    pub(crate) fn begin(&self, stream: &Stream, peer: &Addr, control: &Arc<Control>) -> Admission {
        if self.stages.is_empty() {
            control.record(Event::Admission(Outcome::NoStages));
            return Admission::Admitted(Box::new(Admitted {
                peer: peer.clone(),
                learnt: Learnt::default(),
            }));
        }
        let deadline = deadline_after(self.timeout);
        let guard = self.enter(stream, control, deadline);
        let at = At {
            stage: 0,
            step: Step::Start,
            peer: peer.clone(),
            learnt: Learnt::default(),
        };
        self.proceed(at, deadline, guard, stream, control)
    }

    /// Event mode: the connection of a parked admission has input (or hung up, or was cut):
    /// parks it again if its answer is not whole yet, otherwise runs the rest of the stages.
    pub(crate) fn resume(
        &self,
        parked: Parked,
        stream: &Stream,
        control: &Arc<Control>,
    ) -> Admission {
        if parked.guard.is_evicted() {
            // Cut by the cap or the deadline sweep, which counted and logged it.
            return Admission::Refused;
        }
        if !peek_whole(stream, &parked) {
            return Admission::Parked(parked);
        }
        let Parked {
            stage,
            resume,
            deadline,
            guard,
            peer,
            learnt,
        } = parked;
        let step = match resume.then {
            Some(rest) => Step::Rest(rest),
            None => Step::Run,
        };
        let at = At {
            stage,
            step,
            peer,
            learnt,
        };
        self.proceed(at, deadline, guard, stream, control)
    }

    /// Runs stages from `at` on, until one waits or all are done.
    fn proceed(
        &self,
        at: At,
        deadline: Option<Instant>,
        guard: PendingGuard,
        stream: &Stream,
        control: &Arc<Control>,
    ) -> Admission {
        let At {
            mut stage,
            step,
            peer,
            learnt,
        } = at;
        let mut step = Some(step);
        let mut conn = Admitting {
            stream,
            deadline,
            control,
            peer,
            learnt,
        };
        let result = loop {
            let Some(s) = self.stages.get(stage) else {
                break Ok(());
            };
            let started = Instant::now();
            let progress = match step.take().unwrap_or(Step::Start) {
                Step::Start => s.start(&mut conn),
                Step::Rest(rest) => rest(&mut conn),
                Step::Run => s.run(&mut conn).map(|()| Progress::Done),
            };
            if !matches!(progress, Ok(Progress::Wait(_))) {
                // The stage's last step (the time it spent parked is not counted).
                observe::stage_event(s.kind().name(), progress.is_ok(), started.elapsed());
            }
            match progress {
                Ok(Progress::Done) => stage += 1,
                Ok(Progress::Wait(resume)) => {
                    if guard.is_evicted() {
                        break Ok(());
                    }
                    return Admission::Parked(Parked {
                        stage,
                        resume,
                        deadline,
                        guard,
                        peer: conn.peer,
                        learnt: conn.learnt,
                    });
                }
                Err(e) => break Err(e),
            }
        };
        let failed = self.stages.get(stage).map(|s| s.kind());
        match self.conclude(result, failed, guard.leave(), &conn.peer, control) {
            true => Admission::Admitted(Box::new(Admitted {
                peer: conn.peer,
                learnt: conn.learnt,
            })),
            false => Admission::Refused,
        }
    }

    /// Event mode: cuts the parked admissions past their deadline (no read is blocked on them
    /// to time out); called every few milliseconds by the event loop.
    pub(crate) fn expire(&self, control: &Control) {
        let now = Instant::now();
        let mut t = lock(&self.pending);
        while let Some(at) = t
            .queue
            .iter()
            .position(|p| p.deadline.is_some_and(|d| d <= now))
        {
            let Some(old) = t.queue.remove(at) else {
                break;
            };
            old.evicted.store(true, Ordering::Relaxed);
            // Counted before the client can see the close.
            control.record(Event::AdmissionCut(AdmissionFailure::Timeout));
            let _ = old.stream.shutdown(Shutdown::Both);
            let peer = old
                .stream
                .peer_addr()
                .map_or_else(|_| "a peer that has gone".to_owned(), |a| a.to_string());
            limited!(
                warn,
                "handshake with {peer} timed out after {:?}",
                self.timeout
            );
        }
    }

    /// Counts and logs how an admission ended; true if the client may proceed.
    fn conclude(
        &self,
        result: Result<()>,
        failed: Option<StageKind>,
        kept: bool,
        peer: &Addr,
        control: &Control,
    ) -> bool {
        match (result, failed) {
            _ if !kept => {
                // Counted by the eviction.
                control.record(Event::Admission(Outcome::Cut(AdmissionFailure::Cap)));
                limited!(
                    info,
                    "handshake with {peer} cut: too many unfinished handshakes"
                );
            }
            (Ok(()), _) => {
                let tls = self.stages.iter().any(|s| s.kind().name() == "tls");
                control.record(Event::Admission(Outcome::Admitted { tls }));
                return true;
            }
            // A client the header named, refused by `verify_request` or `max_per_source`:
            // counted by the stage under that reason, once, and not as a PROXY failure.
            #[cfg(feature = "proxy-protocol")]
            (Err(e), Some(StageKind::Proxy)) if e.is_counted() => {
                control.record(Event::Admission(Outcome::Refused));
                limited!(info, "{e}; closing the connection");
            }
            // Counted by the stage, by reason (and in all, for the metrics).
            #[cfg(feature = "proxy-protocol")]
            (Err(e), Some(StageKind::Proxy)) => {
                control.record(Event::Admission(Outcome::Failed(AdmissionFailure::Proxy)));
                // The error names the peer.
                limited!(warn, "PROXY stage refused a connection: {e}");
            }
            (Err(e), _) if e.is_timeout() => {
                control.record(Event::Admission(Outcome::Failed(AdmissionFailure::Timeout)));
                limited!(
                    warn,
                    "handshake with {peer} timed out after {:?}{}",
                    self.timeout,
                    e.detail().map(|d| format!(": {d}")).unwrap_or_default()
                );
            }
            #[cfg(feature = "tls")]
            (Err(e), Some(StageKind::Tls)) => {
                control.record(Event::Admission(Outcome::Failed(AdmissionFailure::Tls)));
                limited!(warn, "TLS handshake with {peer} failed: {e}");
            }
            (Err(e), Some(StageKind::Auth) | None) => {
                control.record(Event::Admission(Outcome::Failed(AdmissionFailure::Hmac)));
                limited!(warn, "authentication failed for {peer}: {e}");
            }
        }
        false
    }

    /// Registers an admission under the cap, cutting the oldest unfinished ones to make room.
    fn enter(&self, stream: &Stream, control: &Control, deadline: Option<Instant>) -> PendingGuard {
        // This connection holds its slot already: none free means it took the last one.
        let took_last_slot = control.limits.free_slots() == Some(0);
        let mut t = lock(&self.pending);
        if took_last_slot && t.cut_when_full.is_some_and(|at| t.queue.len() >= at) {
            t.evict_oldest(control, false);
        }
        while t.queue.len() >= t.cap {
            if !t.evict_oldest(control, true) {
                break;
            }
        }
        let entry = Arc::new(Pending {
            id: t.next_id,
            stream: stream.clone(),
            evicted: AtomicBool::new(false),
            deadline,
        });
        t.next_id += 1;
        t.queue.push_back(entry.clone());
        PendingGuard {
            table: self.pending.clone(),
            entry,
        }
    }
}

/// Whether the answer a parked stage waits for is whole: what has arrived on `stream` (up to
/// [`PEEK_MAX`] bytes, decrypted after a TLS handshake), looked at without being consumed.
/// End of file (even after part of the message) or a socket error count as whole, so that the
/// stage reads and reports them.
fn peek_whole(stream: &Stream, parked: &Parked) -> bool {
    let Some(ready) = &parked.resume.ready else {
        return true;
    };
    #[cfg(feature = "tls")]
    if let Some(tls) = stream.tls_session() {
        let io = DeadlineIo::until(stream, parked.deadline).reads_now();
        return tls.peek_now(&io, PEEK_MAX, |plain| ready(plain));
    }
    let mut peeked = [0u8; PEEK_MAX];
    match rustix::net::recv(
        stream,
        &mut peeked[..],
        rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
    ) {
        // A peer that hung up after part of its message will send no more: whole too.
        Ok((n, _)) => n == 0 || n == PEEK_MAX || ready(&peeked[..n]) || !has_input(stream),
        Err(rustix::io::Errno::AGAIN) => false,
        // Reset, say: let the stage read the error and report it as it would.
        Err(_) => true,
    }
}

/// Whether the client has sent bytes that wait to be read on `stream` (its answer, say), and
/// has not hung up: a connection at end of file is as good as gone and may be cut.
#[cfg(target_os = "linux")]
fn has_input(stream: &Stream) -> bool {
    let mut fds = [PollFd::new(stream, PollFlags::IN | PollFlags::RDHUP)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(n) if n > 0)
        && !fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
}

/// Whether the client has sent bytes that wait to be read (see the Linux version). Without
/// `POLLRDHUP`, a one-byte peek tells waiting bytes from end of file.
#[cfg(not(target_os = "linux"))]
fn has_input(stream: &Stream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        rustix::net::recv(
            stream,
            &mut byte[..],
            rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
        ),
        Ok((n, _)) if n > 0
    )
}

/// One unfinished admission, visible to newer ones that may need to evict it.
struct Pending {
    id: u64,
    stream: Stream,
    evicted: AtomicBool,
    /// When a parked (event-mode) admission times out; `None` for one that runs on a worker,
    /// whose reads carry the deadline themselves.
    deadline: Option<Instant>,
}

struct PendingTable {
    cap: usize,
    /// With `Some(at)`: when a connection takes the last free slot and at least `at`
    /// admissions are unfinished, the oldest is cut, so that a slot frees for the next client.
    cut_when_full: Option<usize>,
    next_id: u64,
    queue: VecDeque<Arc<Pending>>,
}

impl PendingTable {
    /// Cuts the oldest unfinished admission whose client has not answered yet; false if there
    /// is none. A client whose answer is already waiting to be read is spared: under a flood,
    /// its worker may simply not have run yet, and cutting it would punish the one client that
    /// did everything right. Only when every unfinished admission has answered, and the cap
    /// must hold, is the oldest of them cut.
    fn evict_oldest(&mut self, control: &Control, must: bool) -> bool {
        let silent = self.queue.iter().position(|p| !has_input(&p.stream));
        let Some(at) = silent.or(if must { Some(0) } else { None }) else {
            return false;
        };
        let Some(old) = self.queue.remove(at) else {
            return false;
        };
        old.evicted.store(true, Ordering::Relaxed);
        let _ = old.stream.shutdown(Shutdown::Both);
        control.record(Event::AdmissionCut(AdmissionFailure::Cap));
        true
    }
}

/// Removes an admission from the pending table when it ends, however it ends.
struct PendingGuard {
    table: Arc<Mutex<PendingTable>>,
    entry: Arc<Pending>,
}

impl PendingGuard {
    /// Whether a newer connection (or the deadline sweep) has cut this admission.
    fn is_evicted(&self) -> bool {
        self.entry.evicted.load(Ordering::Relaxed)
    }

    /// Leaves the table; false if a newer connection evicted this admission first (its socket
    /// is then shut down, so even a correct answer must not reach the handler).
    fn leave(&self) -> bool {
        let mut t = lock(&self.table);
        if let Some(i) = t.queue.iter().position(|p| p.id == self.entry.id) {
            t.queue.remove(i);
        }
        !self.entry.evicted.load(Ordering::Relaxed)
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// A server-side stream and its client, over loopback.
    fn connection(listener: &TcpListener) -> (Stream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (Stream::tcp(server, false), client)
    }

    fn cut(p: &PendingGuard) -> bool {
        p.entry.evicted.load(Ordering::Relaxed)
    }

    fn setup(workers: usize, max_pending: Option<usize>) -> (Pipeline, Arc<Control>, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = Addr::Inet(listener.local_addr().unwrap());
        let control = Control::new(local, Some(workers), None, None).unwrap();
        let mut pipeline = Pipeline::default();
        if let Some(max) = max_pending {
            pipeline.set_max_pending(max);
        }
        pipeline.prepare(Some(workers), false).unwrap();
        (pipeline, control, listener)
    }

    #[test]
    fn a_pool_with_free_workers_cuts_no_handshake() {
        // 8 workers: the old fixed cap (4) cut the oldest at the fifth handshake.
        let (pipeline, control, listener) = setup(8, None);
        let conns: Vec<_> = (0..7).map(|_| connection(&listener)).collect();
        let mut permits = Vec::new();
        let mut pending = Vec::new();
        for (s, _) in &conns {
            permits.push(control.limits.try_acquire().unwrap());
            pending.push(pipeline.enter(s, &control, None));
        }
        assert!(
            pending.iter().all(|p| !cut(p)),
            "a handshake was cut with a worker free"
        );
    }

    #[test]
    fn taking_the_last_worker_cuts_the_oldest_silent_handshake() {
        let (pipeline, control, listener) = setup(8, None);
        let conns: Vec<_> = (0..8).map(|_| connection(&listener)).collect();
        let mut permits = Vec::new();
        let mut pending = Vec::new();
        for (s, _) in &conns {
            permits.push(control.limits.try_acquire().unwrap());
            pending.push(pipeline.enter(s, &control, None));
        }
        let cut_now: Vec<bool> = pending.iter().map(cut).collect();
        assert_eq!(
            cut_now,
            [true, false, false, false, false, false, false, false]
        );
    }

    #[test]
    fn a_client_that_has_answered_is_spared_for_a_silent_one() {
        // A cap of 2 set by the user: the third handshake cuts one, and not the client whose
        // answer already waits to be read (its worker just has not run yet).
        let (pipeline, control, listener) = setup(8, Some(2));
        let (answered, mut answering_client) = connection(&listener);
        let (silent, _silent_client) = connection(&listener);
        let (third, _third_client) = connection(&listener);
        let first = pipeline.enter(&answered, &control, None);
        let second = pipeline.enter(&silent, &control, None);
        answering_client.write_all(b"answer").unwrap();
        assert!(
            (0..200).any(|_| {
                std::thread::sleep(Duration::from_millis(5));
                has_input(&answered)
            }),
            "the answer never arrived"
        );
        let newest = pipeline.enter(&third, &control, None);
        assert!(!cut(&first), "the client that answered was cut");
        assert!(cut(&second) && !cut(&newest));
    }

    #[test]
    fn a_client_that_hung_up_is_cut_before_one_that_is_still_answering() {
        let (pipeline, control, listener) = setup(8, Some(2));
        let (gone, gone_client) = connection(&listener);
        let (answering, _answering_client) = connection(&listener);
        let (third, _third_client) = connection(&listener);
        let first = pipeline.enter(&gone, &control, None);
        let second = pipeline.enter(&answering, &control, None);
        drop(gone_client);
        std::thread::sleep(Duration::from_millis(50));
        let newest = pipeline.enter(&third, &control, None);
        assert!(cut(&first), "the connection at end of file was spared");
        assert!(!cut(&second) && !cut(&newest));
    }

    #[test]
    fn the_cut_threshold_is_half_the_pool_but_at_least_four_and_none_without_a_limit() {
        let threshold = |limit: Option<usize>| {
            let mut pipeline = Pipeline::default();
            pipeline.prepare(limit, false).unwrap();
            let t = lock(&pipeline.pending);
            (t.cap, t.cut_when_full)
        };
        assert_eq!(threshold(Some(16)), (16, Some(8)));
        assert_eq!(threshold(Some(8)), (8, Some(4)));
        assert_eq!(threshold(Some(5)), (5, Some(4)));
        assert_eq!(threshold(Some(3)), (3, Some(3)));
        assert_eq!(threshold(None), (64, None));
    }

    #[test]
    fn the_deadline_defaults_to_five_seconds_and_zero_limits_are_refused() {
        let pipeline = Pipeline::default();
        assert_eq!(pipeline.timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(DEFAULT_HANDSHAKE_TIMEOUT, Duration::from_secs(5));
        let mut zero = Pipeline::default();
        zero.set_timeout(Duration::ZERO);
        assert!(zero.prepare(Some(4), false).unwrap_err().is_config());
        let mut none = Pipeline::default();
        none.set_max_pending(0);
        assert!(none.prepare(None, true).unwrap_err().is_config());
        // A cap the user set holds whatever the mode and the dispatch limit.
        let mut seven = Pipeline::default();
        seven.set_max_pending(7);
        seven.prepare(Some(64), true).unwrap();
        assert_eq!(lock(&seven.pending).cap, 7);
    }

    #[test]
    fn a_stage_of_a_kind_already_there_replaces_it() {
        let mut pipeline = Pipeline::default();
        pipeline.add(Box::new(Auth::hmac(b"first".to_vec())));
        pipeline.add(Box::new(Auth::hmac(b"second".to_vec())));
        assert_eq!(pipeline.stages.len(), 1);
        assert!(pipeline.stages.iter().all(|s| s.kind() == StageKind::Auth));
    }
}
