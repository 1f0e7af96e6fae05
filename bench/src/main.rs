//! Benchmark: this crate's `echo_server` against a minimal std::net thread-per-connection echo
//! server, a tokio echo server and Python's `socketserver.ThreadingTCPServer`, on loopback, in
//! one run on one machine; and, for event dispatch (issue 13), an echo server on net-io 0.4, the
//! closest blocking peer.
//!
//! ```text
//! cargo run --release -p socketserver-bench -- [--quick] [--rounds N] [--secs S] [--idle N]
//!     [--only echo,connect,idle] [--conns 1,16,128]
//!     [--contenders std,std-pool,tokio,thread,pool,python,event,netio,prefork,metrics]
//!     [--pin both|on|off] [--no-pin] [--no-python] [--no-build] [--out DIR]
//! ```
//!
//! It builds the contenders, then measures two sweeps: pinned (each server on core 1, the load
//! generator on core 0) and unpinned (both free on every core, as users run servers). In each,
//! every scenario point runs every contender once per round, alternating the order
//! (A B … B A …), each on a fresh server process, and reports the median and the spread of the
//! rounds; a target is PASS or MISS only when its margin exceeds that spread. A run during which
//! other processes took a tenth of the cores is flagged and, within a budget, run again.
//! Results go to stdout, `bench/results.md` and `bench/echo.svg` (with `--quick`,
//! `results-quick.md` and `echo-quick.svg`, so that a quick look never replaces a full run's
//! committed results).
//! results.md also holds `tls_bench`'s report, between the lines `<!-- tls_bench: begin -->`
//! and `<!-- tls_bench: end -->`: a run carries that section over from the file it replaces,
//! unchanged (`common::carry_tls_section`).

mod common;
mod contender;
mod kmem;
mod load;
mod report;
mod targets_event;
mod targets_metrics;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use socketserver::Digest;

use contender::{Contender, Kind, Programs, Server};
use report::{Entry, Point, Sweep, Verdict};

const USAGE: &str = "\
usage: socketserver-bench [--quick] [--rounds N] [--secs S] [--idle N]
                          [--only echo,connect,idle] [--conns 1,16,128]
                          [--contenders std,std-pool,tokio,thread,pool,python,event,netio,prefork,metrics]
                          [--pin both|on|off] [--no-pin] [--no-python] [--no-build]
                          [--out DIR]

  --quick       a short run (about 1.5 minutes): 1 round, so no verdicts; 0.5 s windows,
                3000 idle connections
  --rounds N    alternating rounds per point; the median and the spread are reported (default 5;
                idle at most 3)
  --secs S      measured seconds per echo/connect run (default 1.2)
  --idle N      idle connections to hold (default 9000; 3000 with --quick); 19000 checks
                issue 13's idle target (the descriptor limit must allow it)
  --only LIST   scenarios to run (default echo,connect,idle)
  --conns LIST  connection counts of the echo scenario (default 1,16,128)
  --contenders LIST
                which servers to run (default all:
                std,std-pool,tokio,thread,pool,python,event,netio,prefork,metrics); std is
                the baseline of every ratio; std-pool runs in the connect scenario; event is
                echo_server --mode event (issue 13); netio is net-io 0.4 (echo and connect);
                prefork is echo_server --processes 2 (issue 16, echo and connect); metrics is
                thread mode built with the metrics and tracing features, --metrics-addr on
                (echo and connect, issue 17)
  --pin WHICH   both (default): a pinned sweep (server on core 1, load generator on core 0,
                tokio on a current-thread runtime), then an unpinned one (every core free,
                tokio multi-thread); on: pinned only; off: unpinned only
  --no-pin      the same as --pin off
  --no-python   leave out the Python contenders
  --no-build    use the programs next to this binary instead of building them
  --out DIR     where results.md and echo.svg go, created if missing (default: the bench
                crate's directory; --quick writes results-quick.md and echo-quick.svg)";

/// A run in which other processes took at least this share of the benchmark's cores is
/// flagged, and run again while the retry budget lasts.
const BUSY: f64 = 0.10;

/// The run's settings.
#[derive(Debug, Clone)]
struct Config {
    quick: bool,
    rounds: usize,
    idle_rounds: usize,
    window: Duration,
    warmup: Duration,
    hold: Duration,
    idle: usize,
    echo_conns: Vec<usize>,
    connect_clients: usize,
    scenarios: Vec<String>,
    kinds: Vec<Kind>,
    /// The sweeps to run, in order: true pinned, false unpinned.
    sweeps: Vec<bool>,
    python: bool,
    build: bool,
    out: PathBuf,
    args: Vec<String>,
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}\n\n{USAGE}");
    std::process::exit(2)
}

