//! Prefork: a supervisor process holds the listeners and keeps N worker processes serving
//! them (Python's `ForkingMixIn` row, done the way Apache prefork, gunicorn and nginx do it),
//! and replaces its own binary without dropping a connection (SIGUSR2).
//!
//! The supervisor binds (or inherits) once and never serves. Each worker is the same program
//! started again (not `fork()`ed from a threaded process, which is unsound), with the listeners
//! passed the systemd way (`LISTEN_FDS`, descriptors from 3) and adopted through the same path
//! as socket activation ([`Builder::adopt`](crate::Builder)). All workers accept from one
//! queue, so a worker that exits loses nothing: what it had not accepted, another accepts.
//!
//! A program serves both roles: [`Worker::from_env`] says whether this process is a worker.
//!
//! ```no_run
//! use std::time::Duration;
//! use socketserver::prefork::{Prefork, Worker};
//! use socketserver::{Inherited, TcpServer, handler_fn};
//!
//! fn main() -> socketserver::Result<()> {
//!     let grace = Duration::from_secs(5);
//!     if let Some(worker) = Worker::from_env() {
//!         let server = TcpServer::builder(|| handler_fn(|_req| Ok(())))
//!             .adopt(Inherited::index(0))?;
//!         worker.serve(&server, grace)?;
//!         return Ok(());
//!     }
//!     let summary = Prefork::new(4)
//!         .grace(grace)
//!         .listen_tcp("127.0.0.1:9000")?
//!         .run()?;
//!     eprintln!("{summary}");
//!     Ok(())
//! }
//! ```
//!
//! # Signals to the supervisor
//!
//! * SIGTERM, SIGINT: every worker drains (stops accepting, lets in-flight requests finish for
//!   up to [`grace`](Prefork::grace)); then [`run`](Prefork::run) returns a [`Summary`] of each
//!   worker's [`DrainReport`] and [`Stats`]. A second one cuts what is still running.
//! * SIGHUP: rolling restart, one worker at a time; each new worker is ready before an old one
//!   starts draining.
//! * SIGTTIN / SIGTTOU: one worker more / less.
//! * SIGUSR2: zero-downtime upgrade: the program at the path this one was started from (the new
//!   binary) is started as a new supervisor with the listeners passed on; once it reports ready
//!   (all its workers serving), this supervisor drains its workers and returns, its summary
//!   saying [`upgraded`](Summary::upgraded). If the new one exits or is not ready within
//!   [`ready_timeout`](Prefork::ready_timeout), this one keeps serving and logs why. The new
//!   supervisor writes the [`pid_file`](Prefork::pid_file) when ready; the old one removes it
//!   only if it still names the old one. A Unix socket file is handed over with its socket.
//!
//! Workers run in their own process group, so a terminal's Ctrl-C reaches the supervisor only
//! (which then drains them once), and they get SIGTERM if the supervisor dies.
//!
//! A worker that exits unexpectedly is restarted at once; one that exits before it ever became
//! ready counts toward a crash loop, which is logged as an error and retried with a growing
//! delay (up to 10 s) rather than spun.
//!
//! Each worker process has its own memory: state a handler keeps (a cache, a store) is per
//! worker, not shared.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::ToSocketAddrs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::pipe::{PipeFlags, pipe_with};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR2};
use socket2::Type;

use crate::systemd::{NOTIFY_FD_VAR, Notifier};
use crate::transport::Transport;
use crate::transport::socket::{OwnedPath, SocketOptions, bind_inet, bind_unix};
use crate::wait::poll_until;
use crate::{Addr, DrainReport, Error, Result, Server, Stats};

/// Marks a worker process: its id and its request budget.
const WORKER_VAR: &str = "SOCKETSERVER_WORKER";
/// Set in a new supervisor started by an upgrade: the old supervisor's pid.
const UPGRADE_VAR: &str = "SOCKETSERVER_UPGRADE_FROM";
/// Descriptors are moved at least this high before being placed at 3, 4, ... in the child.
const HIGH_FD: i32 = 100;
/// How long a draining worker may take beyond the grace period before it is killed.
const KILL_AFTER: Duration = Duration::from_secs(5);
/// The longest delay between restarts of a crash-looping worker.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A prefork supervisor's configuration; [`run`](Self::run) starts it.
pub struct Prefork {
    workers: usize,
    max_requests: Option<(u64, u64)>,
    grace: Duration,
    ready_timeout: Duration,
    pid_file: Option<PathBuf>,
    listeners: Vec<Held>,
}

