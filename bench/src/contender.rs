//! The servers under test: what each one is, how to start it pinned to its core on a free
//! loopback port, how to read its resident memory, and how to stop it for sure.

use std::fs::File;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use socketserver::Digest;

/// The key every authenticating contender and client share.
pub const AUTH_KEY: &[u8] = b"socketserver-bench-key";

/// Worker threads of the `echo_server --mode pool` and `std_echo --pool` contenders: enough for
/// the largest echo scenario, so that every persistent connection has a worker.
pub const POOL_WORKERS: usize = 128;

/// Worker threads of the `echo_server --mode event` contender (`--workers`): a connection holds
/// one only while a message is served, so one per core, as a competent user would pick (and as
/// tokio's runtimes do): 1 pinned to one core (a second worker there would only take turns
/// with the first), 2 unpinned on this machine's two cores.
pub fn event_workers(pinned: bool) -> usize {
    if pinned { 1 } else { 2 }
}

/// The most workers [`event_workers`] gives, for bounds that hold in both sweeps.
pub const EVENT_WORKERS: usize = 2;

/// Worker threads of the `netio_echo` contender. net-io 0.4 runs each connection on a worker of
/// its blocking pool for the whole connection and refuses (rather than queues) a connection
/// that finds none free, so the pool is sized above the largest scenario: 128 echo connections
/// plus the benchmark's own probe connections, which may still be closing when a run starts.
pub const NETIO_WORKERS: usize = 2 * POOL_WORKERS;

/// What a run of the event contender says when `echo_server` has no `--mode event` yet.
pub const EVENT_MISSING: &str = "echo_server has no --mode event in this build: it lacks \
Dispatch::Event (issue 13); leave the event contender out (list --contenders without event) \
or build from a tree that has it";

/// The tokio runtime a competent tokio user would pick: one core (pinned) makes a multi-thread
/// runtime one worker plus a thread handing connections across, so a current-thread runtime;
/// several cores, the multi-thread runtime `#[tokio::main]` gives.
pub fn tokio_runtime(pinned: bool) -> &'static str {
    if pinned {
        "current-thread"
    } else {
        "multi-thread"
    }
}

/// Which server program a contender runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `std_echo`: minimal std::net thread-per-connection echo, the baseline.
    Std,
    /// `std_echo --pool POOL_WORKERS`: pre-spawned std threads each looping `accept()` on the
    /// shared listener, the fair peer of [`Kind::Pool`].
    StdPool,
    /// `tokio_echo`: a task per connection, on the runtime [`tokio_runtime`] picks.
    Tokio,
    /// This crate's `echo_server --mode thread`.
    Thread,
    /// This crate's `echo_server --mode pool --workers POOL_WORKERS`.
    Pool,
    /// `python_echo.py`: Python's `socketserver.ThreadingTCPServer`.
    Python,
    /// [`Kind::Thread`] with `--proxy-protocol --trusted-proxy 127.0.0.1/32`; its clients open
    /// each connection with a PROXY v2 header, as HAProxy's `send-proxy-v2` does.
    ThreadProxy,
    /// This crate's `echo_server --mode event --workers N` ([`event_workers`]): connections parked in
    /// an epoll set between messages (issue 13).
    Event,
    /// `netio_echo`: net-io 0.4's blocking pool of NETIO_WORKERS workers.
    NetIo,
    /// This crate's `echo_server --processes 2`: a prefork supervisor and two worker processes
    /// (thread mode each) on one inherited listener. Meant for the unpinned sweep.
    Prefork,
    /// [`Kind::Thread`] with metrics on: `echo_server` built with `--features metrics,tracing`
    /// and run with `--metrics-addr` (the endpoint up; no recorder or subscriber installed).
    Metrics,
}

/// One server configuration under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contender {
    /// The program.
    pub kind: Kind,
    /// The classic HMAC handshake each client must pass first, if any.
    pub auth: Option<Digest>,
}

impl Contender {
    /// A contender without authentication.
    pub const fn plain(kind: Kind) -> Contender {
        Contender { kind, auth: None }
    }

    /// A contender whose clients authenticate with `digest`.
    pub const fn with_auth(kind: Kind, digest: Digest) -> Contender {
        Contender {
            kind,
            auth: Some(digest),
        }
    }

    /// Short name used in tables and the chart.
    pub fn label(&self) -> String {
        let base = match self.kind {
            Kind::Std => "std",
            Kind::StdPool => "std pool",
            Kind::Tokio => "tokio",
            Kind::Thread => "socketserver thread",
            Kind::Pool => "socketserver pool",
            Kind::Python => "python",
            Kind::ThreadProxy => "socketserver thread +proxy",
            Kind::Event => "socketserver event",
            Kind::NetIo => "net-io",
            Kind::Prefork => "socketserver prefork 2",
            Kind::Metrics => "socketserver thread +metrics",
        };
        match self.auth {
            None => base.to_owned(),
            Some(d) => format!("{base} +{}", d.name()),
        }
    }

