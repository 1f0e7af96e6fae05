//! Rolling restarts behind a real HAProxy lose nothing: two `echo_server` processes behind one
//! HAProxy (`send-proxy-v2`, health checks, `retries 3`, `option redispatch`), eight clients
//! doing connect, echo, close without pause, and each server restarted in turn with SIGTERM:
//! its drain closes the listener at once, so HAProxy's connection is refused and retried on
//! the other server. Then one server killed with SIGKILL: only requests sent before it was gone
//! may fail.

mod haproxy;
mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One `echo_server` process on a fixed port, behind the PROXY protocol.
struct Echo {
    exe: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Echo {
    fn start(exe: &Path, port: u16) -> Echo {
        let mut e = Echo {
            exe: exe.to_path_buf(),
            port,
            child: None,
        };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let mut child = Command::new(&self.exe)
            .args(["--addr", &format!("127.0.0.1:{}", self.port)])
            .args(["--proxy-protocol", "--trusted-proxy", "127.0.0.1"])
            .env("RUST_LOG", "warn,echo_server=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start echo_server");
        let mut log = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            let mut line = String::new();
            while log.read_line(&mut line).unwrap_or(0) > 0 {
                if std::env::var_os("SHOW_CHILD_LOGS").is_some() {
                    eprint!("echo_server: {line}");
                }
                line.clear();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        // Listening once a bare connection is accepted (it is refused for want of a header).
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "echo_server did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
    }

    fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as i32;
        kill(pid, sig);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "echo_server did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Sends signal `sig` to `pid` with the `kill` command (no `unsafe` in tests).
fn kill(pid: i32, sig: i32) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Eight clients doing connect, echo, close against `lb` until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// Each returns when each of its client's failed requests started.
    threads: Vec<JoinHandle<Vec<Instant>>>,
}

impl Load {
    fn start(lb: SocketAddr, tag: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..8)
            .map(|t| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let (mut n, mut mine) = (0u64, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let started = Instant::now();
                        match round_trip(lb, &format!("client {t} request {n}\n")) {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                eprintln!("{tag}: client {t} request {n} failed: {e}");
                                mine.push(started);
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                    mine
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// Stops the clients: requests that succeeded, and when each failed request started.
    fn stop(self) -> (u64, Vec<Instant>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// Connect, send `msg`, read it back whole, close.
fn round_trip(lb: SocketAddr, msg: &str) -> std::io::Result<()> {
    let mut c = TcpStream::connect(lb)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(msg.as_bytes())?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back)?;
    if back != msg.as_bytes() {
        return Err(std::io::Error::other("wrong echo"));
    }
    Ok(())
}

fn setup() -> Option<(haproxy::Haproxy, Echo, Echo)> {
    if !haproxy::available() {
        return None;
    }
    let exe = util::example_exe("echo_server");
    let (pa, pb) = (haproxy::free_port(), haproxy::free_port());
    let a = Echo::start(&exe, pa);
    let b = Echo::start(&exe, pb);
    let lb = haproxy::Haproxy::start(&format!(
        "  balance roundrobin\n  \
         server a 127.0.0.1:{pa} send-proxy-v2 check inter 200ms fall 2 rise 2 check-send-proxy\n  \
         server b 127.0.0.1:{pb} send-proxy-v2 check inter 200ms fall 2 rise 2 check-send-proxy"
    ));
    Some((lb, a, b))
}

/// Lets the load run until `more` further requests have succeeded (bounded).
fn let_run(load: &Load, more: u64) {
    let start = load.counts().0;
    assert!(
        util::eventually(Duration::from_secs(10), || load.counts().0 >= start + more),
        "the load stalled: {:?}",
        load.counts()
    );
}

#[test]
fn restarting_each_server_in_turn_with_sigterm_loses_no_request() {
    let Some((lb, mut a, mut b)) = setup() else {
        return;
    };
    let load = Load::start(lb.addr(), "sigterm");
    let_run(&load, 200);
    let before = load.counts().0;
    for server in [&mut a, &mut b] {
        let status = server.signal(15);
        assert!(
            status.success(),
            "echo_server ended with {status} on SIGTERM"
        );
        let_run(&load, 100);
        server.spawn();
        // Until HAProxy's checks see it back up (rise 2 x 200 ms), and past.
        std::thread::sleep(Duration::from_millis(800));
        let_run(&load, 100);
    }
    let (ok, failures) = load.stop();
    let failed = failures.len();
    eprintln!(
        "{ok} requests succeeded ({} during the restarts), {failed} failed",
        ok - before
    );
    assert!(
        ok - before >= 400,
        "too few requests during the restarts: {}",
        ok - before
    );
    assert_eq!(failed, 0, "requests failed during a rolling restart");
}

#[test]
fn a_server_killed_with_sigkill_fails_only_what_was_sent_before_it_was_gone() {
    let Some((lb, mut a, _b)) = setup() else {
        return;
    };
    let load = Load::start(lb.addr(), "sigkill");
    let_run(&load, 200);
    let status = a.signal(9);
    // Reaped, so its sockets are closed: from here HAProxy's connections to it are refused.
    let gone = Instant::now();
    assert!(!status.success());
    let_run(&load, 300);
    let (ok, failures) = load.stop();
    let late: Vec<Duration> = failures
        .iter()
        .filter_map(|&f| f.checked_duration_since(gone))
        .collect();
    eprintln!(
        "{ok} requests succeeded, {} failed; started after the server was gone: {late:?}",
        failures.len()
    );
    // A killed process's listener outlives the signal by the milliseconds its exit takes, so
    // a client can lose its request in flight and then the next one, queued in the dying
    // backlog. Once the process is reaped nothing is left to queue on: a request that fails
    // after that is one HAProxy did not retry on the other server.
    assert!(
        late.is_empty(),
        "requests sent after the killed server was gone failed: {late:?}"
    );
}