fn parse_args() -> Config {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut c = Config {
        quick: false,
        rounds: 5,
        idle_rounds: 3,
        window: Duration::from_millis(1200),
        warmup: Duration::from_millis(300),
        hold: Duration::from_millis(1000),
        idle: 9000,
        echo_conns: vec![1, 16, 128],
        connect_clients: 8,
        scenarios: vec!["echo".into(), "connect".into(), "idle".into()],
        kinds: vec![
            Kind::Std,
            Kind::StdPool,
            Kind::Tokio,
            Kind::Thread,
            Kind::Pool,
            Kind::Python,
            Kind::ThreadProxy,
            Kind::Event,
            Kind::NetIo,
            Kind::Prefork,
            Kind::Metrics,
        ],
        sweeps: vec![true, false],
        python: true,
        build: true,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        args: args.clone(),
    };
    let (mut rounds, mut secs, mut idle) = (None, None, None);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| fail(&format!("{name} needs a value")))
        };
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--quick" => c.quick = true,
            "--no-pin" => c.sweeps = vec![false],
            "--pin" => {
                c.sweeps = match value("--pin").as_str() {
                    "both" => vec![true, false],
                    "on" => vec![true],
                    "off" => vec![false],
                    other => fail(&format!("--pin takes both, on or off, not {other:?}")),
                }
            }
            "--no-python" => c.python = false,
            "--no-build" => c.build = false,
            "--rounds" => {
                rounds = Some(
                    value("--rounds")
                        .parse::<usize>()
                        .unwrap_or_else(|_| fail("bad --rounds")),
                )
            }
            "--secs" => {
                secs = Some(
                    value("--secs")
                        .parse::<f64>()
                        .unwrap_or_else(|_| fail("bad --secs")),
                )
            }
            "--idle" => {
                idle = Some(
                    value("--idle")
                        .parse::<usize>()
                        .unwrap_or_else(|_| fail("bad --idle")),
                )
            }
            "--out" => c.out = PathBuf::from(value("--out")),
            "--only" => {
                c.scenarios = value("--only").split(',').map(str::to_owned).collect();
                if let Some(bad) = c
                    .scenarios
                    .iter()
                    .find(|s| !["echo", "connect", "idle"].contains(&s.as_str()))
                {
                    fail(&format!("unknown scenario {bad:?}"));
                }
            }
            "--conns" => {
                c.echo_conns = value("--conns")
                    .split(',')
                    .map(|n| match n.parse::<usize>() {
                        Ok(n) if n > 0 => n,
                        _ => fail(&format!("bad connection count {n:?}")),
                    })
                    .collect();
            }
            "--contenders" => {
                c.kinds = value("--contenders")
                    .split(',')
                    .map(|k| match k {
                        "std" => Kind::Std,
                        "std-pool" => Kind::StdPool,
                        "tokio" => Kind::Tokio,
                        "thread" => Kind::Thread,
                        "pool" => Kind::Pool,
                        "python" => Kind::Python,
                        "metrics" => Kind::Metrics,
                        "thread-proxy" => Kind::ThreadProxy,
                        "event" => Kind::Event,
                        "netio" | "net-io" => Kind::NetIo,
                        "prefork" => Kind::Prefork,
                        _ => fail(&format!("unknown contender {k:?}")),
                    })
                    .collect();
            }
            other => fail(&format!("unexpected argument {other:?}")),
        }
    }
    if c.quick {
        c.rounds = 1;
        c.window = Duration::from_millis(500);
        c.warmup = Duration::from_millis(200);
        c.hold = Duration::from_millis(300);
        c.idle = 3000;
    }
    if let Some(r) = rounds {
        c.rounds = r.max(1);
    }
    c.idle_rounds = c.rounds.min(3);
    if let Some(s) = secs {
        if !(s > 0.0 && s < 600.0) {
            fail("--secs must be between 0 and 600");
        }
        c.window = Duration::from_secs_f64(s);
    }
    if let Some(n) = idle {
        c.idle = n.max(1);
    }
    c
}