    /// One line on what the contender is, for the legend of the results.
    pub fn describe(&self) -> String {
        let what = match self.kind {
            Kind::Std => {
                "`std_echo`: std::net, a thread per connection, 16 KiB heap BufReader never \
                 zeroed (baseline)"
                    .to_owned()
            }
            Kind::StdPool => format!(
                "`std_echo --pool {POOL_WORKERS}`: std::net, {POOL_WORKERS} pre-spawned threads \
                 each looping accept() on the shared listener, same buffer"
            ),
            Kind::Tokio => {
                "`tokio_echo`: a task per connection on a current-thread runtime when pinned to \
                 one core, on the multi-thread runtime (a worker per core) unpinned; 16 KiB heap \
                 buffer never zeroed (read_buf)"
                    .to_owned()
            }
            Kind::Thread => "`echo_server --mode thread` (this crate): a thread per connection \
                             (finished threads reused), rfile's 8 KiB heap buffer never zeroed \
                             (StreamOptions' default, Python's rbufsize; only touched pages \
                             count)"
                .to_owned(),
            Kind::Pool => format!(
                "`echo_server --mode pool --workers {POOL_WORKERS}` (this crate): \
                 {POOL_WORKERS} pre-spawned workers, same rfile"
            ),
            Kind::Python => {
                "`python_echo.py`: Python socketserver.ThreadingTCPServer, a thread per \
                 connection, recv(16384) (not zeroed)"
                    .to_owned()
            }
            Kind::ThreadProxy => "`echo_server --mode thread --proxy-protocol --trusted-proxy \
                                  127.0.0.1/32`: the thread contender behind the PROXY stage; \
                                  each client connection starts with a 28-byte v2 header"
                .to_owned(),
            Kind::Event => "`echo_server --mode event --workers N` (this crate; N = 1 pinned, 2 \
                            unpinned: a worker per core): a worker is held only while a message \
                            is served, connections parked in an epoll set in between, read \
                            buffer taken on demand"
                .to_owned(),
            Kind::NetIo => format!(
                "`netio_echo` (net-io 0.4, the closest blocking peer): its only driver in 0.4, \
                 the blocking pool, here {NETIO_WORKERS} workers (net-io refuses a connection \
                 that finds every worker busy instead of queueing it, so the pool is sized \
                 above the largest scenario); an accept thread hands each connection to a \
                 worker, which holds it until it closes; TCP_NODELAY on the listener, a 16 KiB \
                 heap buffer per worker (zeroed once, reused), net-io's default limits but a \
                 per-source cap raised for a one-host load generator. Not in the idle \
                 scenario: a worker per open connection and at most 4,096 workers \
                 (ServerBuilder::workers), so it cannot hold thousands of idle connections; \
                 its reactor is planned for 0.5. No HMAC contender: net-io leaves \
                 authentication to the crates above it"
            ),
            Kind::Prefork => "`echo_server --processes 2` (this crate): a prefork supervisor and \
                              two worker processes in thread mode accepting from one inherited \
                              listener (pinned, all three share the server's one core)"
                .to_owned(),
            Kind::Metrics => "`echo_server --mode thread --metrics-addr` built with `--features \
                              metrics,tracing` (this crate): thread mode with the metrics \
                              endpoint up and both features compiled in"
                .to_owned(),
        };
        match self.auth {
            None => what,
            Some(d) => format!("{what}, classic HMAC-{} handshake per connection", d.name()),
        }
    }
}

/// The PID of the server running now (0: none), for [`kill_current`].
static CURRENT: AtomicU32 = AtomicU32::new(0);

/// Kills the server running now, if any: for a signal handler, when the benchmark itself is
/// interrupted or terminated and cannot unwind to the server's `Drop`.
pub fn kill_current() {
    let pid = CURRENT.swap(0, Ordering::SeqCst);
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
    }
}

/// Paths of the programs the contenders run.
#[derive(Debug, Clone)]
pub struct Programs {
    /// The crate's `examples/echo_server`.
    pub echo_server: PathBuf,
    /// `std_echo` of this benchmark crate.
    pub std_echo: PathBuf,
    /// `tokio_echo` of this benchmark crate.
    pub tokio_echo: PathBuf,
    /// `netio_echo` of this benchmark crate.
    pub netio_echo: PathBuf,
    /// The Python interpreter (resolved past pyenv-style shims), if there is one.
    pub python: Option<PathBuf>,
    /// `bench/python_echo.py`.
    pub python_script: PathBuf,
    /// The crate's `examples/echo_server` built with `--features metrics,tracing`, copied to
    /// `echo_server_metrics` next to it.
    pub echo_server_metrics: PathBuf,
}

