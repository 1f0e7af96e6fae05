//! The TLS benchmark: this crate's `echo_server --tls-cert ...` (thread, pool and event
//! dispatch) against tokio-rustls and std + rustls by hand (`tls_echo`), all with the same
//! provider (ring), certificate (ECDSA P-256, generated at start with rcgen into a temporary
//! directory) and configuration.
//!
//! ```text
//! cargo run --release -p socketserver-bench --bin tls_bench -- [--quick] [--rounds N]
//!     [--unpinned] [--points TEXT] [--out bench/results.md]
//! ```
//! The report is one section of results.md (`--out`; with `--quick` the default is the
//! git-ignored results-quick.md, as for the main benchmark), between the lines
//! `<!-- tls_bench: begin -->` and `<!-- tls_bench: end -->`: a run replaces that section and
//! nothing else, or appends it when the file has none; the main benchmark, rewriting the file,
//! carries the section over unchanged.
//!
//! Scenarios: TLS connect + 64-byte echo + close (8 client threads; session resumption on, as
//! clients do by default, and off), TLS echo round trips at 1, 16 and 128 connections, the
//! server's resident memory per idle TLS connection beside the plaintext figure, and the
//! plaintext echo of an `echo_server` built with the tls feature beside `std_echo`. Pinned (the
//! default, when `taskset` works): the server on core 1, the load on core 0.
//!
//! As the main benchmark: every point runs every contender once per round (`--rounds`, default
//! 5; `--quick`: 1 round, shorter runs), each on a fresh server process, alternating the order
//! (A B … then … B A); the median and the spread over rounds are reported, and issue 15's
//! targets get a verdict only when the whole range the rounds allow is past the bound. The
//! connect points differ: every contender's server runs side by side for the whole point and
//! they take turns of a second (three times `--rounds` turns each), and their targets are
//! judged round by round, over a 95% confidence interval of the median round ratio. A
//! contender whose server does not start (or whose run fails) is reported with its error and
//! left out of the ratios; the run goes on and exits with status 1 at the end.

#[path = "../common.rs"]
#[allow(dead_code)] // the plaintext round trip is the other benchmarks'
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const MSG: usize = 64;
/// A server that stops accepting fails the run within this, as one that stops answering does
/// within the 10 s read timeout, instead of hanging the benchmark.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn fail(msg: &str) -> ! {
    eprintln!("tls_bench: {msg}");
    std::process::exit(1)
}

/// A CA and a server certificate for localhost/127.0.0.1, as PEM files in `dir`.
fn make_certs(dir: &Path) -> PathBuf {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "bench CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
    let mut p = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    dir.join("ca.pem")
}

