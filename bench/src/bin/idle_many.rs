//! More idle connections than one process may hold: `echo_server --mode event --processes 6`
//! holds 100,000 (issue 23), each answering its check echo, on a machine whose open-file limit
//! is 20,000 per process.
//!
//! ```text
//! cargo run --release -p socketserver-bench --bin idle_many -- [--conns 100000]
//!     [--processes 6] [--clients 6] [--hold SECS] [--no-build] [--out bench/results-idle-100k.md]
//! ```
//! The server is the `echo_server` example in release, started on a free port of 127.0.0.1.
//! The clients are `--clients` processes of this program (the descriptor limit binds them as
//! it binds the server), each holding its share of the connections from its own source
//! address, 127.0.0.2, 127.0.0.3, …, so no address runs out of its 28,000 ephemeral ports. A
//! client opens its connections paced by one echo per 64 (as the main benchmark's idle
//! scenario), reports them held, holds them for `--hold` seconds while the server's memory is
//! read, then checks that every one still echoes, timing each check.
//!
//! Memory: the server's resident memory is the sum of VmRSS over the supervisor and its
//! workers, before the clients connect and while all are held. Kernel memory, which RSS does
//! not show, is read system-wide at the same two moments (see `kmem.rs`): slab objects of both
//! ends of every loopback connection, and kernel stacks and page tables. Each figure is
//! divided by the connections held. The report is written to `--out` and stdout.

#[path = "../common.rs"]
#[allow(dead_code)]
mod common;
#[path = "../kmem.rs"]
mod kmem;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::round_trip;
use kmem::KernelMem;

/// Connections a client opens between two pacing echoes: fewer than the smallest backlog.
const BATCH: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--client") {
        client(&args[1..]);
        return;
    }
    if let Err(e) = run(Config::parse(&args)) {
        eprintln!("idle_many: {e}");
        std::process::exit(1);
    }
}

struct Config {
    conns: usize,
    processes: usize,
    clients: usize,
    hold: Duration,
    build: bool,
    out: PathBuf,
}

impl Config {
    fn parse(args: &[String]) -> Config {
        let mut c = Config {
            conns: 100_000,
            processes: 6,
            clients: 6,
            hold: Duration::from_secs(5),
            build: true,
            out: PathBuf::from("bench/results-idle-100k.md"),
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = |name: &str| -> usize {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| fail(&format!("{name} takes a number")))
            };
            match flag.as_str() {
                "--conns" => c.conns = value("--conns").max(1),
                "--processes" => c.processes = value("--processes").max(1),
                "--clients" => c.clients = value("--clients").clamp(1, 250),
                "--hold" => c.hold = Duration::from_secs(value("--hold") as u64),
                "--no-build" => c.build = false,
                "--out" => {
                    c.out = it
                        .next()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| fail("--out takes a path"))
                }
                other => fail(&format!(
                    "unknown argument {other:?}; usage: idle_many [--conns N] [--processes N] \
                     [--clients N] [--hold SECS] [--no-build] [--out FILE]"
                )),
            }
        }
        c
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("idle_many: {msg}");
    std::process::exit(2)
}

/// What the whole run measured.
struct Outcome {
    held: usize,
    /// Connections that failed to open (connect or first echo).
    open_errors: usize,
    /// Connections held that failed their check echo (closed by the server, say).
    check_errors: usize,
    rss_before_kib: u64,
    rss_held_kib: u64,
    server_processes: usize,
    server_threads: u64,
    per_worker: Vec<usize>,
    kernel: Option<KernelMem>,
    check_us: Vec<f64>,
    open_secs: f64,
    wall_secs: f64,
    /// The supervisor's last line: what its workers counted.
    summary: Option<String>,
    /// The server's first warnings and pressure sheds, if any.
    warnings: Vec<String>,
}