/// A listener the supervisor holds for its workers.
struct Held {
    fd: OwnedFd,
    name: String,
    addr: Addr,
    /// A Unix socket file this supervisor made: removed when it exits, unless handed over.
    path: Option<OwnedPath>,
}

impl Prefork {
    /// A supervisor of `workers` worker processes (at least 1). Give it listeners with
    /// [`listen_tcp`](Self::listen_tcp), [`listen_unix`](Self::listen_unix) or
    /// [`inherit`](Self::inherit).
    pub fn new(workers: usize) -> Prefork {
        Prefork {
            workers: workers.max(1),
            max_requests: None,
            grace: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(30),
            pid_file: None,
            listeners: Vec::new(),
        }
    }

    /// Binds a listening TCP socket (port 0 picks a free one; see [`addrs`](Self::addrs)).
    pub fn listen_tcp(mut self, addr: impl ToSocketAddrs + fmt::Debug) -> Result<Prefork> {
        let resolved = addr
            .to_socket_addrs()
            .map_err(|e| Error::unresolved(format!("{addr:?}"), e))?
            .next()
            .ok_or_else(|| Error::config(format!("{addr:?} resolves to no address")))?;
        let sock = bind_inet(resolved, Type::STREAM, &SocketOptions::default())?;
        let at = sock
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map_or(Addr::Inet(resolved), Addr::Inet);
        self.hold(sock.into(), at, None);
        Ok(self)
    }

    /// Binds a listening Unix stream socket on `path`, removed when the supervisor exits
    /// (unless an upgrade handed it over).
    pub fn listen_unix(mut self, path: impl AsRef<Path>) -> Result<Prefork> {
        let (sock, owned) = bind_unix(path.as_ref(), Type::STREAM, &SocketOptions::default())?;
        let at = Addr::Unix(Some(path.as_ref().to_path_buf()));
        self.hold(sock.into(), at, Some(owned));
        Ok(self)
    }

    /// Takes every socket this process inherited (`LISTEN_FDS`): from systemd socket activation,
    /// or from the old supervisor of an upgrade. After an upgrade this supervisor owns the Unix
    /// socket files it inherited and removes them when it exits; those of systemd are left to
    /// systemd.
    pub fn inherit(mut self) -> Result<Prefork> {
        // From an upgrade, the socket files are ours now (the old supervisor let go of them);
        // from systemd, they are the manager's.
        let upgrade = std::env::var_os(UPGRADE_VAR).is_some();
        for (fd, name) in crate::systemd::take_all() {
            let addr = sock_addr(&fd);
            let path = match &addr {
                Addr::Unix(Some(p)) if upgrade => OwnedPath::take_over(p).ok(),
                _ => None,
            };
            self.listeners.push(Held {
                fd,
                name,
                addr,
                path,
            });
        }
        if self.listeners.is_empty() {
            return Err(Error::not_inherited("this process inherited no socket"));
        }
        Ok(self)
    }

    fn hold(&mut self, fd: OwnedFd, addr: Addr, path: Option<OwnedPath>) {
        let name = match self.listeners.len() {
            0 => "main".to_owned(),
            n => format!("listener{n}"),
        };
        self.listeners.push(Held {
            fd,
            name,
            addr,
            path,
        });
    }

    /// The addresses of the listeners, in the order workers see them (`Inherited::index`).
    pub fn addrs(&self) -> Vec<Addr> {
        self.listeners.iter().map(|l| l.addr.clone()).collect()
    }

    /// gunicorn's `max_requests`: a worker drains and is replaced after accepting `n`
    /// connections, plus a random 0..=`jitter` so that workers do not all restart at once.
    /// Contains slow leaks in handlers. Default: never.
    pub fn max_requests_per_worker(mut self, n: u64, jitter: u64) -> Prefork {
        self.max_requests = (n > 0).then_some((n, jitter));
        self
    }

    /// How long a draining worker may let in-flight requests run (default 5 s); each worker
    /// is given the same with [`Worker::serve`].
    pub fn grace(mut self, grace: Duration) -> Prefork {
        self.grace = grace;
        self
    }

    /// How long a new worker, or a new supervisor in an upgrade, may take to report ready
    /// (default 30 s) before it counts as failed.
    pub fn ready_timeout(mut self, timeout: Duration) -> Prefork {
        self.ready_timeout = timeout;
        self
    }