fn client_config(ca: &Path, resume: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in socketserver::tls::certs_from_pem_file(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let mut c = ClientConfig::builder_with_provider(socketserver::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        c.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(c)
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> std::io::Result<Tls> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = ClientConnection::new(config.clone(), "localhost".try_into().unwrap())
        .map_err(std::io::Error::other)?;
    let mut t = StreamOwned::new(conn, s);
    while t.conn.is_handshaking() {
        t.conn.complete_io(&mut t.sock)?;
    }
    Ok(t)
}

fn round_trip(t: &mut (impl Read + Write), buf: &mut [u8; MSG]) -> std::io::Result<()> {
    t.write_all(buf)?;
    t.read_exact(buf)
}

/// A server under test.
struct Contender {
    label: &'static str,
    program: PathBuf,
    args: Vec<String>,
}

struct Running {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts `c` on a free port and waits until it listens; its stderr goes to `log`. A server
/// that exits first (a configuration it refuses, say) or does not listen within 10 s is an
/// error, with what it wrote to stderr.
fn start(c: &Contender, pinned: bool, log: &Path) -> Result<Running, String> {
    let addr = free_port();
    let mut cmd = if pinned {
        let mut t = Command::new("taskset");
        t.args(["-c", "1"]).arg(&c.program);
        t
    } else {
        Command::new(&c.program)
    };
    let args: Vec<String> = c
        .args
        .iter()
        .map(|a| a.replace("{addr}", &addr.to_string()))
        .map(|a| {
            if pinned {
                a.replace("{runtime}", "current-thread")
            } else {
                a.replace("{runtime}", "multi-thread")
            }
        })
        .collect();
    let stderr = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = cmd
        .args(&args)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", c.program.display()))?;
    let mut r = Running { child, addr };
    // The last line the server wrote to stderr (its error, when it refused to start).
    let said = || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map_or(String::new(), |l| format!(": {}", l.trim()))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = r.child.try_wait() {
            return Err(format!(
                "the server exited before listening ({status}){}",
                said()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!("the server did not listen within 10 s{}", said()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(r)
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Round trips/s over `conns` persistent TLS connections for `d`.
fn echo(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    conns: usize,
    d: Duration,
) -> Result<f64, String> {
    let streams: Vec<Tls> = (0..conns)
        .map(|_| connect(addr, config).map_err(|e| format!("TLS connect: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(round_trips(streams, d))
}

/// Round trips/s over `conns` persistent plaintext connections for `d`.
fn plain_echo(addr: SocketAddr, conns: usize, d: Duration) -> Result<f64, String> {
    let streams: Vec<TcpStream> = (0..conns)
        .map(|_| {
            let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        })
        .collect::<std::io::Result<_>>()
        .map_err(|e| format!("connect: {e}"))?;
    Ok(round_trips(streams, d))
}

/// Round trips/s for `d`, a thread per stream, each echoing one message after another.
fn round_trips<S: Read + Write + Send + 'static>(streams: Vec<S>, d: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let (stop, total) = (stop.clone(), total.clone());
            std::thread::spawn(move || {
                let mut buf = [7u8; MSG];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    if round_trip(&mut s, &mut buf).is_err() {
                        break;
                    }
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(d);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    total.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// What a connect run measured: cycles/s, the share of them resumed, and the cycles that
/// failed (connect, handshake or echo) with the last failure's error.
struct Cycles {
    rate: f64,
    /// Cycles per second of the server's CPU time (user + system, all its threads).
    per_cpu: Option<f64>,
    resumed: f64,
    failed: u64,
    last_error: Option<String>,
}

/// CPU time (user + system) that process `pid` has used, all its threads (the ended ones
/// too), in seconds; `None` if it has gone.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm) ", utime and stime are fields 14 and 15 of stat, 11 and 12 here.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// Connect + handshake + one 64-byte echo + close_notify and close, from 8 threads, per second
/// and per second of the CPU time of `server`, the server's process.
fn connect_cycle(addr: SocketAddr, config: &Arc<ClientConfig>, d: Duration, server: u32) -> Cycles {
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let last_error = Arc::new(std::sync::Mutex::new(None));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (stop, total, resumed, config) =
                (stop.clone(), total.clone(), resumed.clone(), config.clone());
            let (failed, last_error) = (failed.clone(), last_error.clone());
            std::thread::spawn(move || {
                let mut buf = [7u8; MSG];
                let fault = |e: std::io::Error| {
                    failed.fetch_add(1, Ordering::Relaxed);
                    *last_error.lock().unwrap() = Some(e.to_string());
                };
                while !stop.load(Ordering::Relaxed) {
                    let mut t = match connect(addr, &config) {
                        Ok(t) => t,
                        Err(e) => {
                            fault(e);
                            continue;
                        }
                    };
                    if let Err(e) = round_trip(&mut t, &mut buf) {
                        fault(e);
                        continue;
                    }
                    if t.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        resumed.fetch_add(1, Ordering::Relaxed);
                    }
                    t.conn.send_close_notify();
                    let _ = t.flush();
                    total.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let (start, cpu) = (Instant::now(), cpu_seconds(server));
    std::thread::sleep(d);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let used = cpu.zip(cpu_seconds(server)).map(|(a, b)| b - a);
    let n = total.load(Ordering::Relaxed) as f64;
    let share = if n > 0.0 {
        resumed.load(Ordering::Relaxed) as f64 / n
    } else {
        0.0
    };
    let last_error = last_error.lock().unwrap().take();
    Cycles {
        rate: n / start.elapsed().as_secs_f64(),
        per_cpu: used.filter(|u| *u > 0.0).map(|u| n / u),
        resumed: share,
        failed: failed.load(Ordering::Relaxed),
        last_error,
    }
}

/// The server's RSS per held connection, KiB: `n` connections opened (TLS or plain), each
/// checked with one round trip, RSS before and after.
fn idle(r: &Running, config: Option<&Arc<ClientConfig>>, n: usize) -> Result<f64, String> {
    let pid = r.child.id();
    let before = rss_kib(pid);
    let mut held: Vec<Box<dyn FnMut() -> std::io::Result<()>>> = Vec::with_capacity(n);
    for i in 0..n {
        let mut buf = [7u8; MSG];
        let opened: std::io::Result<()> = (|| {
            match config {
                Some(c) => {
                    let mut t = connect(r.addr, c)?;
                    round_trip(&mut t, &mut buf)?;
                    held.push(Box::new(move || round_trip(&mut t, &mut [1u8; MSG])));
                }
                None => {
                    let mut s = TcpStream::connect_timeout(&r.addr, CONNECT_TIMEOUT)?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    round_trip(&mut s, &mut buf)?;
                    held.push(Box::new(move || round_trip(&mut s, &mut [1u8; MSG])));
                }
            }
            Ok(())
        })();
        opened.map_err(|e| format!("idle connection {} of {n}: {e}", i + 1))?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_kib(pid);
    for (i, h) in held.iter_mut().enumerate() {
        h().map_err(|e| format!("held connection {} of {n} stopped echoing: {e}", i + 1))?;
    }
    Ok((after.saturating_sub(before)) as f64 / n as f64)
}

fn build(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    for args in [
        &[
            "build",
            "--release",
            "--features",
            "tls",
            "--example",
            "echo_server",
        ][..],
        &[
            "build",
            "--release",
            "-p",
            "socketserver-bench",
            "--bin",
            "tls_echo",
            "--bin",
            "std_echo",
        ][..],
    ] {
        let ok = Command::new(env!("CARGO"))
            .args(args)
            .current_dir(root)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            fail(&format!("cargo {} failed", args.join(" ")));
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    (
        target.join("release/examples/echo_server"),
        target.join("release/tls_echo"),
        target.join("release/std_echo"),
    )
}

const THREAD: &str = "socketserver thread";
const POOL: &str = "socketserver pool";
const STD_TLS: &str = "std+rustls";
const TOKIO_TLS: &str = "tokio-rustls";
const THREAD_PLAIN: &str = "socketserver thread, plaintext";
const STD_PLAIN: &str = "std";
const THREAD_TLS_BUILT: &str = "socketserver thread (tls built in)";
/// `echo_server --mode event --workers N` with TLS: a few workers on one epoll set, the model
/// tokio's runtime follows (N = 1 pinned, as tokio's current-thread runtime; a worker per core
/// unpinned, as its multi-thread one).
const EVENT: &str = "socketserver event";
const EVENT_PLAIN: &str = "socketserver event, plaintext";

/// The idle contenders that hold plaintext connections, beside the TLS ones.
fn plaintext(label: &str) -> bool {
    label == THREAD_PLAIN || label == EVENT_PLAIN
}

/// A scenario point: every contender of it runs once per round, each on a fresh server.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Point {
    /// Connect + handshake + echo + close from 8 threads, session resumption on or off.
    Connect { resume: bool },
    /// The same runs, per second of the server's CPU time rather than of the clock: what a
    /// connection costs the server, whatever the load generator beside it can offer.
    ConnectCpu { resume: bool },
    /// TLS echo round trips over this many connections.
    Echo(usize),
    /// Server RSS per idle connection held (TLS, and the plaintext figure beside it).
    Idle,
    /// Plaintext echo round trips of an echo_server built with the tls feature, beside std.
    Plain(usize),
}

impl Point {
    fn name(self) -> String {
        match self {
            Point::Connect { resume: true } => "TLS connect+echo+close/s, resumed".into(),
            Point::Connect { resume: false } => "TLS connect+echo+close/s, full handshake".into(),
            Point::ConnectCpu { resume: true } => {
                "TLS connect+echo+close per server CPU-second, resumed".into()
            }
            Point::ConnectCpu { resume: false } => {
                "TLS connect+echo+close per server CPU-second, full handshake".into()
            }
            Point::Echo(n) => format!("TLS echo round trips/s, {n} conns"),
            Point::Idle => "idle KiB per connection".into(),
            Point::Plain(n) => format!("plaintext echo round trips/s, {n} conns"),
        }
    }

    fn contenders(self) -> &'static [&'static str] {
        match self {
            Point::Connect { .. } | Point::ConnectCpu { .. } | Point::Echo(_) => {
                &[THREAD, POOL, EVENT, STD_TLS, TOKIO_TLS]
            }
            // A pool of 128 workers cannot hold more connections than it has workers.
            Point::Idle => &[THREAD, EVENT, STD_TLS, TOKIO_TLS, THREAD_PLAIN, EVENT_PLAIN],
            Point::Plain(_) => &[STD_PLAIN, THREAD_TLS_BUILT],
        }
    }
}

/// One contender's figure in one round, and a note on it (the share of resumed handshakes).
struct Round {
    value: f64,
    note: String,
    /// A connect run's second figure: cycles per second of server CPU time.
    per_cpu: Option<f64>,
}

/// Every round of every contender at every point, in the order measured; a round whose
/// server did not start or whose run failed is its error.
type Results = Vec<(Point, Vec<(&'static str, Vec<Result<Round, String>>)>)>;

/// The figures of the rounds that were measured (failed rounds have none).
fn values(res: &Results, p: Point, label: &str) -> Vec<f64> {
    res.iter()
        .find(|(q, _)| *q == p)
        .and_then(|(_, e)| e.iter().find(|(l, _)| *l == label))
        .map_or(Vec::new(), |(_, r)| {
            r.iter().flatten().map(|r| r.value).collect()
        })
}

/// A / B round by round at a point whose contenders ran side by side (round r of A next to
/// round r of B in time); rounds where either failed are left out.
fn paired(res: &Results, p: Point, a: &str, b: &str) -> Vec<f64> {
    let rounds = |label: &str| {
        res.iter()
            .find(|(q, _)| *q == p)
            .and_then(|(_, e)| e.iter().find(|(l, _)| *l == label))
            .map_or(&[][..], |(_, r)| &r[..])
    };
    rounds(a)
        .iter()
        .zip(rounds(b))
        .filter_map(|(x, y)| match (x, y) {
            (Ok(x), Ok(y)) if y.value > 0.0 => Some(x.value / y.value),
            _ => None,
        })
        .collect()
}

/// For sorted round ratios, the order statistics that bound their true median with at least
/// 95% confidence whatever their distribution: the k-th lowest and k-th highest, k the largest
/// with P(Binomial(n, ½) < k) ≤ 2.5% (for 15 rounds, the 4th and the 12th: 96.5%). `None`
/// under 6 rounds, too few for such an interval.
fn median_interval(sorted: &[f64]) -> Option<(f64, f64)> {
    let n = sorted.len();
    // P(X ≤ j) for X ~ Binomial(n, 1/2), j = 0, 1, ...
    let mut below = 0.0;
    let mut k = 0;
    let mut coef = 1.0_f64; // C(n, j)
    for j in 0..n {
        below += coef * 0.5_f64.powi(n as i32);
        if below > 0.025 {
            break;
        }
        k = j + 1;
        coef = coef * (n - j) as f64 / (j + 1) as f64;
    }
    (k >= 1).then(|| (sorted[k - 1], sorted[n - k]))
}

fn range(v: &[f64]) -> Option<(f64, f64)> {
    let lo = v.iter().copied().reduce(f64::min)?;
    let hi = v.iter().copied().reduce(f64::max)?;
    Some((lo, hi))
}

/// A ratio A / B of two series of rounds: medians over medians, and the range the rounds
/// allow (A's lowest over B's highest to A's highest over B's lowest).
struct Ratio {
    what: String,
    ratio: Option<f64>,
    band: Option<(f64, f64)>,
    /// Paired ratios: the lowest and highest round ratio, beside the interval in `band`.
    extremes: Option<(f64, f64)>,
    rounds: usize,
}

impl Ratio {
    fn new(what: String, a: &[f64], b: &[f64]) -> Ratio {
        let band = match (range(a), range(b)) {
            (Some((a_lo, a_hi)), Some((b_lo, b_hi))) if b_lo > 0.0 => {
                Some((a_lo / b_hi, a_hi / b_lo))
            }
            _ => None,
        };
        Ratio {
            what,
            ratio: band.map(|_| common::median(a.to_vec()) / common::median(b.to_vec())),
            band,
            extremes: None,
            rounds: a.len().min(b.len()),
        }
    }

    /// A ratio taken round by round, from rounds run side by side (`paired`): the median of
    /// the round ratios and, as its range, a distribution-free 95% confidence interval of that
    /// median (see [`median_interval`]); the lowest and highest round ratio are kept for the
    /// report.
    fn paired(what: String, mut ratios: Vec<f64>) -> Ratio {
        ratios.sort_by(f64::total_cmp);
        Ratio {
            what: format!("{what} (paired)"),
            band: median_interval(&ratios),
            extremes: range(&ratios),
            rounds: ratios.len(),
            ratio: (!ratios.is_empty()).then(|| common::median(ratios)),
        }
    }

    /// PASS only when the whole range clears `bound` (at least), MISS only when all of it
    /// misses; otherwise within noise; one round gives no verdict.
    fn verdict(&self, bound: f64) -> &'static str {
        let Some((lo, hi)) = self.band else {
            return "n/a";
        };
        if self.rounds < 2 {
            "1 round: no spread"
        } else if lo >= bound {
            "PASS"
        } else if hi < bound {
            "MISS"
        } else {
            "within noise"
        }
    }

    fn ratio_text(&self, bound: Option<f64>) -> String {
        match (self.ratio, bound) {
            (Some(r), Some(b)) => format!("{r:.2} ({:+.0}%)", (r / b - 1.0) * 100.0),
            (Some(r), None) => format!("{r:.2}"),
            _ => "—".to_owned(),
        }
    }

    fn band_text(&self) -> String {
        let band = self
            .band
            .map_or("—".to_owned(), |(lo, hi)| format!("{lo:.2}–{hi:.2}"));
        match self.extremes {
            Some((lo, hi)) => format!("{band} (rounds {lo:.2}–{hi:.2})"),
            None => band,
        }
    }
}

/// Issue 15's targets: (what, A, B, point, bound), A / B ≥ bound.
fn targets(res: &Results) -> String {
    let mut checks: Vec<(Ratio, f64)> = Vec::new();
    // Connection churn against tokio-rustls, with and without resumption; the contenders ran
    // side by side, so round by round. Event dispatch is the tokio-like model (a few workers
    // on one epoll set); thread and pool hold a thread per connection.
    for resume in [true, false] {
        let p = Point::Connect { resume };
        let kind = if resume { "resumed" } else { "full handshake" };
        let list: &[&str] = if resume {
            &[THREAD, POOL, EVENT]
        } else {
            &[THREAD, EVENT]
        };
        for &a in list {
            let what = format!("TLS connect+echo+close ({kind}): {a} ≥ 1.0 × {TOKIO_TLS}");
            checks.push((Ratio::paired(what, paired(res, p, a, TOKIO_TLS)), 1.0));
        }
    }
    for n in [1, 16, 128] {
        for a in [THREAD, POOL, EVENT] {
            let what = format!("TLS echo {n} conns: {a} round trips/s ≥ 0.95 × {STD_TLS}");
            let p = Point::Echo(n);
            let r = Ratio::new(what, &values(res, p, a), &values(res, p, STD_TLS));
            checks.push((r, 0.95));
        }
    }
    let mut out = String::from(
        "| target | ratio (margin) | range over rounds | verdict |\n|---|--:|--:|:-:|\n",
    );
    for (c, bound) in &checks {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            c.what,
            c.ratio_text(Some(*bound)),
            c.band_text(),
            c.verdict(*bound)
        ));
    }
    out
}

/// Ratios reported without a target, by the same rule.
fn other_ratios(res: &Results) -> String {
    let mut rs = Vec::new();
    let (resumed, full) = (
        Point::Connect { resume: true },
        Point::Connect { resume: false },
    );
    // What a connection costs the server: with two cores the load generator's core is as busy
    // as the server's, so the rates above measure it too.
    for resume in [true, false] {
        let p = Point::ConnectCpu { resume };
        let kind = if resume { "resumed" } else { "full handshake" };
        for a in [THREAD, POOL, EVENT] {
            rs.push(Ratio::paired(
                format!("connect+echo+close per server CPU-second ({kind}): {a} / {TOKIO_TLS}"),
                paired(res, p, a, TOKIO_TLS),
            ));
        }
    }
    for c in [THREAD, POOL, EVENT, STD_TLS, TOKIO_TLS] {
        rs.push(Ratio::new(
            format!("{c}: connect+echo+close/s, resumed / full handshake"),
            &values(res, resumed, c),
            &values(res, full, c),
        ));
    }
    rs.push(Ratio::new(
        format!("idle KiB per connection: {THREAD} TLS / plaintext"),
        &values(res, Point::Idle, THREAD),
        &values(res, Point::Idle, THREAD_PLAIN),
    ));
    for c in [STD_TLS, TOKIO_TLS] {
        rs.push(Ratio::new(
            format!("idle KiB per TLS connection: {THREAD} / {c}"),
            &values(res, Point::Idle, THREAD),
            &values(res, Point::Idle, c),
        ));
    }
    rs.push(Ratio::new(
        format!("idle KiB per TLS connection: {EVENT} / {TOKIO_TLS}"),
        &values(res, Point::Idle, EVENT),
        &values(res, Point::Idle, TOKIO_TLS),
    ));
    rs.push(Ratio::new(
        "idle KiB per connection: socketserver event TLS / plaintext".to_owned(),
        &values(res, Point::Idle, EVENT),
        &values(res, Point::Idle, EVENT_PLAIN),
    ));
    for n in [1, 16, 128] {
        let p = Point::Plain(n);
        rs.push(Ratio::new(
            format!("plaintext echo {n} conns: {THREAD_TLS_BUILT} / {STD_PLAIN}"),
            &values(res, p, THREAD_TLS_BUILT),
            &values(res, p, STD_PLAIN),
        ));
    }
    let mut out = String::from("| figure | ratio | range over rounds |\n|---|--:|--:|\n");
    for r in &rs {
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            r.what,
            r.ratio_text(None),
            r.band_text()
        ));
    }
    out
}

fn fmt_value(p: Point, v: f64) -> String {
    match p {
        Point::Idle => format!("{v:.1}"),
        _ => format!("{v:.0}"),
    }
}

/// Per point and contender: the median, the spread (lowest–highest round, and that width as a
/// share of the median) and every round in the order run.
fn rounds_table(res: &Results) -> String {
    let mut out = String::from(
        "| point | contender | median | spread (min–max) | every round |\n|---|---|--:|--:|---|\n",
    );
    for (p, entries) in res {
        for (label, rounds) in entries {
            let v: Vec<f64> = rounds.iter().flatten().map(|r| r.value).collect();
            if v.is_empty() {
                out.push_str(&format!(
                    "| {} | {label} | — | — | every round failed (see failed runs above) |\n",
                    p.name()
                ));
                continue;
            }
            let med = common::median(v.clone());
            let spread = range(&v).map_or("—".to_owned(), |(lo, hi)| {
                let width = if med > 0.0 {
                    format!(" ({:.0}%)", (hi - lo) / med * 100.0)
                } else {
                    String::new()
                };
                format!("{}–{}{width}", fmt_value(*p, lo), fmt_value(*p, hi))
            });
            let all: Vec<String> = rounds
                .iter()
                .map(|r| match r {
                    Ok(r) => format!("{}{}", fmt_value(*p, r.value), r.note),
                    Err(_) => "failed".to_owned(),
                })
                .collect();
            out.push_str(&format!(
                "| {} | {label} | {} | {spread} | {} |\n",
                p.name(),
                fmt_value(*p, med),
                all.join(", ")
            ));
        }
    }
    out
}

/// The failed runs, one line per point, contender and distinct error, with how many rounds
/// it failed; empty when none failed.
fn errors(res: &Results) -> String {
    let mut out = String::new();
    for (p, entries) in res {
        for (label, rounds) in entries {
            let mut seen: Vec<(&str, usize)> = Vec::new();
            for e in rounds.iter().filter_map(|r| r.as_ref().err()) {
                match seen.iter_mut().find(|(m, _)| *m == e) {
                    Some((_, n)) => *n += 1,
                    None => seen.push((e, 1)),
                }
            }
            for (msg, n) in seen {
                out.push_str(&format!(
                    "- {}, {label}: {n} of {} round(s) failed: {msg}\n",
                    p.name(),
                    rounds.len()
                ));
            }
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter().position(|a| a == flag).map(|i| {
            args.get(i + 1)
                .unwrap_or_else(|| fail(&format!("{flag} needs a value")))
        })
    };
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--quick" | "--unpinned" => i += 1,
            "--rounds" | "--out" | "--points" => i += 2,
            a => fail(&format!(
                "unknown argument {a}; usage: tls_bench [--quick] [--rounds N] [--unpinned] \
                 [--points TEXT] [--out FILE]"
            )),
        }
    }
    let quick = args.iter().any(|a| a == "--quick");
    let unpinned = args.iter().any(|a| a == "--unpinned");
    let rounds: usize = value("--rounds").map_or(if quick { 1 } else { 5 }, |v| {
        v.parse()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(|| fail("--rounds needs a positive number"))
    });
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // A quick look, or one at some points only, goes where the main benchmark's goes
    // (git-ignored), never over the committed results.
    let default_out = if quick || value("--points").is_some() {
        "bench/results-quick.md"
    } else {
        "bench/results.md"
    };
    let out = value("--out").map_or(root.join(default_out), PathBuf::from);
    // Before the run, not after it: the file must be readable (or absent) and its section's
    // markers well formed, or the report would have nowhere to go.
    if let Err(e) = previous_results(&out).and_then(|old| common::carry_tls_section(&old, "")) {
        fail(&format!("{}: {e}", out.display()));
    }
    // Before this process is pinned to one core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = !unpinned
        && Command::new("taskset")
            .args(["-c", "1", "true"])
            .status()
            .is_ok_and(|s| s.success());
    if pinned {
        let mut set = rustix::thread::CpuSet::new();
        set.set(0);
        let _ = rustix::thread::sched_setaffinity(None, &set);
    }
    let began = Instant::now();
    let (echo_server, tls_echo, std_echo) = build(root);
    let dir = std::env::temp_dir().join(format!("tls-bench-{}", std::process::id()));
    let ca = make_certs(&dir);
    let (cert, key) = (
        dir.join("server.pem").to_string_lossy().into_owned(),
        dir.join("server.key").to_string_lossy().into_owned(),
    );
    // As tokio-rustls's runtime: one worker pinned to the server's core, one per core unpinned.
    let event_workers = if pinned { 1 } else { cores }.to_string();
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let ss = |mode: &[&str]| {
        let mut a = strings(&["--addr", "{addr}", "--tls-cert", &cert, "--tls-key", &key]);
        a.extend(strings(mode));
        a
    };
    let contender = |label: &'static str| -> Contender {
        let (program, args) = match label {
            THREAD => (&echo_server, ss(&["--mode", "thread"])),
            POOL => (&echo_server, ss(&["--mode", "pool", "--workers", "128"])),
            EVENT => (
                &echo_server,
                ss(&["--mode", "event", "--workers", &event_workers]),
            ),
            EVENT_PLAIN => (
                &echo_server,
                strings(&[
                    "--addr",
                    "{addr}",
                    "--mode",
                    "event",
                    "--workers",
                    &event_workers,
                ]),
            ),
            STD_TLS => (
                &tls_echo,
                strings(&[
                    "--impl", "std", "--addr", "{addr}", "--cert", &cert, "--key", &key,
                ]),
            ),
            TOKIO_TLS => (
                &tls_echo,
                strings(&[
                    "--impl",
                    "tokio",
                    "--runtime",
                    "{runtime}",
                    "--addr",
                    "{addr}",
                    "--cert",
                    &cert,
                    "--key",
                    &key,
                ]),
            ),
            THREAD_PLAIN | THREAD_TLS_BUILT => (
                &echo_server,
                strings(&["--addr", "{addr}", "--mode", "thread"]),
            ),
            _ => (&std_echo, strings(&["--addr", "{addr}"])),
        };
        Contender {
            label,
            program: program.clone(),
            args,
        }
    };
    // 4 s per run (5 before the event contender), to keep a full run near 14 minutes.
    let d = Duration::from_secs(if quick { 2 } else { 4 });
    // Connect points: many short turns, paired round by round (see the loop below).
    let connect_d = Duration::from_millis(if quick { 500 } else { 1000 });
    let connect_rounds = (3 * rounds).max(2);
    let log = dir.join("server.log");
    let idle_n = if quick { 300 } else { 2000 };
    let resume = client_config(&ca, true);
    let full = client_config(&ca, false);
    let plan = [
        Point::Connect { resume: true },
        Point::Connect { resume: false },
        Point::Echo(1),
        Point::Echo(16),
        Point::Echo(128),
        Point::Idle,
        Point::Plain(1),
        Point::Plain(16),
        Point::Plain(128),
    ];
    // `--points connect`: only the points whose name contains the text (a partial run, for a
    // look at one figure; its report says which points it has).
    let only = value("--points");
    let plan = plan
        .into_iter()
        .filter(|p| only.is_none_or(|o| p.name().contains(o.as_str())));
    let mut res: Results = Vec::new();
    for p in plan {
        let list = p.contenders();
        let mut entries: Vec<(&'static str, Vec<Result<Round, String>>)> =
            list.iter().map(|&l| (l, Vec::new())).collect();
        // Connect points: every contender's server runs side by side for the whole point and
        // takes short turns under load, so that each round of one contender has a round of
        // every other next to it in time. The ratio of a target is then taken round by round
        // (paired), which cancels what the host's load does over minutes. The other points keep
        // a fresh server per round.
        let side_by_side: Option<Vec<Result<Running, String>>> = match p {
            Point::Connect { .. } => Some(
                list.iter()
                    .map(|&l| start(&contender(l), pinned, &log))
                    .collect(),
            ),
            _ => None,
        };
        let turns = if side_by_side.is_some() {
            connect_rounds
        } else {
            rounds
        };
        for round in 0..turns {
            // A B C … then … C B A: drift over time hits every contender alike.
            let order: Vec<usize> = if round % 2 == 0 {
                (0..list.len()).collect()
            } else {
                (0..list.len()).rev().collect()
            };
            for i in order {
                let c = contender(list[i]);
                let figure = |value: f64| Round {
                    value,
                    note: String::new(),
                    per_cpu: None,
                };
                let measure = |r: &Running| match p {
                    Point::Connect { resume: on } => {
                        let config = if on { &resume } else { &full };
                        let m = connect_cycle(r.addr, config, connect_d, r.child.id());
                        let failed = match (m.failed, &m.last_error) {
                            (0, _) => String::new(),
                            (n, Some(e)) => format!(", {n} failed cycles, the last: {e}"),
                            (n, None) => format!(", {n} failed cycles"),
                        };
                        if m.rate == 0.0 {
                            return Err(format!("no cycle completed{failed}"));
                        }
                        Ok(Round {
                            value: m.rate,
                            note: format!(" [{:.0}% resumed{failed}]", m.resumed * 100.0),
                            per_cpu: m.per_cpu,
                        })
                    }
                    Point::Echo(n) => echo(r.addr, &full, n, d).map(figure),
                    Point::Idle => {
                        let tls = (!plaintext(c.label)).then_some(&full);
                        idle(r, tls, idle_n).map(figure)
                    }
                    Point::Plain(n) => plain_echo(r.addr, n, d).map(figure),
                    // Derived from the connect runs, never run itself.
                    Point::ConnectCpu { .. } => Err("not a run".to_owned()),
                };
                let measured = match &side_by_side {
                    Some(servers) => servers[i].as_ref().map_err(|e| e.clone()).and_then(measure),
                    None => start(&c, pinned, &log).and_then(|r| measure(&r)),
                };
                eprintln!(
                    "[{} | round {}/{turns}] {:<36} {}",
                    p.name(),
                    round + 1,
                    c.label,
                    match &measured {
                        Ok(m) => format!("{}{}", fmt_value(p, m.value), m.note),
                        Err(e) => format!("FAILED: {e}"),
                    }
                );
                entries[i].1.push(measured);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        drop(side_by_side);
        // A connect run's cost: the same rounds, per second of the server's CPU time.
        if let Point::Connect { resume } = p {
            let cost = entries
                .iter()
                .map(|(label, rounds)| {
                    let rounds = rounds
                        .iter()
                        .map(|r| match r {
                            Ok(Round {
                                per_cpu: Some(v), ..
                            }) => Ok(Round {
                                value: *v,
                                note: String::new(),
                                per_cpu: None,
                            }),
                            Ok(_) => Err("no CPU time read for the server".to_owned()),
                            Err(e) => Err(e.clone()),
                        })
                        .collect();
                    (*label, rounds)
                })
                .collect();
            res.push((p, entries));
            res.push((Point::ConnectCpu { resume }, cost));
        } else {
            res.push((p, entries));
        }
    }
    let cmd = if args.is_empty() {
        "cargo run --release -p socketserver-bench --bin tls_bench".to_owned()
    } else {
        format!(
            "cargo run --release -p socketserver-bench --bin tls_bench -- {}",
            args.join(" ")
        )
    };
    let mut md = format!("{}\n## TLS benchmark (issue 15)\n\n", common::TLS_BEGIN);
    md.push_str(
        "Written by `tls_bench` between the two comment lines around it, which the main \
         benchmark carries over unchanged when it rewrites this file.\n\n",
    );
    md.push_str(&format!("- date: {}\n", common::today()));
    md.push_str(&format!(
        "- machine: {cores} cores, Linux {}\n",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    ));
    md.push_str(&format!("- command: `{cmd}`\n"));
    md.push_str(&format!(
        "- mode: {}; {rounds} alternating round(s) per point, every contender on a fresh \
         server process each round, median and spread reported; {} s measured per \
         connect/echo run; {idle_n} idle connections\n",
        if quick { "quick" } else { "full" },
        d.as_secs()
    ));
    md.push_str(&format!(
        "- sweep: {}\n",
        if pinned {
            "pinned, server on core 1, load generator on core 0; tokio-rustls on a \
             current-thread runtime"
        } else {
            "unpinned, servers and load generator free on all cores; tokio-rustls on the \
             multi-thread runtime"
        }
    ));
    md.push_str(&format!(
        "- wall time: {:.0} s\n",
        began.elapsed().as_secs_f64()
    ));
    md.push_str(
        "- rustls 0.23 + ring on both sides, the configuration `socketserver::Tls` builds (TLS \
         1.2 and 1.3, session tickets), an ECDSA P-256 certificate generated at start, 64-byte \
         messages; connect: 8 client threads, each connect → handshake → echo → close_notify → \
         close, every server answering the client's close_notify with its own (RFC 8446 6.1) and \
         shutting its write half; idle: connections opened and checked with one echo, server VmRSS growth / \
         connections, each checked to echo again afterwards (the pool is left out: 128 workers \
         cannot hold them); plaintext echo: `echo_server` built with `--features tls`, no \
         `--tls-cert`, beside `std_echo`\n",
    );
    md.push_str(&format!(
        "- socketserver event: `echo_server --mode event --workers {event_workers}` (TLS \
         connections parked in one epoll set between messages, the model of tokio's runtime: \
         one worker pinned, as tokio's current-thread runtime, a worker per core unpinned); \
         socketserver event, plaintext: the same without `--tls-cert`, for the idle figure\n\n"
    ));
    let failures = errors(&res);
    if !failures.is_empty() {
        md.push_str(&format!(
            "**Failed runs** (left out of every ratio):\n\n{failures}\n"
        ));
    }
    md.push_str("### TLS targets\n\n");
    md.push_str(common::TARGETS_RULE);
    md.push_str(
        "The connect points are run differently: every contender's server runs side by side \
         for the whole point, and they take turns of a second under load, alternating their \
         order, so that round r of each contender is next to round r of every other in time. \
         Their ratios, marked (paired), are taken round by round: the median of the round \
         ratios, with a distribution-free 95% confidence interval of that median as its range \
         (the k-th lowest and k-th highest round ratio, k from the binomial distribution: the \
         4th and 12th of 15), and the lowest and highest round ratio beside it. The verdict \
         rule is the same over that interval. Why not the lowest and highest: with one-second \
         turns on this shared host a single round moves by ±20%, and the lowest-to-highest \
         range only widens as rounds are added, so it never decides a ratio near its bound; \
         the interval narrows as they are.\n\n",
    );
    md.push_str(&targets(&res));
    md.push_str(
        "\n### TLS: other ratios (no target)\n\nThe same rule for ratio and range; no bound, no \
         verdict.\n\n",
    );
    md.push_str(&other_ratios(&res));
    md.push_str(
        "\n### TLS: every round\n\nMedian over rounds; spread: the lowest and highest round, and that \
         width as a share of the median; rounds in the order run (alternating the contenders' \
         order from one round to the next).\n\n",
    );
    md.push_str(&rounds_table(&res));
    md.push_str(common::TLS_END);
    md.push('\n');
    print!("{md}");
    let written = previous_results(&out)
        .and_then(|old| common::carry_tls_section(&old, &md))
        .and_then(|new| std::fs::write(&out, new).map_err(|e| e.to_string()));
    if let Err(e) = written {
        fail(&format!("{}: {e}", out.display()));
    }
    eprintln!("wrote the tls_bench section of {}", out.display());
    let _ = std::fs::remove_dir_all(&dir);
    if !failures.is_empty() {
        eprintln!("tls_bench: some runs failed:\n{failures}");
        std::process::exit(1);
    }
}

/// The results file the section goes into, empty if there is none yet.
fn previous_results(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        r => r.map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The interval's ranks are the binomial ones (tables of the sign test): 15 rounds, the
    /// 4th and 12th; 6 rounds, the 1st and 6th; under 6, none.
    #[test]
    fn the_median_interval_takes_the_binomial_ranks() {
        let v: Vec<f64> = (1..=15).map(f64::from).collect();
        assert_eq!(median_interval(&v), Some((4.0, 12.0)));
        let v: Vec<f64> = (1..=6).map(f64::from).collect();
        assert_eq!(median_interval(&v), Some((1.0, 6.0)));
        let v: Vec<f64> = (1..=5).map(f64::from).collect();
        assert_eq!(median_interval(&v), None);
        let v: Vec<f64> = (1..=30).map(f64::from).collect();
        assert_eq!(median_interval(&v), Some((10.0, 21.0)));
    }

    /// Paired ratios are taken round by round, rounds where either side failed left out.
    #[test]
    fn paired_ratios_match_rounds_by_index() {
        let round = |v: f64| {
            Ok(Round {
                value: v,
                note: String::new(),
                per_cpu: None,
            })
        };
        let p = Point::Connect { resume: true };
        let res: Results = vec![(
            p,
            vec![
                (EVENT, vec![round(2.0), Err("x".into()), round(9.0)]),
                (TOKIO_TLS, vec![round(1.0), round(1.0), round(3.0)]),
            ],
        )];
        assert_eq!(paired(&res, p, EVENT, TOKIO_TLS), vec![2.0, 3.0]);
    }

    /// A server that refuses its configuration (as `echo_server --mode event --tls-cert` did
    /// before event mode served TLS) is an error carrying its message, at once, not a hang.
    #[test]
    fn a_server_that_refuses_to_start_is_an_error_with_its_message() {
        let dir = std::env::temp_dir().join(format!("tls-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = Contender {
            label: EVENT,
            program: PathBuf::from("sh"),
            args: vec![
                "-c".into(),
                "echo 'error: invalid configuration: {addr}' >&2; exit 1".into(),
            ],
        };
        let began = Instant::now();
        let err = match start(&c, false, &dir.join("server.log")) {
            Ok(_) => panic!("a server that exits was taken as listening"),
            Err(e) => e,
        };
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "took {:?}",
            began.elapsed()
        );
        assert!(err.contains("exited before listening"), "{err}");
        assert!(
            err.contains("error: invalid configuration: 127.0.0.1:"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