fn run(cfg: Config) -> Result<(), String> {
    let t0 = Instant::now();
    let root = workspace_root();
    let exe = root.join("target/release/examples/echo_server");
    if cfg.build || !exe.exists() {
        let status = Command::new(env!("CARGO"))
            .current_dir(&root)
            .args([
                "build",
                "--release",
                "-p",
                "socketserver",
                "--example",
                "echo_server",
            ])
            .status()
            .map_err(|e| format!("cargo build: {e}"))?;
        if !status.success() {
            return Err("cargo build of echo_server failed".into());
        }
    }
    raise_nofile();
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("free port: {e}"))?
        .port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let dir = std::env::temp_dir().join(format!("idle_many.{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let pid_file = dir.join("supervisor.pid");
    let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
    let mut server = Command::new(&exe)
        .args(["--addr", &addr.to_string(), "--mode", "event"])
        .args(["--processes", &cfg.processes.to_string()])
        .arg("--pid-file")
        .arg(&pid_file)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    let result = measure(&cfg, addr, server.id(), &pid_file);
    // SIGTERM drains the supervisor and its workers; the connections are closed by then.
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    let _ = server.wait();
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let mut outcome = result.map_err(|e| format!("{e}\nserver log:\n{log}"))?;
    outcome.wall_secs = t0.elapsed().as_secs_f64();
    outcome.summary = log
        .lines()
        .find(|l| l.contains("supervisor stopped:"))
        .map(|l| l[l.find("supervisor stopped:").unwrap_or(0)..].to_owned());
    outcome.warnings = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("closed idle"))
        .take(20)
        .map(str::to_owned)
        .collect();
    let md = report(&cfg, &outcome);
    print!("{md}");
    std::fs::write(&cfg.out, md).map_err(|e| format!("{}: {e}", cfg.out.display()))?;
    if outcome.held < cfg.conns {
        return Err(format!("held {} of {}", outcome.held, cfg.conns));
    }
    Ok(())
}

fn measure(cfg: &Config, addr: SocketAddr, pid: u32, pid_file: &Path) -> Result<Outcome, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pid_file.exists() || TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err("the server did not start in 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_before_kib = tree(pid)
        .iter()
        .filter_map(|&p| status_field(p, "VmRSS"))
        .sum();
    let kernel_before = KernelMem::read();
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let opening = Instant::now();
    let mut clients = Vec::new();
    for k in 0..cfg.clients {
        let share = cfg.conns / cfg.clients + usize::from(k < cfg.conns % cfg.clients);
        let src = Ipv4Addr::new(127, 0, 0, 2 + k as u8);
        clients.push(Client::start(&me, addr, src, share)?);
    }
    let mut held = 0;
    let mut open_errors = 0;
    for c in &mut clients {
        let (h, e) = c.held()?;
        held += h;
        open_errors += e;
    }
    let open_secs = opening.elapsed().as_secs_f64();
    std::thread::sleep(cfg.hold);
    let procs = tree(pid);
    let rss_held_kib = procs.iter().filter_map(|&p| status_field(p, "VmRSS")).sum();
    let server_threads = procs
        .iter()
        .filter_map(|&p| status_field(p, "Threads"))
        .sum();
    let per_worker = procs.iter().skip(1).map(|&p| sockets(p)).collect();
    let kernel = kernel_before
        .zip(KernelMem::read())
        .map(|(k0, k1)| k1.since(&k0));
    let mut check_us = Vec::with_capacity(held);
    let mut checked = 0;
    let mut check_errors = 0;
    for c in &mut clients {
        let (ok, e, lat) = c.check()?;
        checked += ok;
        check_errors += e;
        check_us.extend(lat);
    }
    check_us.sort_by(f64::total_cmp);
    Ok(Outcome {
        held: checked,
        open_errors,
        check_errors,
        rss_before_kib,
        rss_held_kib,
        server_processes: procs.len(),
        server_threads,
        per_worker,
        kernel,
        check_us,
        open_secs,
        wall_secs: 0.0,
        summary: None,
        warnings: Vec::new(),
    })
}