    /// Writes the supervisor's pid to `path` once its workers are ready; removed when it
    /// exits, unless a new supervisor has taken it over.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Prefork {
        self.pid_file = Some(path.into());
        self
    }

    /// Starts the workers and supervises them until SIGTERM or SIGINT (or a completed
    /// upgrade); then returns what they reported. Fails if the signals cannot be set up or no
    /// listener was given; a worker that fails to start is retried, not returned.
    pub fn run(self) -> Result<Summary> {
        if self.listeners.is_empty() {
            return Err(Error::config("prefork: no listener to serve"));
        }
        let signals = Signals::install().map_err(Error::from)?;
        let mut sup = Supervisor::new(self)?;
        if let Ok(from) = std::env::var(UPGRADE_VAR) {
            log::info!("taking over from supervisor pid {from}");
        }
        sup.run(&signals);
        Ok(sup.finish())
    }
}

/// The address a socket is bound to.
fn sock_addr(fd: &OwnedFd) -> Addr {
    let sa = socket2::SockRef::from(fd).local_addr().ok();
    match sa {
        Some(a) if a.as_socket().is_some() => Addr::Inet(a.as_socket().expect("checked")),
        Some(a) => Addr::Unix(a.as_pathname().map(Path::to_path_buf)),
        None => Addr::Unix(None),
    }
}

/// What one worker reported when it exited.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// The worker's number (1 for the first started, counting up).
    pub id: u64,
    /// Its process id.
    pub pid: u32,
    /// How its drain went.
    pub drain: DrainReport,
    /// Its counters.
    pub stats: Stats,
}

/// What a supervisor's workers did, returned by [`Prefork::run`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// Every worker that reported on exit, in the order they exited.
    pub workers: Vec<WorkerReport>,
    /// Their drain reports, summed.
    pub drain: DrainReport,
    /// Their counters, summed (`active` is what was still running at their ends).
    pub stats: Stats,
    /// Worker processes started, restarts included.
    pub workers_started: u64,
    /// Workers that exited without being asked to (crashes, kills).
    pub worker_crashes: u64,
    /// A new supervisor took over (SIGUSR2) and this one stepped down.
    pub upgraded: bool,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} worker(s) started, {} crashed, {} reported: {} accepted, {} handler errors, {} \
             panics; last drains: {} finished, {} cut{}",
            self.workers_started,
            self.worker_crashes,
            self.workers.len(),
            self.stats.accepted,
            self.stats.handler_errors,
            self.stats.panics,
            self.drain.finished,
            self.drain.cut,
            if self.upgraded {
                "; handed over to a new supervisor"
            } else {
                ""
            }
        )
    }
}

/// This process as a prefork worker: made from the environment the supervisor set.
#[derive(Debug)]
pub struct Worker {
    id: u64,
    max_requests: Option<u64>,
}

impl Worker {
    /// `Some` if a prefork supervisor started this process as one of its workers (a process
    /// the worker starts in turn inherits the variables, but not the `LISTEN_PID` that names
    /// the worker, and is not one).
    pub fn from_env() -> Option<Worker> {
        if !crate::systemd::listen_pid_is_me() {
            return None;
        }
        let v = std::env::var(WORKER_VAR).ok()?;
        let mut parts = v.split(',');
        let id = parts.next()?.parse().ok()?;
        let max_requests = parts.next().and_then(|m| m.parse().ok());
        Some(Worker { id, max_requests })
    }

    /// The worker's number (1 for the first the supervisor started).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Serves `server` (built with `adopt`) until the supervisor says stop (SIGTERM) or the
    /// worker has accepted its share of requests, then drains for up to `grace` and reports
    /// to the supervisor: ready when serving starts, stopping when the drain begins, and its
    /// [`DrainReport`] and [`Stats`] at the end.
    pub fn serve<T: Transport>(&self, server: &Server<T>, grace: Duration) -> Result<DrainReport> {
        if !server.enable_readiness() {
            log::warn!("worker {}: no supervisor to report to", self.id);
        }
        let control = server.handle().control;
        if let Some(n) = self.max_requests {
            control.recorder.set_accept_limit(n);
        }
        let report = server.serve_until_signal(grace)?;
        let stats = server.stats();
        if let Some(max) = self.max_requests
            && stats.accepted >= max
        {
            log::info!(
                "worker {} served {} connections (max_requests_per_worker): replaced",
                self.id,
                stats.accepted
            );
        }
        if let Some(n) = Notifier::get() {
            n.send(&format!(
                "X-DRAIN={} {} {}\nX-STATS={}",
                report.finished,
                report.cut,
                report.still_running,
                stats_line(&stats)
            ));
        }
        Ok(report)
    }
}