/// A contender's server process. Dropping it stops the process (SIGTERM, then SIGKILL) and
/// reaps it, on every path out, panics included.
pub struct Server {
    child: Option<Child>,
    /// The process whose memory is sampled (taskset execs the server, so the PID is the same).
    pub pid: u32,
    /// Where it listens.
    pub addr: SocketAddr,
    log: PathBuf,
}

/// A free loopback port: bind port 0, note the port, release it for the server to take.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether [`connect`] starts each connection with a PROXY v2 header: on while the
/// [`Kind::ThreadProxy`] contender runs (set by the benchmark before it starts one).
static SEND_PROXY_HEADER: AtomicBool = AtomicBool::new(false);

/// Makes [`connect`] send a PROXY v2 header first (or not), for the contender about to run.
pub fn send_proxy_header(on: bool) {
    SEND_PROXY_HEADER.store(on, Ordering::SeqCst);
}

/// The PROXY v2 header HAProxy's `send-proxy-v2` would send for a TCP/IPv4 connection from
/// `src` to `dst`: 16 fixed bytes and 12 of addresses.
fn proxy_v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    for a in [src, dst] {
        match a.ip() {
            std::net::IpAddr::V4(ip) => h.extend_from_slice(&ip.octets()),
            std::net::IpAddr::V6(_) => h.extend_from_slice(&[127, 0, 0, 1]),
        }
    }
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// Opens a client connection: TCP_NODELAY, 10 s I/O timeouts so that nothing hangs, a PROXY
/// header for the `+proxy` contender, and the handshake when the contender asks for one.
pub fn connect(addr: SocketAddr, auth: Option<Digest>) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    if SEND_PROXY_HEADER.load(Ordering::Relaxed) {
        s.write_all(&proxy_v2_header(s.local_addr()?, addr))?;
    }
    if let Some(d) = auth {
        socketserver::answer_challenge(&mut s, AUTH_KEY, d).map_err(io::Error::other)?;
    }
    Ok(s)
}

pub use crate::common::round_trip;