/// Creates the output directory if need be and checks that a file can be written there, so that
/// a bad `--out` fails before the run rather than after it.
fn prepare_out(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let probe = dir.join(format!(".socketserver-bench-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| format!("cannot write in {}: {e}", dir.display()))
}

/// Runs cargo to build `what`, returning the executables it reports.
fn cargo_build(root: &Path, what: &[&str]) -> Result<Vec<PathBuf>, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
        ])
        .args(what)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo build {} failed", what.join(" ")));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    const KEY: &str = "\"executable\":\"";
    Ok(text
        .lines()
        .filter_map(|l| {
            let start = l.find(KEY)? + KEY.len();
            let end = start + l[start..].find('"')?;
            Some(PathBuf::from(&l[start..end]))
        })
        .collect())
}

/// Builds (or, with `--no-build`, finds) the contenders' programs.
fn programs(c: &Config) -> Result<Programs, String> {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = bench.parent().ok_or("bench crate has no parent")?;
    let (echo_server, std_echo, tokio_echo, netio_echo) = if c.build {
        eprintln!("building the contenders (release)…");
        // The metrics build first: the default one then takes the example's usual path.
        let with_features = cargo_build(
            root,
            &[
                "-p",
                "socketserver",
                "--example",
                "echo_server",
                "--features",
                "metrics,tracing",
            ],
        )?;
        let built = with_features
            .iter()
            .find(|p| p.file_name().is_some_and(|f| f == "echo_server"))
            .ok_or("cargo built no echo_server with metrics")?;
        let copy = built.with_file_name("echo_server_metrics");
        std::fs::copy(built, &copy).map_err(|e| format!("{}: {e}", copy.display()))?;
        let mut exes = cargo_build(root, &["-p", "socketserver", "--example", "echo_server"])?;
        exes.extend(cargo_build(root, &["-p", "socketserver-bench", "--bins"])?);
        let pick = |name: &str| {
            exes.iter()
                .find(|p| p.file_name().is_some_and(|f| f == name))
                .cloned()
                .ok_or(format!("cargo built no {name}"))
        };
        (
            pick("echo_server")?,
            pick("std_echo")?,
            pick("tokio_echo")?,
            pick("netio_echo")?,
        )
    } else {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = me.parent().ok_or("no directory")?.to_path_buf();
        (
            dir.join("examples/echo_server"),
            dir.join("std_echo"),
            dir.join("tokio_echo"),
            dir.join("netio_echo"),
        )
    };
    let echo_server_metrics = echo_server.with_file_name("echo_server_metrics");
    for p in [
        &echo_server,
        &std_echo,
        &tokio_echo,
        &netio_echo,
        &echo_server_metrics,
    ] {
        if !p.exists() {
            return Err(format!(
                "{} is missing (build it or drop --no-build)",
                p.display()
            ));
        }
    }
    let python = if c.python { find_python() } else { None };
    Ok(Programs {
        echo_server,
        std_echo,
        tokio_echo,
        netio_echo,
        python,
        python_script: bench.join("python_echo.py"),
        echo_server_metrics,
    })
}

/// The real Python interpreter (not a shim script, so the PID we sample is Python's own).
fn find_python() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