/// The line a worker reports of its [`Stats`]: all of them, histogram and reasons included.
fn stats_line(s: &Stats) -> String {
    let words: Vec<String> = s.words().iter().map(u64::to_string).collect();
    words.join(" ")
}

fn parse_stats(line: &str) -> Stats {
    Stats::from_words(line.split(' ').map(|n| n.parse::<u64>().unwrap_or(0)))
}

fn add_stats(a: &mut Stats, b: &Stats) {
    a.add(b);
}

/// The supervisor's signals, each routed to a pipe of its own.
struct Signals {
    pipes: Vec<(i32, OwnedFd, signal_hook::SigId)>,
}

impl Signals {
    fn install() -> io::Result<Signals> {
        let mut pipes = Vec::new();
        for sig in [SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR2, SIGCHLD] {
            let (rx, tx) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
            let id = signal_hook::low_level::pipe::register(sig, tx)?;
            pipes.push((sig, rx, id));
        }
        Ok(Signals { pipes })
    }

    /// The signals that arrived since the last call, in a fixed order.
    fn take(&self) -> Vec<i32> {
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        for (sig, rx, _) in &self.pipes {
            while let Ok(n) = rustix::io::read(rx, &mut buf) {
                if n == 0 {
                    break;
                }
                got.extend(std::iter::repeat_n(*sig, n));
            }
        }
        got
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for (_, _, id) in self.pipes.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Starting,
    Ready,
    Stopping,
}

struct Slot {
    id: u64,
    child: Child,
    chan: UnixDatagram,
    state: State,
    since: Instant,
    /// The old worker this one replaces in a rolling restart, stopped once this one is ready.
    replaces: Option<u64>,
    drain: Option<DrainReport>,
    stats: Option<Stats>,
}

struct Upgrade {
    child: Child,
    chan: UnixDatagram,
    since: Instant,
}

struct Supervisor {
    cfg: Prefork,
    /// The program to run as a worker: the binary running now, even if replaced on disk.
    worker_exe: PathBuf,
    /// The program to run as a new supervisor: whatever is at our path now.
    upgrade_exe: PathBuf,
    args: Vec<OsString>,
    target: usize,
    slots: Vec<Slot>,
    next_id: u64,
    rolling: VecDeque<u64>,
    failures: u32,
    next_spawn: Instant,
    upgrade: Option<Upgrade>,
    stopping: bool,
    announced: bool,
    summary: Summary,
}

impl Supervisor {
    fn new(cfg: Prefork) -> Result<Supervisor> {
        let upgrade_exe = std::env::current_exe().map_err(Error::from)?;
        Ok(Supervisor {
            target: cfg.workers,
            cfg,
            worker_exe: PathBuf::from(format!("/proc/{}/exe", std::process::id())),
            upgrade_exe,
            args: std::env::args_os().skip(1).collect(),
            slots: Vec::new(),
            next_id: 1,
            rolling: VecDeque::new(),
            failures: 0,
            next_spawn: Instant::now(),
            upgrade: None,
            stopping: false,
            announced: false,
            summary: Summary::default(),
        })
    }

    fn active(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state != State::Stopping)
            .count()
    }

    fn run(&mut self, signals: &Signals) {
        loop {
            if !self.stopping {
                self.keep_workers();
            } else if self.slots.is_empty() {
                return;
            }
            self.wait(signals);
            for sig in signals.take() {
                self.on_signal(sig);
            }
            self.read_messages();
            self.reap();
            self.check_upgrade();
            self.check_timeouts();
        }
    }

    /// Polls the signal pipes and the workers' channels, at most 100 ms.
    fn wait(&self, signals: &Signals) {
        let mut fds: Vec<PollFd<'_>> = signals
            .pipes
            .iter()
            .map(|(_, rx, _)| PollFd::new(rx, PollFlags::IN))
            .chain(
                self.slots
                    .iter()
                    .map(|s| PollFd::new(&s.chan, PollFlags::IN)),
            )
            .chain(
                self.upgrade
                    .iter()
                    .map(|u| PollFd::new(&u.chan, PollFlags::IN)),
            )
            .collect();
        let _ = poll_until(&mut fds, Some(Instant::now() + Duration::from_millis(100)));
    }

