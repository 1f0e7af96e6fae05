//! Helpers shared by the integration tests: running servers on a thread, finding CPython,
//! counting threads and descriptors.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socketserver::{
    HandlerResult, Server, ServerHandle, StreamHandler, StreamRequest, StreamRequestHandler,
    transport::Transport,
};

/// Installs a test logger once (quiet unless RUST_LOG is set).
pub fn init_logs() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// A server running `serve_forever` on its own thread. Dropping it shuts the server down,
/// joins the thread and closes the server.
pub struct Running<T: Transport> {
    pub handle: ServerHandle,
    thread: Option<JoinHandle<Server<T>>>,
}

impl<T: Transport> Running<T> {
    /// Shuts down, waits for `serve_forever` to return (bounded), and hands the server back.
    pub fn stop(mut self) -> Server<T> {
        self.stop_inner().expect("server thread")
    }

    fn stop_inner(&mut self) -> Option<Server<T>> {
        let t = self.thread.take()?;
        self.handle.shutdown();
        finish_within(&t, "serve_forever did not return within 10 s of shutdown");
        Some(t.join().expect("serve_forever panicked"))
    }

    /// Whether serve_forever has returned.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl<T: Transport> Drop for Running<T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.handle.shutdown();
            return;
        }
        let Some(server) = self.stop_inner() else {
            return;
        };
        // Closing joins in-flight handlers (block_on_close); a test that forgot to hang up its
        // clients would hang here, so close on another thread and fail after 10 s instead.
        let closer = std::thread::spawn(move || drop(server));
        finish_within(
            &closer,
            "closing the server took over 10 s: a client of the test is still connected",
        );
    }
}

/// Fails the test with `why` unless thread `t` finishes within 10 s.
fn finish_within<R>(t: &JoinHandle<R>, why: &str) {
    assert!(
        eventually(Duration::from_secs(10), || t.is_finished()),
        "{why}"
    );
}

/// Runs `serve_forever` on a new thread.
pub fn serve<T: Transport>(server: Server<T>) -> Running<T> {
    let handle = server.handle();
    let thread = std::thread::spawn(move || {
        server.serve_forever();
        server
    });
    Running {
        handle,
        thread: Some(thread),
    }
}

/// Python test_socketserver's handler: echo each line back.
pub struct LineEcho;

impl StreamHandler for LineEcho {
    fn handle(&mut self, s: &mut StreamRequest) -> HandlerResult {
        let mut line = Vec::new();
        while s.rfile.read_until(b'\n', &mut line)? > 0 {
            s.wfile.write_all(&line)?;
            line.clear();
        }
        Ok(())
    }
}

pub fn line_echo() -> StreamRequestHandler<LineEcho> {
    StreamRequestHandler::new(LineEcho)
}

/// CPython's three `hello world\n` round trips over one connection.
pub fn three_round_trips<S: std::io::Read + Write>(stream: S) {
    let mut r = BufReader::new(stream);
    for _ in 0..3 {
        r.get_mut().write_all(b"hello world\n").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "hello world\n");
    }
}