impl Server {
    /// Starts `c` on a free loopback port (pinned to `core` with taskset if given) and waits
    /// until it echoes. Its stderr goes to a log file in `logdir`.
    pub fn start(
        c: &Contender,
        p: &Programs,
        core: Option<usize>,
        logdir: &Path,
    ) -> Result<Server, String> {
        let mut last = String::new();
        // A port freed by free_port() may be taken by someone else before the server binds it.
        for _ in 0..3 {
            match Server::try_start(c, p, core, logdir) {
                Ok(s) => return Ok(s),
                // clap's "invalid value 'event' for '--mode <MODE>'": no retry helps.
                Err(e) if c.kind == Kind::Event && e.contains("invalid value 'event'") => {
                    return Err(format!("{EVENT_MISSING} {e}"));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn try_start(
        c: &Contender,
        p: &Programs,
        core: Option<usize>,
        logdir: &Path,
    ) -> Result<Server, String> {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let a = addr.to_string();
        let key = String::from_utf8_lossy(AUTH_KEY).into_owned();
        let mut argv: Vec<String> = Vec::new();
        if let Some(core) = core {
            argv.extend(["taskset".into(), "-c".into(), core.to_string()]);
        }
        let path = |p: &Path| p.display().to_string();
        match c.kind {
            Kind::Std => argv.extend([path(&p.std_echo), "--addr".into(), a]),
            Kind::StdPool => argv.extend([
                path(&p.std_echo),
                "--addr".into(),
                a,
                "--pool".into(),
                POOL_WORKERS.to_string(),
            ]),
            Kind::Tokio => {
                argv.extend([
                    path(&p.tokio_echo),
                    "--addr".into(),
                    a,
                    "--runtime".into(),
                    tokio_runtime(core.is_some()).into(),
                ]);
                if let Some(d) = c.auth {
                    argv.extend([
                        "--auth-key".into(),
                        key,
                        "--digest".into(),
                        d.name().to_owned(),
                    ]);
                }
            }
            Kind::Thread | Kind::Pool | Kind::ThreadProxy => {
                argv.extend([path(&p.echo_server), "--addr".into(), a]);
                if c.kind == Kind::ThreadProxy {
                    argv.extend(
                        ["--mode", "thread", "--proxy-protocol", "--trusted-proxy"].map(Into::into),
                    );
                    argv.push("127.0.0.1/32".into());
                } else if c.kind == Kind::Thread {
                    argv.extend(["--mode".into(), "thread".into()]);
                } else {
                    argv.extend([
                        "--mode".into(),
                        "pool".into(),
                        "--workers".into(),
                        POOL_WORKERS.to_string(),
                    ]);
                }
                if let Some(d) = c.auth {
                    argv.extend([
                        "--auth-key".into(),
                        key,
                        "--digest".into(),
                        d.name().to_owned(),
                    ]);
                }
            }
            Kind::Event => {
                argv.extend([
                    path(&p.echo_server),
                    "--addr".into(),
                    a,
                    "--mode".into(),
                    "event".into(),
                    "--workers".into(),
                    event_workers(core.is_some()).to_string(),
                ]);
                if let Some(d) = c.auth {
                    argv.extend([
                        "--auth-key".into(),
                        key,
                        "--digest".into(),
                        d.name().to_owned(),
                    ]);
                }
            }
            Kind::NetIo => {
                if let Some(d) = c.auth {
                    return Err(format!("net-io has no HMAC handshake ({d})"));
                }
                argv.extend([
                    path(&p.netio_echo),
                    "--addr".into(),
                    a,
                    "--workers".into(),
                    NETIO_WORKERS.to_string(),
                ]);
            }
            Kind::Prefork => argv.extend([
                path(&p.echo_server),
                "--addr".into(),
                a,
                "--processes".into(),
                "2".into(),
            ]),
            Kind::Metrics => {
                let metrics = free_port().map_err(|e| format!("no free port: {e}"))?;
                argv.extend([
                    path(&p.echo_server_metrics),
                    "--addr".into(),
                    a,
                    "--mode".into(),
                    "thread".into(),
                    "--metrics-addr".into(),
                    format!("127.0.0.1:{metrics}"),
                ]);
            }
            Kind::Python => {
                let py = p.python.as_ref().ok_or("python3 not found")?;
                argv.extend([path(py), path(&p.python_script), "--addr".into(), a]);
                match c.auth {
                    None => {}
                    Some(Digest::Md5) => argv.extend(["--auth-key".into(), key]),
                    Some(d) => return Err(format!("python_echo.py speaks MD5 only, not {d}")),
                }
            }
        }
        let log = logdir.join(format!("{}.log", c.label().replace([' ', '+'], "_")));
        let err = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
        CURRENT.store(child.id(), Ordering::SeqCst);
        let mut server = Server {
            pid: child.id(),
            child: Some(child),
            addr,
            log,
        };
        server.wait_ready(c.auth, Duration::from_secs(15))?;
        Ok(server)
    }

    /// Whether the server sets TCP_NODELAY on the connections it accepts, seen on the server's
    /// own socket: after one echo on a connection of ours, each socket descriptor of the server
    /// is copied into this process (pidfd_getfd, Linux 5.6+, with ptrace rights over the
    /// server: we are its parent) until the one whose peer is our end. None if that fails.
    pub fn accepted_nodelay(&self, auth: Option<Digest>) -> Option<bool> {
        use rustix::process::{PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
        let mut ours = connect(self.addr, auth).ok()?;
        round_trip(&mut ours, 0).ok()?;
        let our_end = ours.local_addr().ok()?;
        let pid = rustix::process::Pid::from_raw(self.pid as i32)?;
        let pidfd = pidfd_open(pid, PidfdFlags::empty()).ok()?;
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid)).ok()?;
        for entry in fds.flatten() {
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if !is_socket {
                continue;
            }
            let Ok(copy) = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) else {
                continue;
            };
            let theirs = TcpStream::from(copy);
            if theirs.peer_addr().is_ok_and(|a| a == our_end) {
                return theirs.nodelay().ok();
            }
        }
        None
    }

    /// Waits until a client gets an echo back (through the handshake when there is one).
    fn wait_ready(&mut self, auth: Option<Digest>, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!("server exited ({status}) {}", self.log_tail()));
            }
            let tried = connect(self.addr, auth).and_then(|mut s| round_trip(&mut s, 0));
            match tried {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "server did not echo within {limit:?}: {e} {}",
                        self.log_tail()
                    ));
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// The exit status, if the process has ended.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// The end of the server's stderr, to explain a failure.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join("\n  ");
        format!("(log {}:\n  {tail})", self.log.display())
    }

    /// Stops the server and reaps it; an error if it had died on its own before this.
    pub fn stop(mut self) -> Result<(), String> {
        let died = self.exited();
        self.kill();
        match died {
            Some(status) => Err(format!(
                "server died during the run ({status}) {}",
                self.log_tail()
            )),
            None => Ok(()),
        }
    }

    fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while let Ok(None) = child.try_wait() {
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = child.wait();
        let _ = CURRENT.compare_exchange(self.pid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The number of threads of `pid` (`Threads:` in /proc/PID/status).
pub fn threads(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Threads:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