    fn on_signal(&mut self, sig: i32) {
        match sig {
            SIGTERM | SIGINT if self.stopping => {
                log::warn!("signal {sig} again: cutting what the workers still run");
                for s in &self.slots {
                    kill(&s.child, libc::SIGTERM);
                }
            }
            SIGTERM | SIGINT => {
                log::info!(
                    "signal {sig}: draining {} worker(s) for up to {:?}",
                    self.slots.len(),
                    self.cfg.grace
                );
                self.stop_all();
            }
            SIGHUP if !self.stopping => {
                self.rolling = self
                    .slots
                    .iter()
                    .filter(|s| s.state != State::Stopping)
                    .map(|s| s.id)
                    .collect();
                log::info!(
                    "SIGHUP: restarting {} worker(s) one at a time",
                    self.rolling.len()
                );
            }
            SIGTTIN if !self.stopping => {
                self.target += 1;
                log::info!("SIGTTIN: {} worker(s)", self.target);
            }
            SIGTTOU if !self.stopping => {
                self.target = self.target.saturating_sub(1).max(1);
                log::info!("SIGTTOU: {} worker(s)", self.target);
            }
            SIGUSR2 if !self.stopping => self.start_upgrade(),
            _ => {}
        }
    }

    fn stop_all(&mut self) {
        self.stopping = true;
        self.rolling.clear();
        if let Some(mut u) = self.upgrade.take() {
            log::warn!("upgrade abandoned: stopping");
            let _ = u.child.kill();
            let _ = u.child.wait();
        }
        for s in &mut self.slots {
            if s.state != State::Stopping {
                stop(s);
            }
        }
    }

    /// Starts workers up to the target, one replacement of a rolling restart at a time, and
    /// stops workers beyond the target.
    fn keep_workers(&mut self) {
        let replacing = self
            .slots
            .iter()
            .any(|s| s.state == State::Starting && s.replaces.is_some());
        if Instant::now() >= self.next_spawn {
            while self.active() < self.target {
                if !self.spawn(None) {
                    return;
                }
            }
            let settled = self.slots.iter().all(|s| s.state != State::Starting);
            if settled && !replacing {
                while let Some(old) = self.rolling.pop_front() {
                    if self
                        .slots
                        .iter()
                        .any(|s| s.id == old && s.state != State::Stopping)
                    {
                        if !self.spawn(Some(old)) {
                            self.rolling.push_front(old);
                        }
                        break;
                    }
                }
            }
        }
        let extra = self
            .active()
            .saturating_sub(self.target + usize::from(replacing));
        if extra > 0 && self.rolling.is_empty() {
            let mut ready: Vec<&mut Slot> = self
                .slots
                .iter_mut()
                .filter(|s| s.state == State::Ready)
                .collect();
            ready.sort_by_key(|s| std::cmp::Reverse(s.id));
            for s in ready.into_iter().take(extra) {
                log::info!("stopping worker {} (pid {})", s.id, s.child.id());
                stop(s);
            }
        }
    }

    /// Starts one worker; false (and a later retry) if it could not be started.
    fn spawn(&mut self, replaces: Option<u64>) -> bool {
        let id = self.next_id;
        let mut env = vec![(WORKER_VAR.to_owned(), id.to_string())];
        if let Some((n, jitter)) = self.cfg.max_requests {
            env[0].1 = format!("{id},{}", n + jitter_for(id, jitter));
        }
        match spawn_with_fds(
            &self.worker_exe,
            &self.args,
            &self.cfg.listeners,
            &env,
            true,
        ) {
            Ok((child, chan)) => {
                self.next_id += 1;
                self.summary.workers_started += 1;
                log::info!("started worker {id} (pid {})", child.id());
                self.slots.push(Slot {
                    id,
                    child,
                    chan,
                    state: State::Starting,
                    since: Instant::now(),
                    replaces,
                    drain: None,
                    stats: None,
                });
                true
            }
            Err(e) => {
                log::error!("cannot start a worker: {e}");
                self.failed_start();
                false
            }
        }
    }

    /// A worker failed to start or died before it was ready: back off.
    fn failed_start(&mut self) {
        self.failures += 1;
        if self.failures == 1 {
            return;
        }
        let delay =
            (Duration::from_millis(100) * 2u32.saturating_pow(self.failures - 2)).min(MAX_BACKOFF);
        if self.failures >= 3 {
            log::error!(
                "workers are crash-looping: {} in a row died before they were ready; next \
                 start in {delay:?}",
                self.failures
            );
        }
        self.next_spawn = Instant::now() + delay;
    }