/// Threads of this process, from /proc.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Open descriptors of this process, from /proc.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits until `cond` holds, up to `limit`; returns whether it did.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A fresh socket path in the temp directory, removed if it exists.
pub fn sock_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let p = std::env::temp_dir().join(format!(
        "ss-{tag}-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&p);
    p
}

/// A CPython interpreter the interop tests can run.
#[derive(Clone, Debug)]
pub struct Python {
    pub exe: PathBuf,
    pub version: String,
}

impl Python {
    /// Runs `script` with `args`, killing it after `timeout`. Returns its output.
    pub fn run(&self, script: &str, args: &[&str], timeout: Duration) -> Output {
        let mut child = self.spawn(script, args);
        let deadline = Instant::now() + timeout;
        while child.try_wait().expect("wait python").is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("python output");
                panic!(
                    "python timed out after {timeout:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.wait_with_output().expect("python output")
    }

    /// Runs `script` (bounded by 20 s) and asserts that it succeeded and printed `OK`.
    pub fn run_ok(&self, script: &str, args: &[&str]) {
        let out = self.run(script, args, Duration::from_secs(20));
        assert!(
            out.status.success(),
            "python {} failed: {}",
            self.version,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    }

    /// Starts `script` in the background; the caller must kill/wait it.
    pub fn spawn(&self, script: &str, args: &[&str]) -> std::process::Child {
        Command::new(&self.exe)
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start python")
    }
}

fn probe(exe: &Path) -> Option<Python> {
    let out = Command::new(exe)
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .ok()?;
    out.status.success().then(|| Python {
        exe: exe.to_path_buf(),
        version: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    })
}

/// `python3` from PATH. When `CI` is set a missing interpreter fails the test; elsewhere the
/// test is skipped with a printed reason.
pub fn python3() -> Option<Python> {
    match probe(Path::new("python3")) {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("python3 is required when CI is set, and it is missing")
        }
        None => {
            eprintln!("SKIPPED: python3 not found; interop test not run");
            None
        }
    }
}

/// Every CPython >= 3.11 found: `python3` from PATH (required when `CI` is set) and the
/// interpreters pyenv manages, one per minor version.
pub fn pythons() -> Vec<Python> {
    let mut found: Vec<Python> = python3().into_iter().collect();
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")));
    if let Some(Ok(dir)) = root.map(|r| std::fs::read_dir(r.join("versions"))) {
        let mut exes: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path().join("bin/python3"))
            .filter(|p| p.exists())
            .collect();
        exes.sort();
        for exe in exes {
            if let Some(p) = probe(&exe) {
                let minor: Option<u32> = p.version.strip_prefix("3.").and_then(|m| m.parse().ok());
                if minor.is_some_and(|m| m >= 11) && !found.iter().any(|f| f.version == p.version) {
                    found.push(p);
                }
            }
        }
    }
    if std::env::var_os("CI").is_some() {
        assert!(
            found.iter().any(|p| p.version == "3.11"),
            "CPython 3.11 is required when CI is set; found {found:?}"
        );
    }
    found
}

/// Connects to a TCP server's address with a 10 s read timeout, so a test cannot hang.
pub fn connect(addr: &socketserver::Addr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads until end-of-file (bounded by the socket's timeout); returns what arrived.
pub fn read_to_eof(mut s: impl std::io::Read) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    s.read_to_end(&mut v)?;
    Ok(v)
}

/// Resident memory of process `pid` ("self" for this one), in KiB, from /proc.
pub fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

/// Silences the default panic message for panics whose message contains `marker`, so a test
/// that panics on purpose thousands of times does not flood stderr. Other panics print as usual.
pub fn quiet_panics(marker: &'static str) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if !msg.contains(marker) {
            previous(info);
        }
    }));
}

/// Echoes bytes until the client hangs up, counting the connections it served.
#[derive(Clone, Default)]
pub struct ByteEcho(pub std::sync::Arc<AtomicUsize>);

impl socketserver::Handler for ByteEcho {
    fn handle(&mut self, req: &mut socketserver::Request) -> HandlerResult {
        use std::io::Read;
        self.0.fetch_add(1, Ordering::SeqCst);
        let mut buf = [0u8; 4096];
        loop {
            let n = req.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            req.write_all(&buf[..n])?;
        }
    }
}

/// Echoes each datagram, counting them; `shutdown` stops the server and `silent` gets no reply.
#[derive(Clone, Default)]
pub struct DatagramEcho(pub std::sync::Arc<AtomicUsize>);

impl socketserver::DatagramHandler for DatagramEcho {
    fn handle(&mut self, req: &mut socketserver::DatagramRequest) -> HandlerResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        match req.packet() {
            b"shutdown" => req.server().shutdown(),
            b"silent" => {}
            p => {
                let p = p.to_vec();
                req.wfile.extend_from_slice(&p);
            }
        }
        Ok(())
    }
}