/// A client process, spoken to over its stdin and stdout, one line each way.
struct Client {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Client {
    fn start(me: &Path, addr: SocketAddr, src: Ipv4Addr, n: usize) -> Result<Client, String> {
        let mut child = Command::new(me)
            .args([
                "--client",
                &addr.to_string(),
                &src.to_string(),
                &n.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("client: {e}"))?;
        let to = child.stdin.take().expect("piped");
        let from = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Client { child, to, from })
    }

    fn line(&mut self) -> Result<Vec<String>, String> {
        let mut line = String::new();
        match self.from.read_line(&mut line) {
            Ok(n) if n > 0 => Ok(line.split_whitespace().map(str::to_owned).collect()),
            _ => Err("a client process ended early".into()),
        }
    }

    /// Waits until the client holds its connections: (held, errors).
    fn held(&mut self) -> Result<(usize, usize), String> {
        let f = self.line()?;
        match f.as_slice() {
            [tag, h, e] if tag == "held" => Ok((num(h)?, num(e)?)),
            other => Err(format!("client said {other:?}")),
        }
    }

    /// Has the client check every connection: (answered, errors, each check's µs).
    fn check(&mut self) -> Result<(usize, usize, Vec<f64>), String> {
        writeln!(self.to, "check").map_err(|e| e.to_string())?;
        let f = self.line()?;
        let (ok, e) = match f.as_slice() {
            [tag, ok, e] if tag == "checked" => (num(ok)?, num(e)?),
            other => return Err(format!("client said {other:?}")),
        };
        let lat = self.line()?.iter().filter_map(|v| v.parse().ok()).collect();
        Ok((ok, e, lat))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = writeln!(self.to, "exit");
        let _ = self.child.wait();
    }
}

fn num(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| format!("not a number: {s:?}"))
}

/// The client process: `--client ADDR SRC N`.
fn client(args: &[String]) {
    let [addr, src, n] = args else {
        fail("--client ADDR SRC N")
    };
    let addr: SocketAddr = addr.parse().unwrap_or_else(|_| fail("bad ADDR"));
    let src: Ipv4Addr = src.parse().unwrap_or_else(|_| fail("bad SRC"));
    let n: usize = n.parse().unwrap_or_else(|_| fail("bad N"));
    raise_nofile();
    let mut conns = Vec::with_capacity(n);
    let mut errors = 0;
    let mut seq = 0u64;
    for i in 0..n {
        match open(src, addr) {
            Ok(s) => conns.push(s),
            Err(_) => errors += 1,
        }
        if (i + 1) % BATCH == 0
            && let Some(last) = conns.last_mut()
        {
            seq += 1;
            if round_trip(last, seq).is_err() {
                errors += 1;
                conns.pop();
            }
        }
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    println!("held {} {errors}", conns.len());
    let _ = std::io::stdout().flush();
    while let Some(Ok(cmd)) = lines.next() {
        match cmd.trim() {
            "check" => {
                let (mut ok, mut bad) = (0, 0);
                let mut lat = Vec::with_capacity(conns.len());
                for s in &mut conns {
                    seq += 1;
                    let t = Instant::now();
                    match round_trip(s, seq) {
                        Ok(()) => {
                            ok += 1;
                            lat.push(format!("{:.1}", t.elapsed().as_secs_f64() * 1e6));
                        }
                        Err(_) => bad += 1,
                    }
                }
                println!("checked {ok} {bad}");
                println!("{}", lat.join(" "));
                let _ = std::io::stdout().flush();
            }
            _ => break,
        }
    }
}

/// A connection from `src`: a port bound on one address does not take that port from the
/// others, so each source address has its own ephemeral ports.
fn open(src: Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddrV4::new(src, 0).into())?;
    s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    s.set_tcp_nodelay(true)?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Raises this process's soft open-file limit to its hard limit.
fn raise_nofile() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = lim.maximum;
    let _ = setrlimit(Resource::Nofile, lim);
}