    fn read_messages(&mut self) {
        let mut buf = [0u8; 4096];
        let mut became_ready = Vec::new();
        for s in &mut self.slots {
            while let Ok(n) = s.chan.recv(&mut buf) {
                let m = parse_message(&buf[..n]);
                if m.get("READY").is_some_and(|v| v == "1") && s.state == State::Starting {
                    s.state = State::Ready;
                    log::info!(
                        "worker {} (pid {}) ready in {:?}",
                        s.id,
                        s.child.id(),
                        s.since.elapsed()
                    );
                    became_ready.push(s.replaces.take());
                }
                if m.get("STOPPING").is_some_and(|v| v == "1") && s.state != State::Stopping {
                    s.state = State::Stopping;
                    s.since = Instant::now();
                }
                if let Some(d) = m.get("X-DRAIN") {
                    let n: Vec<u64> = d.split(' ').filter_map(|x| x.parse().ok()).collect();
                    if let [finished, cut, still_running] = n[..] {
                        s.drain = Some(DrainReport {
                            finished,
                            cut,
                            still_running,
                        });
                    }
                }
                if let Some(line) = m.get("X-STATS") {
                    s.stats = Some(parse_stats(line));
                }
            }
        }
        for replaces in became_ready {
            self.failures = 0;
            if let Some(old) = replaces
                && let Some(s) = self.slots.iter_mut().find(|s| s.id == old)
                && s.state != State::Stopping
            {
                log::info!("stopping worker {} (pid {}): replaced", s.id, s.child.id());
                stop(s);
            }
        }
        if !self.announced
            && !self.stopping
            && self.active() >= self.target
            && self.slots.iter().all(|s| s.state != State::Starting)
        {
            self.announced = true;
            self.ready();
        }
    }

    /// All first workers serve: the pid file, and `READY=1` to whoever started us (systemd, or
    /// the old supervisor of an upgrade).
    fn ready(&self) {
        if let Some(path) = &self.cfg.pid_file
            && let Err(e) = write_pid_file(path)
        {
            log::error!("cannot write the pid file {}: {e}", path.display());
        }
        log::info!(
            "supervisor (pid {}) ready: {} worker(s)",
            std::process::id(),
            self.target
        );
        if let Some(n) = Notifier::get() {
            n.send(&format!(
                "READY=1\nMAINPID={}\nSTATUS={} worker(s) serving",
                std::process::id(),
                self.target
            ));
        }
    }

    fn reap(&mut self) {
        let mut i = 0;
        while i < self.slots.len() {
            let status = match self.slots[i].child.try_wait() {
                Ok(Some(st)) => st,
                Ok(None) => {
                    i += 1;
                    continue;
                }
                Err(e) => {
                    log::error!("waiting for worker {}: {e}", self.slots[i].id);
                    i += 1;
                    continue;
                }
            };
            let mut s = self.slots.remove(i);
            // What it sent just before exiting.
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.chan.recv(&mut buf) {
                let m = parse_message(&buf[..n]);
                if let Some(line) = m.get("X-STATS") {
                    s.stats = Some(parse_stats(line));
                }
                if let Some(d) = m.get("X-DRAIN") {
                    let n: Vec<u64> = d.split(' ').filter_map(|x| x.parse().ok()).collect();
                    if let [finished, cut, still_running] = n[..] {
                        s.drain = Some(DrainReport {
                            finished,
                            cut,
                            still_running,
                        });
                    }
                }
            }
            self.exited(s, status);
        }
    }

    fn exited(&mut self, s: Slot, status: ExitStatus) {
        let pid = s.child.id();
        if let (Some(drain), Some(stats)) = (s.drain, s.stats) {
            add_stats(&mut self.summary.stats, &stats);
            self.summary.drain.finished += drain.finished;
            self.summary.drain.cut += drain.cut;
            self.summary.drain.still_running += drain.still_running;
            self.summary.workers.push(WorkerReport {
                id: s.id,
                pid,
                drain,
                stats,
            });
        }
        if s.state == State::Stopping {
            log::debug!("worker {} (pid {pid}) exited: {}", s.id, describe(status));
            return;
        }
        self.summary.worker_crashes += 1;
        log::warn!(
            "worker {} (pid {pid}) exited unexpectedly ({}){}",
            s.id,
            describe(status),
            if self.stopping { "" } else { "; restarting it" }
        );
        if let Some(old) = s.replaces {
            self.rolling.push_front(old);
        }
        if s.state == State::Starting {
            self.failed_start();
        }
    }

