//! The TLS benchmark: this crate's `echo_server --tls-cert ...` against tokio-rustls and
//! std + rustls by hand (`tls_echo`), all with the same provider (ring), certificate (ECDSA
//! P-256, generated at start with rcgen into a temporary directory) and configuration.
//!
//! ```text
//! cargo run --release -p socketserver-bench --bin tls_bench -- [--quick] [--unpinned]
//!     [--out bench/results-tls.md]
//! ```
//! Scenarios: TLS connect + 64-byte echo + close (8 client threads; session resumption on, as
//! clients do by default, and off), TLS echo round trips at 1, 16 and 128 connections, and the
//! server's resident memory per idle TLS connection beside the plaintext figure. Pinned (the
//! default, when `taskset` works): the server on core 1, the load on core 0.

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
    let s = TcpStream::connect(addr)?;
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

fn round_trip(t: &mut Tls, buf: &mut [u8; MSG]) -> std::io::Result<()> {
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

fn start(c: &Contender, pinned: bool) -> Running {
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
    let child = cmd
        .args(&args)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {}: {e}", c.label)));
    let r = Running { child, addr };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            fail(&format!("{} did not listen", c.label));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    r
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Round trips/s over `conns` persistent TLS connections for `d`.
fn echo(addr: SocketAddr, config: &Arc<ClientConfig>, conns: usize, d: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let mut streams: Vec<Tls> = (0..conns)
        .map(|_| connect(addr, config).unwrap_or_else(|e| fail(&format!("connect: {e}"))))
        .collect();
    let threads: Vec<_> = streams
        .drain(..)
        .map(|mut t| {
            let (stop, total) = (stop.clone(), total.clone());
            std::thread::spawn(move || {
                let mut buf = [7u8; MSG];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    if round_trip(&mut t, &mut buf).is_err() {
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

/// Round trips/s over `conns` persistent plaintext connections for `d`.
fn plain_echo(addr: SocketAddr, conns: usize, d: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let streams: Vec<TcpStream> = (0..conns)
        .map(|_| {
            let s = TcpStream::connect(addr).unwrap_or_else(|e| fail(&format!("connect: {e}")));
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
        .collect();
    let threads: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            let (stop, total) = (stop.clone(), total.clone());
            std::thread::spawn(move || {
                let mut buf = [7u8; MSG];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(&buf)
                        .and_then(|()| s.read_exact(&mut buf))
                        .is_err()
                    {
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

/// Connect + handshake + one 64-byte echo + close_notify and close, from 8 threads, per second.
fn connect_cycle(addr: SocketAddr, config: &Arc<ClientConfig>, d: Duration) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (stop, total, resumed, config) =
                (stop.clone(), total.clone(), resumed.clone(), config.clone());
            std::thread::spawn(move || {
                let mut buf = [7u8; MSG];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut t) = connect(addr, &config) else {
                        continue;
                    };
                    if round_trip(&mut t, &mut buf).is_err() {
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
    let start = Instant::now();
    std::thread::sleep(d);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let n = total.load(Ordering::Relaxed) as f64;
    let share = if n > 0.0 {
        resumed.load(Ordering::Relaxed) as f64 / n
    } else {
        0.0
    };
    (n / start.elapsed().as_secs_f64(), share)
}

/// The server's RSS per held connection, KiB: `n` connections opened (TLS or plain), each
/// checked with one round trip, RSS before and after.
fn idle(r: &Running, config: Option<&Arc<ClientConfig>>, n: usize) -> f64 {
    let pid = r.child.id();
    let before = rss_kib(pid);
    let mut held: Vec<Box<dyn FnMut() -> std::io::Result<()>>> = Vec::with_capacity(n);
    for _ in 0..n {
        let mut buf = [7u8; MSG];
        match config {
            Some(c) => {
                let mut t = connect(r.addr, c).unwrap_or_else(|e| fail(&format!("idle: {e}")));
                round_trip(&mut t, &mut buf).unwrap();
                held.push(Box::new(move || round_trip(&mut t, &mut [1u8; MSG])));
            }
            None => {
                let mut s = TcpStream::connect(r.addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(&buf).unwrap();
                s.read_exact(&mut buf).unwrap();
                held.push(Box::new(move || {
                    let mut b = [1u8; MSG];
                    s.write_all(&b)?;
                    s.read_exact(&mut b)
                }));
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_kib(pid);
    for h in &mut held {
        h().unwrap_or_else(|e| fail(&format!("a held connection stopped echoing: {e}")));
    }
    (after.saturating_sub(before)) as f64 / n as f64
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let unpinned = args.iter().any(|a| a == "--unpinned");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map_or(root.join("bench/results-tls.md"), PathBuf::from);
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
    let (echo_server, tls_echo, std_echo) = build(root);
    let dir = std::env::temp_dir().join(format!("tls-bench-{}", std::process::id()));
    let ca = make_certs(&dir);
    let (cert, key) = (
        dir.join("server.pem").to_string_lossy().into_owned(),
        dir.join("server.key").to_string_lossy().into_owned(),
    );
    let ss = |mode: &[&str]| {
        let mut a: Vec<String> = ["--addr", "{addr}", "--tls-cert", &cert, "--tls-key", &key]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(mode.iter().map(|s| s.to_string()));
        a
    };
    let contenders = [
        Contender {
            label: "socketserver thread",
            program: echo_server.clone(),
            args: ss(&["--mode", "thread"]),
        },
        Contender {
            label: "socketserver pool",
            program: echo_server.clone(),
            args: ss(&["--mode", "pool", "--workers", "128"]),
        },
        Contender {
            label: "std+rustls",
            program: tls_echo.clone(),
            args: [
                "--impl", "std", "--addr", "{addr}", "--cert", &cert, "--key", &key,
            ]
            .map(String::from)
            .to_vec(),
        },
        Contender {
            label: "tokio-rustls",
            program: tls_echo.clone(),
            args: [
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
            ]
            .map(String::from)
            .to_vec(),
        },
    ];
    let d = Duration::from_secs(if quick { 2 } else { 5 });
    let idle_n = if quick { 300 } else { 2000 };
    let resume = client_config(&ca, true);
    let full = client_config(&ca, false);
    let mut md = format!(
        "# TLS benchmark\n\n{} sweep ({}), {} s per measurement; rustls 0.23 + ring on both \
         sides, ECDSA P-256 certificate, 64-byte messages. Noisy: one run, a shared machine.\n\n\
         Command: `cargo run --release -p socketserver-bench --bin tls_bench --{}`\n\n\
         | contender | connect+echo+close/s (resumed) | share resumed | connect/s (full handshake) \
         | echo rt/s 1 conn | 16 conns | 128 conns | idle KiB/conn TLS | idle KiB/conn plain |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        if pinned { "Pinned" } else { "Unpinned" },
        if pinned {
            "server on core 1, load on core 0"
        } else {
            "no pinning"
        },
        d.as_secs(),
        if quick { " --quick" } else { "" }
    );
    for c in &contenders {
        eprintln!("{} ...", c.label);
        let r = start(c, pinned);
        let (resumed, share) = connect_cycle(r.addr, &resume, d);
        let (fresh, _) = connect_cycle(r.addr, &full, d);
        let e1 = echo(r.addr, &full, 1, d);
        let e16 = echo(r.addr, &full, 16, d);
        let e128 = echo(r.addr, &full, 128, d);
        drop(r);
        // A pool of 128 workers cannot hold more connections than it has workers.
        let tls_idle = if c.label.ends_with("pool") {
            "".to_owned()
        } else {
            let r = start(c, pinned);
            format!("{:.1}", idle(&r, Some(&full), idle_n))
        };
        let plain_idle = if c.label.starts_with("socketserver thread") {
            let mut plain = Contender {
                label: "socketserver thread (plain)",
                program: echo_server.clone(),
                args: vec![],
            };
            plain.args = ["--addr", "{addr}", "--mode", "thread"]
                .map(String::from)
                .to_vec();
            let r = start(&plain, pinned);
            format!("{:.1}", idle(&r, None, idle_n))
        } else {
            "".to_owned()
        };
        let line = format!(
            "| {} | {resumed:.0} | {:.0}% | {fresh:.0} | {e1:.0} | {e16:.0} | {e128:.0} | {tls_idle} | {plain_idle} |\n",
            c.label,
            share * 100.0
        );
        eprint!("{line}");
        md.push_str(&line);
    }
    // The plaintext path of an echo_server built with the tls feature, beside std: the TLS
    // branch in Stream's reads and writes must cost nothing measurable.
    md.push_str(
        "\nPlaintext echo, `echo_server` built with `--features tls` (no `--tls-cert`) beside \
         `std_echo`:\n\n| contender | echo rt/s 1 conn | 16 conns | 128 conns |\n|---|---|---|---|\n",
    );
    for (label, program, mode) in [
        ("std", &std_echo, &[][..]),
        (
            "socketserver thread (tls built in)",
            &echo_server,
            &["--mode", "thread"][..],
        ),
        ("std", &std_echo, &[][..]),
        (
            "socketserver thread (tls built in)",
            &echo_server,
            &["--mode", "thread"][..],
        ),
    ] {
        let mut args = vec!["--addr".to_owned(), "{addr}".to_owned()];
        args.extend(mode.iter().map(|s| s.to_string()));
        let c = Contender {
            label,
            program: program.clone(),
            args,
        };
        let r = start(&c, pinned);
        let line = format!(
            "| {label} | {:.0} | {:.0} | {:.0} |\n",
            plain_echo(r.addr, 1, d),
            plain_echo(r.addr, 16, d),
            plain_echo(r.addr, 128, d)
        );
        eprint!("{line}");
        md.push_str(&line);
    }
    md.push_str(&format!(
        "\nIdle: {idle_n} connections held, each checked to echo; server VmRSS growth / \
         connections.\n"
    ));
    print!("{md}");
    std::fs::write(&out, &md).unwrap_or_else(|e| fail(&format!("{}: {e}", out.display())));
    let _ = std::fs::remove_dir_all(&dir);
}