/// `pid` and its descendants (a supervisor and its workers), the supervisor first.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        let path = format!("/proc/{p}/task/{p}/children");
        if let Ok(text) = std::fs::read_to_string(path) {
            all.extend(
                text.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    all
}

/// A numeric field of /proc/PID/status (`VmRSS` in KiB, `Threads`).
fn status_field(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.split(':').next() == Some(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The sockets `pid` holds open (its listener included).
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench sits in the workspace")
        .to_path_buf()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn report(cfg: &Config, o: &Outcome) -> String {
    let held = o.held.max(1) as f64;
    let rss_grown = o.rss_held_kib.saturating_sub(o.rss_before_kib) as f64 * 1024.0;
    let kib = |b: f64| format!("{:.2} KiB", b / 1024.0);
    let (slab, stacks) = match o.kernel {
        Some(k) => (
            kib(k.slab as f64 / held),
            kib((k.stack + k.page_tables) as f64 / held),
        ),
        None => ("n/a (needs root)".into(), "n/a (needs root)".into()),
    };
    let mut md = String::new();
    md.push_str("# 100,000 idle connections (issue 23)\n\n");
    md.push_str(&format!("- date: {}\n", common::today()));
    md.push_str(&format!(
        "- command: `cargo run --release -p socketserver-bench --bin idle_many -- --conns {} \
         --processes {} --clients {} --hold {}`\n",
        cfg.conns,
        cfg.processes,
        cfg.clients,
        cfg.hold.as_secs()
    ));
    md.push_str(&format!(
        "- server: `echo_server --mode event --processes {}` (release), defaults otherwise; \
         clients: {} processes of this program, each from its own source address \
         (127.0.0.2 …), holding an equal share\n",
        cfg.processes, cfg.clients
    ));
    md.push_str(&format!(
        "- open-file limit per process: {}\n",
        rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .maximum
            .map_or("unlimited".into(), |m| m.to_string())
    ));
    md.push_str(&format!(
        "- opening took {:.1} s; the whole run {:.1} s\n\n",
        o.open_secs, o.wall_secs
    ));
    md.push_str(
        "Held: connections that answered their check echo after the hold. Server RSS: VmRSS \
         summed over the supervisor and its workers. Kernel memory is system-wide, read before \
         connecting and while every connection is held: slab objects for both ends of each \
         loopback connection, and kernel stacks with page tables. Per connection: the growth \
         divided by the connections held.\n\n",
    );
    md.push_str(
        "| held | failed to open | failed the check | server processes | server threads | server RSS held | RSS per \
         connection | kernel slab per connection | kernel stacks per connection | check p50 | \
         check p99 | check max |\n|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    md.push_str(&format!(
        "| {} of {} | {} | {} | {} | {} | {:.1} MiB | {} | {} | {} | {:.0} µs | {:.0} µs | {:.1} ms |\n\n",
        o.held,
        cfg.conns,
        o.open_errors,
        o.check_errors,
        o.server_processes,
        o.server_threads,
        o.rss_held_kib as f64 / 1024.0,
        kib(rss_grown / held),
        slab,
        stacks,
        percentile(&o.check_us, 0.5),
        percentile(&o.check_us, 0.99),
        percentile(&o.check_us, 1.0) / 1000.0,
    ));
    md.push_str(&format!(
        "Sockets each worker held (its listener included): {}.\n",
        o.per_worker
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if let Some(summary) = &o.summary {
        md.push_str(&format!("\nThe supervisor, stopping: `{summary}`.\n"));
    }
    if !o.warnings.is_empty() {
        md.push_str("\nThe server's first warnings and sheds:\n\n```text\n");
        for w in &o.warnings {
            md.push_str(w);
            md.push('\n');
        }
        md.push_str("```\n");
    }
    md
}