    fn check_timeouts(&mut self) {
        let limit = self.cfg.grace + KILL_AFTER;
        let ready_timeout = self.cfg.ready_timeout;
        for s in &mut self.slots {
            let late = match s.state {
                State::Starting => s.since.elapsed() > ready_timeout,
                State::Stopping => s.since.elapsed() > limit,
                State::Ready => false,
            };
            if late {
                log::warn!(
                    "worker {} (pid {}) {}: killing it",
                    s.id,
                    s.child.id(),
                    match s.state {
                        State::Starting => "was not ready in time",
                        _ => "did not finish draining in time",
                    }
                );
                let _ = s.child.kill();
                s.since = Instant::now();
            }
        }
    }

    fn start_upgrade(&mut self) {
        if self.upgrade.is_some() {
            log::warn!("SIGUSR2: an upgrade is already under way");
            return;
        }
        let env = [(UPGRADE_VAR.to_owned(), std::process::id().to_string())];
        match spawn_with_fds(
            &self.upgrade_exe,
            &self.args,
            &self.cfg.listeners,
            &env,
            false,
        ) {
            Ok((child, chan)) => {
                log::info!(
                    "SIGUSR2: started {} (pid {}) as the new supervisor; serving until it is ready",
                    self.upgrade_exe.display(),
                    child.id()
                );
                self.upgrade = Some(Upgrade {
                    child,
                    chan,
                    since: Instant::now(),
                });
            }
            Err(e) => log::error!(
                "upgrade failed: cannot start {}: {e}; still serving",
                self.upgrade_exe.display()
            ),
        }
    }

    fn check_upgrade(&mut self) {
        let Some(u) = &mut self.upgrade else { return };
        let mut buf = [0u8; 4096];
        let mut ready = false;
        while let Ok(n) = u.chan.recv(&mut buf) {
            ready |= parse_message(&buf[..n])
                .get("READY")
                .is_some_and(|v| v == "1");
        }
        if ready {
            log::info!(
                "new supervisor (pid {}) is ready: handing over and draining",
                u.child.id()
            );
            // It serves the same sockets now: their files are its to remove.
            for l in &mut self.cfg.listeners {
                if let Some(p) = l.path.take() {
                    std::mem::forget(p);
                }
            }
            self.upgrade = None;
            self.summary.upgraded = true;
            self.stop_all();
            return;
        }
        let failed = match u.child.try_wait() {
            Ok(Some(status)) => Some(format!("it exited ({})", describe(status))),
            Ok(None) if u.since.elapsed() > self.cfg.ready_timeout => {
                let _ = u.child.kill();
                let _ = u.child.wait();
                Some(format!(
                    "it was not ready within {:?}",
                    self.cfg.ready_timeout
                ))
            }
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait for it: {e}")),
        };
        if let Some(why) = failed {
            log::error!(
                "upgrade failed: the new supervisor {} (pid {}) did not take over: {why}; still \
                 serving",
                self.upgrade_exe.display(),
                u.child.id()
            );
            self.upgrade = None;
        }
    }

    fn finish(mut self) -> Summary {
        if let Some(path) = &self.cfg.pid_file
            && std::fs::read_to_string(path)
                .is_ok_and(|s| s.trim() == std::process::id().to_string())
        {
            let _ = std::fs::remove_file(path);
        }
        self.cfg.listeners.clear();
        std::mem::take(&mut self.summary)
    }
}

fn stop(s: &mut Slot) {
    kill(&s.child, libc::SIGTERM);
    s.state = State::Stopping;
    s.since = Instant::now();
}

fn kill(child: &Child, sig: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32)
        && let Some(sig) = rustix::process::Signal::from_named_raw(sig)
    {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("status {c}"),
        (_, Some(s)) => format!("signal {s}"),
        _ => status.to_string(),
    }
}