fn python_version(p: &Programs) -> Option<String> {
    let out = Command::new(p.python.as_ref()?)
        .arg("--version")
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Raises the soft descriptor limit to the hard one (the servers inherit it); returns it.
fn raise_nofile() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Pins this thread (and so every thread it starts later) to `core`, or, with `None`, back to
/// the cores it was given at the start (`all`).
fn pin_self(core: Option<usize>, all: &rustix::thread::CpuSet) -> bool {
    let set = match core {
        Some(core) => {
            let mut one = rustix::thread::CpuSet::new();
            one.set(core);
            one
        }
        None => *all,
    };
    rustix::thread::sched_setaffinity(None, &set).is_ok()
}

fn taskset_works() -> bool {
    Command::new("taskset")
        .args(["-c", "0", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The contenders of one scenario.
fn contenders(point: Point, python: bool, kinds: &[Kind]) -> Vec<Contender> {
    use Kind::*;
    let p = Contender::plain;
    let a = Contender::with_auth;
    let mut v = match point {
        Point::Echo(_) => vec![p(Std), p(Tokio), p(Thread), p(Pool), p(Prefork)],
        Point::Connect(_) => vec![
            p(Std),
            p(Tokio),
            p(Thread),
            p(ThreadProxy),
            a(Thread, Digest::Md5),
            a(Thread, Digest::Sha256),
            p(StdPool),
            p(Pool),
            a(Pool, Digest::Md5),
            a(Pool, Digest::Sha256),
            p(Prefork),
        ],
        // A pool of POOL_WORKERS cannot serve thousands of connections at once.
        Point::Idle(_) => vec![p(Std), p(Tokio), p(Thread)],
    };
    // Issue 13: event dispatch, against tokio (with the same handshake too) and net-io, the
    // closest blocking peer. net-io 0.4 holds a worker per connection, at most 4,096: no idle.
    match point {
        Point::Echo(_) => v.extend([p(Event), p(NetIo)]),
        Point::Connect(_) => v.extend([
            a(Tokio, Digest::Md5),
            p(Event),
            a(Event, Digest::Md5),
            p(NetIo),
        ]),
        Point::Idle(_) => v.push(p(Event)),
    }
    // Issue 17: metrics on against off.
    if !matches!(point, Point::Idle(_)) {
        v.push(p(Metrics));
    }
    if python {
        v.push(p(Python));
        if matches!(point, Point::Connect(_)) {
            v.push(a(Python, Digest::Md5));
        }
    }
    v.retain(|c| kinds.contains(&c.kind));
    v
}

/// One contender, one round: a fresh server, the scenario, the server stopped.
fn run_one(
    point: Point,
    c: &Contender,
    cfg: &Config,
    progs: &Programs,
    core: Option<usize>,
    logdir: &Path,
) -> Result<load::Sample, String> {
    crate::contender::send_proxy_header(c.kind == Kind::ThreadProxy);
    let server = Server::start(c, progs, core, logdir)?;
    let nodelay = server.accepted_nodelay(c.auth);
    let (addr, pid) = (server.addr, server.pid);
    // The cores whose time other processes could steal: ours and the server's.
    let cores = core.map(|c| [0, c]);
    let cores = cores.as_ref().map(|c| &c[..]);
    let sample = match point {
        Point::Echo(n) => load::echo(addr, c.auth, n, cfg.warmup, cfg.window, pid, cores),
        Point::Connect(n) => load::connect(addr, c.auth, n, cfg.warmup, cfg.window, pid, cores),
        Point::Idle(n) => load::idle(addr, n, cfg.hold, pid, cores),
    };
    server.stop()?;
    Ok(load::Sample { nodelay, ..sample })
}

fn describe(point: Point) -> String {
    match point {
        Point::Echo(n) => format!("echo, {n} conns"),
        Point::Connect(n) => format!("connect, {n} clients"),
        Point::Idle(n) => format!("idle, {n} conns"),
    }
}

/// What the run found out about its machine and programs before measuring.
struct Setup {
    cores: usize,
    /// The sweeps that will run (true: pinned), in order.
    sweeps: Vec<bool>,
    /// The cores this process may use, restored for the unpinned sweep.
    affinity: rustix::thread::CpuSet,
    progs: Programs,
    python: bool,
    logdir: PathBuf,
}

/// Builds the programs, raises the descriptor limit, pins this process.
fn setup(cfg: &mut Config) -> Result<Setup, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let progs = programs(cfg)?;
    if progs.python.is_none() && cfg.python {
        eprintln!("python3 not found: the Python contenders are left out");
    }
    let python = progs.python.is_some();
    let nofile = raise_nofile();
    if cfg.scenarios.iter().any(|s| s == "idle") && nofile < cfg.idle as u64 + 256 {
        let n = nofile.saturating_sub(256) as usize;
        eprintln!(
            "descriptor limit is {nofile}: holding {n} idle connections instead of {}",
            cfg.idle
        );
        cfg.idle = n.max(1);
    }
    let affinity = rustix::thread::sched_getaffinity(None)
        .map_err(|e| format!("cannot read this process's CPU affinity: {e}"))?;
    let mut sweeps = cfg.sweeps.clone();
    // Pinning is tried here, after the build (so that cargo had every core), and undone: each
    // sweep sets it for itself.
    let can_pin =
        cores >= 2 && taskset_works() && pin_self(Some(0), &affinity) && pin_self(None, &affinity);
    if sweeps.contains(&true) && !can_pin {
        eprintln!("cannot pin (needs 2+ cores, taskset and sched_setaffinity): unpinned only");
        sweeps = vec![false];
    }
    let logdir = std::env::temp_dir().join(format!("socketserver-bench-{}", std::process::id()));
    std::fs::create_dir_all(&logdir).map_err(|e| format!("{}: {e}", logdir.display()))?;
    Ok(Setup {
        cores,
        sweeps,
        affinity,
        progs,
        python,
        logdir,
    })
}

/// The one-line progress report of a run.
fn progress(point: Point, s: &load::Sample) -> String {
    let fig = match point {
        Point::Idle(_) => format!(
            "{:.0} held, RSS {:.1} MiB ({:.1} KiB/conn), kernel {:.1} KiB/conn, {:.0} threads",
            s.rate,
            s.rss_kib / 1024.0,
            s.rss_per_conn / 1024.0,
            (s.kernel_slab_per_conn + s.kernel_stack_per_conn) / 1024.0,
            s.threads
        ),
        _ => format!(
            "{}/s  p50 {}  p99 {}",
            report::fmt_rate(s.rate),
            report::fmt_us(s.p50_us),
            report::fmt_us(s.p99_us)
        ),
    };
    let mut line = fig;
    if s.errors > 0 {
        line += &format!("  ({} errors)", s.errors);
    }
    if s.foreign >= BUSY {
        line += &format!(
            "  (other processes took {:.0}% of the cores)",
            s.foreign * 100.0
        );
    }
    line
}

/// One sweep: every scenario point, rounds of all contenders in alternating order, with the
/// servers pinned to core 1 and this process to core 0, or all of them free. Sets `failed` if
/// a run failed.
fn measure(cfg: &Config, env: &Setup, pinned: bool, failed: &mut bool) -> Sweep {
    let mut plan: Vec<Point> = Vec::new();
    for s in &cfg.scenarios {
        match s.as_str() {
            "echo" => plan.extend(cfg.echo_conns.iter().map(|&n| Point::Echo(n))),
            "connect" => plan.push(Point::Connect(cfg.connect_clients)),
            _ => plan.push(Point::Idle(cfg.idle)),
        }
    }
    let rounds_of = |p: Point| match p {
        Point::Idle(_) => cfg.idle_rounds,
        _ => cfg.rounds,
    };
    let total_runs: usize = plan
        .iter()
        .map(|&p| rounds_of(p) * contenders(p, env.python, &cfg.kinds).len())
        .sum();
    // Reruns of disturbed runs: at most a fifth more runs (and at least one).
    let mut retries_left = (total_runs / 5).max(1);
    // The load generator's threads inherit this thread's affinity.
    let load_core = pinned.then_some(0);
    if !pin_self(load_core, &env.affinity) {
        eprintln!("warning: cannot set the load generator's CPU affinity ({load_core:?})");
    }
    let server_core = pinned.then_some(1);
    let mut m = Sweep {
        pinned,
        results: Vec::new(),
        reruns: 0,
    };
    for point in plan {
        let list = contenders(point, env.python, &cfg.kinds);
        let mut entries: Vec<Entry> = list
            .iter()
            .map(|&c| Entry {
                contender: c,
                samples: Vec::new(),
                failures: Vec::new(),
            })
            .collect();
        let rounds = rounds_of(point);
        for round in 0..rounds {
            // A B C … then … C B A: drift over time hits every contender alike.
            let order: Vec<usize> = if round % 2 == 0 {
                (0..list.len()).collect()
            } else {
                (0..list.len()).rev().collect()
            };
            for i in order {
                let c = &list[i];
                let tag = format!(
                    "[{} | {} | round {}/{rounds}] {:<26}",
                    report::sweep_name(pinned),
                    describe(point),
                    round + 1,
                    c.label()
                );
                loop {
                    let t0 = Instant::now();
                    let r = run_one(point, c, cfg, &env.progs, server_core, &env.logdir);
                    let took = t0.elapsed().as_secs_f64();
                    std::thread::sleep(Duration::from_millis(50));
                    let s = match r {
                        Ok(s) => s,
                        Err(e) => {
                            *failed = true;
                            eprintln!("{tag} FAILED: {e}");
                            entries[i].failures.push(e);
                            break;
                        }
                    };
                    eprintln!("{tag} {}  [{took:.1} s]", progress(point, &s));
                    // A run disturbed by other work says little: run it again while the
                    // retry budget lasts, and keep only the rerun.
                    if s.foreign >= BUSY && retries_left > 0 {
                        retries_left -= 1;
                        m.reruns += 1;
                        eprintln!("{tag} busy machine: running it again");
                        std::thread::sleep(Duration::from_millis(500));
                        continue;
                    }
                    entries[i].samples.push(s);
                    break;
                }
            }
        }
        m.results.push((point, entries));
    }
    m
}

/// What a sweep says about how quiet the machine was, and whether it was too busy to trust.
fn quietness(sweep: &Sweep) -> (String, bool) {
    let (median, max) = report::interference(&sweep.results);
    let busy = max >= BUSY;
    let note = format!(
        "other processes took {:.0}% of the benchmark's cores in the median run, {:.0}% at \
         most{}; {} run(s) rerun because the machine was busy",
        median * 100.0,
        max * 100.0,
        if busy {
            " — a busy machine: rerun on a quiet one before trusting the ratios"
        } else {
            ""
        },
        sweep.reruns
    );
    (note, busy)
}

/// Writes results.md and echo.svg, and prints the tables and targets.
fn report_all(
    cfg: &Config,
    env: &Setup,
    sweeps: &[Sweep],
    elapsed: Duration,
) -> std::io::Result<()> {
    let suffix = if cfg.quick { "-quick" } else { "" };
    let svg_name = format!("echo{suffix}.svg");
    let mut cmd = String::from("cargo run --release -p socketserver-bench --");
    for a in &cfg.args {
        cmd.push(' ');
        cmd.push_str(a);
    }
    let date = common::today();
    let cores = env.cores;
    let names: Vec<&str> = sweeps
        .iter()
        .map(|s| report::sweep_name(s.pinned))
        .collect();
    let sweep_note = sweeps
        .iter()
        .map(|s| {
            if s.pinned {
                "pinned (server on core 1, load generator on core 0: taskset / sched_setaffinity)"
            } else {
                "unpinned (server and load generator free on every core)"
            }
        })
        .collect::<Vec<_>>()
        .join(", then ");
    let checks: Vec<Vec<report::Check>> =
        sweeps.iter().map(|s| report::targets(&s.results)).collect();
    let sets: Vec<(&str, &[report::Check])> = names
        .iter()
        .zip(&checks)
        .map(|(n, c)| (*n, c.as_slice()))
        .collect();
    let targets = report::targets_table(&sets);

    let mut seen: Vec<Contender> = Vec::new();
    for e in sweeps.iter().flat_map(|s| &s.results).flat_map(|(_, e)| e) {
        if !seen.contains(&e.contender) {
            seen.push(e.contender);
        }
    }
    // Read from each server's accepted socket: a contender without it is not like for like.
    // A contender whose every run failed has no socket to read: its failure is reported.
    let measured = |c: &Contender| {
        sweeps
            .iter()
            .flat_map(|s| &s.results)
            .flat_map(|(_, e)| e)
            .any(|e| e.contender == *c && !e.samples.is_empty())
    };
    let without: Vec<String> = seen
        .iter()
        .filter(|c| measured(c) && report::nodelay(sweeps, **c) != "yes")
        .map(|c| format!("{} ({})", c.label(), report::nodelay(sweeps, *c)))
        .collect();
    let nodelay_note = if without.is_empty() {
        "set on accepted connections by every contender (read from the server's socket)".to_owned()
    } else {
        format!(
            "read from each server's accepted socket, not set by: {} — those comparisons are \
             not like for like",
            without.join(", ")
        )
    };

    let mut md = String::new();
    md.push_str("# socketserver benchmark results\n\n");
    md.push_str(&format!("- date: {date}\n"));
    md.push_str(&format!(
        "- machine: {cores} cores, {}, Linux {}\n",
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    ));
    md.push_str(&format!("- command: `{cmd}`\n"));
    md.push_str(&format!(
        "- mode: {}; {} alternating round(s) per point ({} for idle), median and spread \
         reported; {:.1} s measured after {:.1} s warm-up per echo/connect run; {} idle \
         connections\n",
        if cfg.quick { "quick" } else { "full" },
        cfg.rounds,
        cfg.idle_rounds,
        cfg.window.as_secs_f64(),
        cfg.warmup.as_secs_f64(),
        cfg.idle
    ));
    md.push_str(&format!("- sweeps: {sweep_note}\n"));
    if let Some(v) = python_version(&env.progs) {
        md.push_str(&format!("- {v}\n"));
    }
    md.push_str(&format!("- wall time: {:.0} s\n", elapsed.as_secs_f64()));
    md.push_str(&format!("- TCP_NODELAY: {nodelay_note}\n"));
    for s in sweeps {
        let (note, _) = quietness(s);
        md.push_str(&format!(
            "- quietness, {}: {note}\n",
            report::sweep_name(s.pinned)
        ));
    }
    md.push_str(
        "\nEach figure is the median over rounds (errors are summed); in parentheses, its ratio \
         to the `std` baseline. Spread over rounds: the lowest and highest round, and that \
         range's width as a share of the median. Latency: one round trip (echo); the whole \
         connect → [handshake] → echo → close cycle (connect); the first echo on each held \
         connection (idle). Server RSS: peak VmRSS of the server process during the run. RSS \
         per connection: (peak − RSS before connecting) / connections held. Kernel memory, \
         which RSS does not show, per connection held, system-wide before connecting and while \
         held: slab (active objects of /proc/slabinfo: socket, inode, file, epoll item, for \
         both ends of each loopback connection, the client's half the same for every \
         contender) and stacks (the KernelStack and PageTables lines of /proc/meminfo: a \
         thread per connection costs its kernel stack). Server CPU / op: \
         the server process's CPU time (user + system, /proc, 10 ms resolution) over the \
         measured window divided by the operations in it, which tells efficiency apart from \
         whichever side is the bottleneck. Pinned, tokio runs on a current-thread runtime (what \
         a tokio user would pick for one core); unpinned, on the multi-thread runtime.\n\n",
    );
    md.push_str(&format!("![echo round trips/s]({svg_name})\n\n"));
    md.push_str("## Targets\n\n");
    md.push_str(common::TARGETS_RULE);
    md.push_str(&targets);
    for s in sweeps {
        md.push_str(&format!("\n## {}\n\n", s.title(cores)));
        md.push_str(&report::tables(s, "###"));
    }
    md.push_str(
        "## Contenders\n\nTCP_NODELAY: as read from the server's own accepted socket in each \
         run (pidfd_getfd), not as configured.\n\n",
    );
    for c in &seen {
        md.push_str(&format!(
            "- {}: {}. TCP_NODELAY: {}\n",
            c.label(),
            c.describe(),
            report::nodelay(sweeps, *c)
        ));
    }
    md.push_str("\n## Every round\n");
    for s in sweeps {
        md.push_str(&format!("\n### {}\n\n", s.title(cores)));
        md.push_str(&report::raw_rounds(s));
    }

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n{cmd}  ({date}, {cores} cores, {:.0} s)",
        elapsed.as_secs_f64()
    )?;
    for s in sweeps {
        writeln!(out, "\n## {}\n", s.title(cores))?;
        write!(out, "{}", report::tables(s, "###"))?;
    }
    writeln!(out, "## Targets\n\n{targets}")?;
    for (name, checks) in &sets {
        let count = |v| checks.iter().filter(|c| c.verdict() == v).count();
        writeln!(
            out,
            "{name}: {} passed, {} missed, {} within noise, {} without a verdict (1 round)",
            count(Verdict::Pass),
            count(Verdict::Miss),
            count(Verdict::Noise),
            count(Verdict::OneRound)
        )?;
    }
    writeln!(out, "TCP_NODELAY: {nodelay_note}")?;
    for s in sweeps {
        let (note, _) = quietness(s);
        writeln!(out, "quietness, {}: {note}", report::sweep_name(s.pinned))?;
    }

    let md_path = cfg.out.join(format!("results{suffix}.md"));
    write_results(&md_path, &md)?;
    eprintln!("wrote {}", md_path.display());
    let has_echo = |s: &Sweep| s.results.iter().any(|(p, _)| matches!(p, Point::Echo(_)));
    if sweeps.iter().any(has_echo) {
        let panels: Vec<report::Panel> = sweeps
            .iter()
            .filter(|s| has_echo(s))
            .map(|s| report::Panel {
                subtitle: format!(
                    "{} · tokio {} runtime{}",
                    if s.pinned {
                        "Pinned: server on core 1, load generator on core 0"
                    } else {
                        "Unpinned: server and load generator free on every core"
                    },
                    contender::tokio_runtime(s.pinned),
                    if quietness(s).1 {
                        " · BUSY MACHINE: noisy figures"
                    } else {
                        ""
                    }
                ),
                results: &s.results,
            })
            .collect();
        let subtitle = format!(
            "{date} · {cores} cores · bar: median of {} round(s), whisker: their range · same \
             buffer and TCP_NODELAY everywhere",
            cfg.rounds
        );
        let svg_path = cfg.out.join(&svg_name);
        std::fs::write(&svg_path, report::svg(&subtitle, &panels))?;
        eprintln!("wrote {}", svg_path.display());
    }
    Ok(())
}

/// The results file a run is about to replace, empty if there is none yet.
fn previous_results(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        r => r.map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// Writes the report `md` to `path`, carrying over unchanged the section that `tls_bench`
/// wrote into the file it replaces.
fn write_results(path: &Path, md: &str) -> std::io::Result<()> {
    let md = common::carry_tls_section(md, &previous_results(path)?)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
    std::fs::write(path, md)
}

/// Checks, before the run, that the results file it will replace (`path`) can be read and that
/// its `tls_bench` section (which the new file carries over) is well delimited.
fn check_previous_results(path: &Path) -> Result<(), String> {
    let old = previous_results(path).map_err(|e| e.to_string())?;
    common::carry_tls_section("", &old)
        .map(drop)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn main() {
    let mut cfg = parse_args();
    let started = Instant::now();
    // Ctrl-C or SIGTERM mid-run: take the running server down with us.
    if let Err(e) = ctrlc::set_handler(|| {
        contender::kill_current();
        eprintln!("interrupted: server stopped");
        std::process::exit(130);
    }) {
        eprintln!(
            "warning: cannot handle Ctrl-C ({e}); an interrupted run may leave a server behind"
        );
    }
    if let Err(e) = prepare_out(&cfg.out) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let suffix = if cfg.quick { "-quick" } else { "" };
    if let Err(e) = check_previous_results(&cfg.out.join(format!("results{suffix}.md"))) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let env = setup(&mut cfg).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    let mut failed = false;
    let sweeps: Vec<Sweep> = env
        .sweeps
        .iter()
        .map(|&pinned| measure(&cfg, &env, pinned, &mut failed))
        .collect();
    if let Err(e) = report_all(&cfg, &env, &sweeps, started.elapsed()) {
        eprintln!("error: cannot write the results: {e}");
        std::process::exit(1);
    }
    if failed {
        eprintln!(
            "some runs failed; server logs are in {}",
            env.logdir.display()
        );
        std::process::exit(1);
    }
    let _ = std::fs::remove_dir_all(&env.logdir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewriting_results_keeps_the_tls_section() {
        let dir = std::env::temp_dir().join(format!("bench-results-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("results.md");
        // No file yet: the report as it is.
        write_results(&path, "# run 1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# run 1\n");
        // tls_bench's section, as it would have put it in, survives the next run.
        let section = format!(
            "{}\n## TLS benchmark (issue 15)\n| 3158 |\n{}\n",
            common::TLS_BEGIN,
            common::TLS_END
        );
        std::fs::write(&path, format!("# run 1\n\n{section}")).unwrap();
        write_results(&path, "# run 2\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("# run 2\n\n{section}")
        );
        assert!(check_previous_results(&path).is_ok());
        // Broken markers: refused before a run, and the file left as it was.
        let broken = format!("# run 2\n{}\n", common::TLS_BEGIN);
        std::fs::write(&path, &broken).unwrap();
        assert!(check_previous_results(&path).is_err());
        assert!(write_results(&path, "# run 3\n").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), broken);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