/// Parses the `KEY=VALUE` lines of a readiness message.
fn parse_message(msg: &[u8]) -> std::collections::HashMap<String, String> {
    String::from_utf8_lossy(msg)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A random-enough 0..=`jitter` for worker `id` (no cryptographic need).
fn jitter_for(id: u64, jitter: u64) -> u64 {
    if jitter == 0 {
        return 0;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    (nanos ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % (jitter + 1)
}

fn write_pid_file(path: &Path) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

/// Starts `exe` with our arguments, the listeners as descriptors 3, 4, ... (`LISTEN_FDS`,
/// `LISTEN_PID`, `LISTEN_FDNAMES`) and a datagram channel for its readiness messages; returns
/// the child and our end of the channel. `worker`: its own process group, and SIGTERM when
/// the supervisor dies.
fn spawn_with_fds(
    exe: &Path,
    args: &[OsString],
    listeners: &[Held],
    env: &[(String, String)],
    worker: bool,
) -> io::Result<(Child, UnixDatagram)> {
    let (ours, theirs) = UnixDatagram::pair()?;
    ours.set_nonblocking(true)?;
    // Copies above every target number, so placing one cannot overwrite another.
    let mut high = Vec::new();
    for l in listeners {
        high.push(rustix::io::fcntl_dupfd_cloexec(l.fd.as_fd(), HIGH_FD)?);
    }
    high.push(rustix::io::fcntl_dupfd_cloexec(theirs.as_fd(), HIGH_FD)?);
    drop(theirs);
    let raws: Vec<i32> = high.iter().map(AsRawFd::as_raw_fd).collect();
    let n = listeners.len();
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    let supervisor = std::process::id() as i32;
    let mut cmd = Command::new("/bin/sh");
    // `$$` is the shell's pid, which `exec` keeps: LISTEN_PID names the program itself.
    cmd.arg("-c")
        .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
        .arg(exe)
        .args(args);
    for var in [
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        WORKER_VAR,
        UPGRADE_VAR,
    ] {
        cmd.env_remove(var);
    }
    cmd.env("LISTEN_FDS", n.to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env(NOTIFY_FD_VAR, (3 + n).to_string());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if worker {
        cmd.process_group(0);
    }
    place_fds(&mut cmd, raws, worker.then_some(supervisor));
    let child = cmd.spawn()?;
    drop(high);
    Ok((child, ours))
}

/// In the child, before exec: `raws[i]` becomes descriptor `3 + i` (without close-on-exec);
/// with `parent`, the child gets SIGTERM when that process dies.
#[allow(unsafe_code)]
fn place_fds(cmd: &mut Command, raws: Vec<i32>, parent: Option<i32>) {
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called. It calls only `dup2`, `prctl`, `getppid` and
    // `_exit`, all async-signal-safe system calls, allocates nothing (`raws` was built before
    // the fork and is only read) and takes no lock. Every `raws[i]` is open in the child: the
    // parent keeps the descriptors (`high` in `spawn_with_fds`) alive until `spawn` returns,
    // and they are at least `HIGH_FD`, above every target `3 + i` (fewer than `HIGH_FD - 3`
    // listeners), so no `dup2` overwrites a descriptor still to be placed.
    unsafe {
        cmd.pre_exec(move || {
            for (i, &fd) in raws.iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(parent) = parent {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The supervisor died before the line above: nobody to serve for.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_survive_the_line_a_worker_reports() {
        // Every word distinct, so that a field dropped or moved shows.
        let s = Stats::from_words((1..=200).map(|i| i * 1000 + (1 << 40)));
        let words = s.words();
        // A field of `Stats` left out of the words keeps its 0.
        let shown = format!("{s:?}");
        assert!(
            !shown.contains(": 0,") && !shown.contains(": 0 }"),
            "a field is not in the words: {shown}"
        );
        let back = parse_stats(&stats_line(&s));
        assert_eq!(back, s);
        let mut sum = back;
        add_stats(&mut sum, &s);
        assert_eq!(sum.words(), words.iter().map(|w| 2 * w).collect::<Vec<_>>());
        assert_eq!(sum.request_duration.count(), 2 * s.request_duration.count());
    }

    #[test]
    fn readiness_messages_parse_into_fields() {
        let m = parse_message(b"READY=1\nSTATUS=serving on x: 1 active");
        assert_eq!(m["READY"], "1");
        assert_eq!(m["STATUS"], "serving on x: 1 active");
    }

    #[test]
    fn a_crash_loop_backs_off_up_to_a_limit() {
        let mut sup = Supervisor::new(Prefork::new(2)).unwrap();
        let start = Instant::now();
        // The first failure is retried at once: a worker killed by accident is back at once.
        sup.failed_start();
        assert!(sup.next_spawn <= start);
        let mut last = Duration::ZERO;
        for _ in 0..12 {
            sup.failed_start();
            let wait = sup.next_spawn.saturating_duration_since(Instant::now());
            assert!(
                wait + Duration::from_millis(50) >= last,
                "{wait:?} after {last:?}"
            );
            assert!(wait <= MAX_BACKOFF);
            last = wait;
        }
        assert!(last > Duration::from_secs(5), "{last:?}");
    }

    #[test]
    fn jitter_stays_in_range() {
        for id in 0..100 {
            assert!(jitter_for(id, 5) <= 5);
        }
        assert_eq!(jitter_for(3, 0), 0);
    }
}
