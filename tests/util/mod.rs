//! Helpers shared by the integration tests: running servers on a thread, finding CPython,
//! counting threads and descriptors.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socketserver::transport::{StreamTransport, Transport};
use socketserver::{
    Builder, Dispatch, HandlerError, HandlerResult, MessageHandler, Next, Request, Server,
    ServerHandle,
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

/// Python test_socketserver's handler: echo each line back. A line is a message, so the same
/// handler runs in every dispatch mode, event mode (`Builder::event`) included.
pub struct LineEcho;

impl MessageHandler for LineEcho {
    fn handle_message(&mut self, s: &mut Request) -> Result<Next, HandlerError> {
        let mut line = Vec::new();
        if s.rfile.read_until(b'\n', &mut line)? == 0 {
            return Ok(Next::Close);
        }
        s.wfile.write_all(&line)?;
        Ok(Next::Message)
    }

    fn message_ready(&self, buffered: &[u8]) -> bool {
        buffered.contains(&b'\n')
    }
}

pub fn line_echo() -> LineEcho {
    LineEcho
}

/// A dispatch mode a suite runs its message handler in: a [`Dispatch`], or event mode, which
/// only message handlers have ([`Builder::event`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Thread,
    Pool(usize),
    Event(usize),
}

/// `builder.mode(m)`: the mode of a suite's server, chained like the builder's own methods.
pub trait InMode {
    fn mode(self, mode: Mode) -> Self;
}

impl<T: StreamTransport> InMode for Builder<T>
where
    T::Handler: MessageHandler,
{
    fn mode(self, mode: Mode) -> Self {
        match mode {
            Mode::Sync => self.dispatch(Dispatch::Sync),
            Mode::Thread => self.dispatch(Dispatch::Thread),
            Mode::Pool(workers) => self.dispatch(Dispatch::Pool { workers }),
            #[cfg(all(target_os = "linux", not(socketserver_portable)))]
            Mode::Event(workers) => self.event(workers),
            #[cfg(not(all(target_os = "linux", not(socketserver_portable))))]
            Mode::Event(_) => unreachable!("no event mode without Linux's epoll"),
        }
    }
}

/// Every stream dispatch mode, for the suites that run in each.
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
pub const STREAM_MODES: [Mode; 4] = [Mode::Sync, Mode::Thread, Mode::Pool(4), Mode::Event(2)];
/// Every stream dispatch mode there is without the Linux-only event dispatch.
#[cfg(not(all(target_os = "linux", not(socketserver_portable))))]
pub const STREAM_MODES: [Mode; 3] = [Mode::Sync, Mode::Thread, Mode::Pool(4)];

/// Event dispatch, for suites that run a case in it beside thread mode. Where it does not
/// exist (the Linux-only parts off: the suites only compile there) the pool stands in.
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
pub const EVENT_MODE: Mode = Mode::Event(2);
/// Event dispatch's stand-in where it does not exist.
#[cfg(not(all(target_os = "linux", not(socketserver_portable))))]
pub const EVENT_MODE: Mode = Mode::Pool(2);

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

/// Runs the tests of a file one at a time (hold the guard for the whole test), for those that
/// count the process's threads or descriptors, or time what the others would slow down.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes `bytes` in the pieces `splits` cuts them into (the rest in one piece), each in its
/// own segment (no Nagle, a pause between them, so the server reads them apart); false once a
/// write fails.
pub fn send_split(s: &mut std::net::TcpStream, bytes: &[u8], splits: &[usize]) -> bool {
    s.set_nodelay(true).unwrap();
    let mut rest = bytes;
    for &n in splits {
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        if s.write_all(piece).is_err() {
            return false;
        }
        rest = tail;
        std::thread::sleep(Duration::from_micros(200));
    }
    s.write_all(rest).is_ok()
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

/// Whether the tests run under CI (`CI` set, and not to `0` or `false`). There a missing
/// CPython or IPv6 loopback fails the tests instead of skipping them.
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A CPython interpreter the interop tests can run.
#[derive(Clone, Debug)]
pub struct Python {
    /// The interpreter itself (`sys.executable`, so a pyenv shim is not in the way).
    pub exe: PathBuf,
    /// `3.MINOR`.
    pub version: String,
    pub minor: u32,
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
                    "python {} timed out after {timeout:?}; stderr: {}",
                    self.version,
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

/// The oldest CPython the interop tests run against.
pub const MIN_PYTHON_MINOR: u32 = 8;

/// `exe` as a CPython 3.8+, if it runs and is one.
fn probe(exe: &Path) -> Option<Python> {
    let out = Command::new(exe)
        .args([
            "-c",
            "import sys; print('%d %d %s' % (sys.version_info[0], sys.version_info[1], sys.executable))",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let mut parts = line.trim().splitn(3, ' ');
    let (major, minor, real) = (parts.next()?, parts.next()?.parse().ok()?, parts.next()?);
    (major == "3" && minor >= MIN_PYTHON_MINOR && !real.is_empty()).then(|| Python {
        exe: PathBuf::from(real),
        version: format!("3.{minor}"),
        minor,
    })
}

/// Every CPython 3.8+ found, one per minor version, oldest first: `python3` from PATH and the
/// interpreters pyenv manages (`$PYENV_ROOT/versions/*/bin/python3`, by default under
/// `~/.pyenv`). Callers decide what an empty list means (under CI: a failure).
pub fn pythons() -> Vec<Python> {
    let mut candidates = vec![PathBuf::from("python3")];
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
        candidates.extend(exes);
    }
    let mut found: Vec<Python> = Vec::new();
    for p in candidates.iter().filter_map(|c| probe(c)) {
        if !found.iter().any(|f| f.minor == p.minor) {
            found.push(p);
        }
    }
    found.sort_by_key(|p| p.minor);
    found
}

/// Whether the IPv6 loopback address `::1` can be bound. Under CI its absence fails the test;
/// elsewhere the caller skips its IPv6 case (the reason is printed).
pub fn ipv6_loopback() -> bool {
    match std::net::TcpListener::bind("[::1]:0") {
        Ok(_) => true,
        Err(e) if is_ci() => panic!("::1 is required when CI is set: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: IPv6 loopback ::1 unavailable ({e}); IPv6 case not run");
            false
        }
    }
}

/// The HMAC of `msg` under `key` with `digest`, computed with the hmac crate directly (not with
/// the crate under test), as raw bytes.
pub fn hmac(digest: socketserver::Digest, key: &[u8], msg: &[u8]) -> Vec<u8> {
    use hmac::{KeyInit, Mac};
    fn mac<M: Mac + KeyInit>(key: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut m = <M as KeyInit>::new_from_slice(key).unwrap();
        m.update(msg);
        m.finalize().into_bytes().to_vec()
    }
    use socketserver::Digest;
    match digest {
        Digest::Md5 => mac::<hmac::Hmac<md5::Md5>>(key, msg),
        Digest::Sha256 => mac::<hmac::Hmac<sha2::Sha256>>(key, msg),
        Digest::Sha384 => mac::<hmac::Hmac<sha2::Sha384>>(key, msg),
        Digest::Sha3_256 => mac::<hmac::SimpleHmac<sha3::Sha3_256>>(key, msg),
        Digest::Sha3_384 => mac::<hmac::SimpleHmac<sha3::Sha3_384>>(key, msg),
        d => panic!("no reference HMAC for {d}"),
    }
}

/// `payload` with its 4-byte big-endian length in front, as `multiprocessing.connection` frames
/// it.
pub fn framed(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Reads exactly `n` bytes, failing the test otherwise.
pub fn read_n(s: &mut impl std::io::Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    v
}

/// Accepts one connection, waiting at most `limit`; the stream gets read and write timeouts of
/// `limit` too.
pub fn accept_within(listener: &std::net::TcpListener, limit: Duration) -> std::net::TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(limit)).unwrap();
                s.set_write_timeout(Some(limit)).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "nobody connected");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A `multiprocessing.connection` echo handler: counts that it ran, then echoes every message
/// back until the client hangs up.
pub struct MpEcho {
    pub handled: Arc<AtomicUsize>,
}

impl socketserver::Handler for MpEcho {
    fn handle(&mut self, req: &mut socketserver::Request) -> HandlerResult {
        self.handled.fetch_add(1, Ordering::SeqCst);
        let mut conn = socketserver::MpConnection::new(req.stream());
        let mut buf = Vec::new();
        loop {
            match conn.recv_bytes_into(&mut buf) {
                Ok(()) => conn.send_bytes(&buf)?,
                Err(e) if e.is_eof() => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A TCP server on 127.0.0.1 behind `auth` whose handler is [`MpEcho`], and its handler count.
pub fn mp_server(
    auth: socketserver::Auth,
) -> (
    Running<socketserver::transport::Tcp<MpEcho>>,
    std::net::SocketAddr,
    Arc<AtomicUsize>,
) {
    mp_server_within(auth, Duration::from_secs(5))
}

/// [`mp_server`] with a handshake deadline of `deadline`.
pub fn mp_server_within(
    auth: socketserver::Auth,
    deadline: Duration,
) -> (
    Running<socketserver::transport::Tcp<MpEcho>>,
    std::net::SocketAddr,
    Arc<AtomicUsize>,
) {
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let server = socketserver::TcpServer::builder(move || MpEcho { handled: h.clone() })
        .auth(auth)
        .handshake_timeout(deadline)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    (serve(server), addr, handled)
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

/// Echoes bytes until the client hangs up, counting the connections it served; what one read
/// brings is a message, so it runs in every dispatch mode. Make one with [`byte_echo`] or
/// [`counting_echo`].
pub type ByteEcho = Bytes;

#[derive(Clone, Default)]
pub struct Bytes(pub std::sync::Arc<AtomicUsize>);

impl MessageHandler for Bytes {
    fn setup(&mut self, _: &mut Request) -> HandlerResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn handle_message(&mut self, s: &mut Request) -> Result<Next, HandlerError> {
        let data = s.rfile.fill_buf()?;
        if data.is_empty() {
            return Ok(Next::Close);
        }
        s.wfile.write_all(data)?;
        let n = data.len();
        s.rfile.consume(n);
        Ok(Next::Message)
    }
}

pub fn byte_echo() -> ByteEcho {
    Bytes::default()
}

/// A [`ByteEcho`] counting its connections in `served`.
pub fn counting_echo(served: &Arc<AtomicUsize>) -> ByteEcho {
    Bytes(served.clone())
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

/// What every Unix-domain server kind promises about its socket file, given how to bind one on a
/// path (with `replace_stale` as asked) and how to leave a dead socket file there (a crashed
/// run's): closing removes its own file but never a newer server's on the same path; a stale
/// socket file is replaced only when asked; a live socket or a plain file never is.
pub fn check_socket_file_ownership<S>(
    tag: &str,
    bind: impl Fn(&Path, bool) -> socketserver::Result<S>,
    leave_stale: impl Fn(&Path),
) {
    use std::os::unix::fs::MetadataExt;
    let inode = |p: &Path| {
        std::fs::symlink_metadata(p)
            .map(|m| (m.dev(), m.ino()))
            .ok()
    };
    let path = sock_path(tag);

    let first = bind(&path, false).expect("bind");
    std::fs::remove_file(&path).unwrap();
    let second = bind(&path, false).expect("bind again after the file was removed");
    let seconds = inode(&path);
    drop(first);
    assert_eq!(
        inode(&path),
        seconds,
        "closing the first server removed the second one's socket file"
    );
    drop(second);
    assert!(!path.exists(), "socket file left behind on close");

    leave_stale(&path);
    assert!(path.exists());
    let e = bind(&path, false)
        .err()
        .expect("bound over a socket file without replace_stale");
    assert!(e.is_bind(), "{e}");
    assert_eq!(e.addr().and_then(|a| a.path()), Some(path.as_path()));
    let live = bind(&path, true).expect("a stale socket file is replaced when asked");
    let lives = inode(&path);
    let e = bind(&path, true)
        .err()
        .expect("replace_stale took over a live server's socket");
    assert!(e.to_string().contains("still listening"), "{e}");
    assert_eq!(
        inode(&path),
        lives,
        "the live server's socket file was touched"
    );
    drop(live);
    assert!(!path.exists(), "socket file left behind on close");

    std::fs::write(&path, b"data").unwrap();
    assert!(
        bind(&path, true).is_err(),
        "replace_stale replaced a plain file"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    std::fs::remove_file(&path).unwrap();
}

/// A global allocator that counts the bytes allocated and not yet freed, process-wide, so that a
/// test can tell a leak from allocator slack. A test binary that measures leaks installs it:
/// `#[global_allocator] static HEAP: util::CountingAlloc = util::CountingAlloc;`
pub struct CountingAlloc;

static HEAP_LIVE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        HEAP_LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        HEAP_LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        HEAP_LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        HEAP_LIVE.fetch_add(new as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

/// Heap bytes allocated and not yet freed, as [`CountingAlloc`] counts them (0 where it is not
/// the global allocator).
pub fn heap_live_bytes() -> i64 {
    HEAP_LIVE.load(Ordering::Relaxed)
}

/// The environment variable that tells a re-run test binary which test it runs alone.
const OWN_PROCESS: &str = "SOCKETSERVER_TEST_OWN_PROCESS";

/// Runs `body` in a child process of its own: this test binary again, running only the test
/// named `test`, with a logger that records every line for [`captured_logs`]. (A process has
/// one logger, and in this one the other tests install env_logger.) The child's output is
/// printed here; its failure, or a run over 120 s, fails the test.
pub fn in_own_process(test: &str, body: impl FnOnce()) {
    if std::env::var(OWN_PROCESS).as_deref() == Ok(test) {
        log::set_logger(&CAPTURE).expect("the child process installs the only logger");
        log::set_max_level(log::LevelFilter::Debug);
        body();
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let child = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(OWN_PROCESS, test)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the test binary again");
    let out = wait_output(child, Duration::from_secs(120));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{test} failed in its own process: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits for `child` up to `limit`, killing it if it overstays.
fn wait_output(mut child: std::process::Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait for child").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("child output");
            panic!(
                "child process killed after {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("child output")
}

/// One line logged by the library, as [`in_own_process`] records it.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub level: log::Level,
    pub target: String,
    pub message: String,
    pub at: Instant,
}

static CAPTURED: std::sync::Mutex<Vec<LogLine>> = std::sync::Mutex::new(Vec::new());
static CAPTURE: Capture = Capture;

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = LogLine {
            level: record.level(),
            target: record.target().to_owned(),
            message: record.args().to_string(),
            at: Instant::now(),
        };
        CAPTURED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    fn flush(&self) {}
}

/// The lines the library (targets `socketserver::*`) logged so far in a test run by
/// [`in_own_process`].
pub fn captured_logs() -> Vec<LogLine> {
    let lines = CAPTURED.lock().unwrap_or_else(|e| e.into_inner());
    lines
        .iter()
        .filter(|l| l.target.starts_with("socketserver"))
        .cloned()
        .collect()
}

/// A Python that has `prometheus_client` (the reference parser of the text exposition). Under
/// CI its absence fails the test; elsewhere the caller skips (the reason is printed).
pub fn python_with_prometheus_client() -> Option<Python> {
    let found = pythons().into_iter().rev().find(|p| {
        let out = p.run(
            "import prometheus_client.parser",
            &[],
            Duration::from_secs(20),
        );
        out.status.success()
    });
    match found {
        Some(p) => Some(p),
        None if is_ci() => panic!(
            "python3 with prometheus_client is required when CI is set \
             (pip install prometheus_client)"
        ),
        None => {
            eprintln!("SKIPPED: no python3 with prometheus_client; exposition not parsed");
            None
        }
    }
}

/// One sample of a parsed exposition: family name, family type, sample name, labels as
/// `k=v,k=v` sorted by key, value.
#[derive(Clone, Debug, PartialEq)]
pub struct PromSample {
    pub family: String,
    pub kind: String,
    pub name: String,
    pub labels: String,
    pub value: f64,
}

/// Parses a Prometheus text exposition with `prometheus_client.parser.text_string_to_metric_families`
/// (which fails on anything the format does not allow); returns every sample.
pub fn parse_prometheus(python: &Python, text: &str) -> Vec<PromSample> {
    const SCRIPT: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for f in text_string_to_metric_families(sys.argv[1]):
    for s in f.samples:
        labels = ",".join("%s=%s" % kv for kv in sorted(s.labels.items()))
        print("\t".join([f.name, f.type, s.name, labels, repr(float(s.value))]))
"#;
    let out = python.run(SCRIPT, &[text], Duration::from_secs(20));
    assert!(
        out.status.success(),
        "prometheus_client rejected the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 5, "bad parser output line {l:?}");
            PromSample {
                family: f[0].to_owned(),
                kind: f[1].to_owned(),
                name: f[2].to_owned(),
                labels: f[3].to_owned(),
                value: f[4].parse().expect("a float"),
            }
        })
        .collect()
}

/// The cargo features this test was built with: examples are built with the same ones, so that
/// cargo reuses the library it built for the test, and a test run with `--features tls` drives
/// examples that speak TLS.
fn own_features() -> String {
    let all = [
        ("signals", cfg!(feature = "signals")),
        ("proxy-protocol", cfg!(feature = "proxy-protocol")),
        ("metrics", cfg!(feature = "metrics")),
        ("tracing", cfg!(feature = "tracing")),
        ("tls", cfg!(feature = "tls")),
        ("tls-aws-lc", cfg!(feature = "tls-aws-lc")),
    ];
    let on: Vec<&str> = all.iter().filter(|f| f.1).map(|f| f.0).collect();
    on.join(",")
}

/// `target/<profile>/examples/NAME`, next to this test's `target/<profile>/deps/`, built first
/// with `cargo build --example NAME` and this test's features (a no-op after a plain `cargo
/// test`, which built it).
pub fn example_exe(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("test executable");
    let profile_dir = me
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.args([
        "build",
        "--quiet",
        "--example",
        name,
        "--no-default-features",
    ]);
    build.args(["--features", &own_features()]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "cargo build --example {name} failed");
    profile_dir.join("examples").join(name)
}

/// An example program running as a child on a free port (it is given `127.0.0.1:0`), found
/// by the line of its log that says where it listens; killed when dropped.
pub struct Example {
    pub child: std::process::Child,
    /// What followed `listening_line` in that line: `HOST:PORT`.
    pub addr: String,
    /// Its stderr, collected while it runs.
    pub log: LogLines,
}

impl Example {
    /// Starts `target/<profile>/examples/NAME ARGS` and waits (bounded) for a stderr line
    /// containing `listening_line`, the address following it.
    pub fn start(name: &str, args: &[&str], listening_line: &str) -> Example {
        let mut child = Command::new(example_exe(name))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let log = LogLines::collect(child.stderr.take().unwrap());
        let Some(line) = log.wait_for(listening_line, Duration::from_secs(20)) else {
            let _ = child.kill();
            panic!("{name} did not say where it listens:\n{}", log.dump());
        };
        let addr = line.split(listening_line).nth(1).unwrap().trim().to_owned();
        Example { child, addr, log }
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process's stderr, collected line by line on a thread, searchable while it runs.
#[derive(Clone, Default)]
pub struct LogLines(pub Arc<std::sync::Mutex<Vec<String>>>);

impl LogLines {
    /// Starts collecting `stderr` (also echoed to ours when `RUST_LOG` is set, to debug).
    pub fn collect(stderr: impl std::io::Read + Send + 'static) -> LogLines {
        let lines = LogLines::default();
        let l = lines.clone();
        let echo = std::env::var_os("TEST_ECHO_CHILD").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("child: {line}");
                }
                l.0.lock().unwrap().push(line);
            }
        });
        lines
    }

    /// The lines containing `needle`.
    pub fn matching(&self, needle: &str) -> Vec<String> {
        let lines = self.0.lock().unwrap();
        lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Waits up to `limit` for a line containing `needle`; the first such line.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> Option<String> {
        let mut found = None;
        eventually(limit, || {
            found = self.matching(needle).into_iter().next();
            found.is_some()
        });
        found
    }

    /// Everything so far, for a failure message.
    pub fn dump(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
}

/// `N` clients doing connect → one line echoed → close, over and over, until stopped; counts
/// what succeeded and what failed (with the first errors, to show).
pub struct EchoLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    pub ok: Arc<AtomicUsize>,
    pub failed: Arc<AtomicUsize>,
    pub errors: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoLoad {
    /// Starts `clients` clients against `addr`.
    pub fn start(addr: std::net::SocketAddr, clients: usize) -> EchoLoad {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|c| {
                let (stop, ok, failed, errors) =
                    (stop.clone(), ok.clone(), failed.clone(), errors.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let msg = format!("client {c} request {n}\n");
                        match echo_once(addr, msg.as_bytes()) {
                            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                let mut errs = errors.lock().unwrap();
                                if errs.len() < 20 {
                                    errs.push(e.to_string());
                                }
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        EchoLoad {
            stop,
            ok,
            failed,
            errors,
            threads,
        }
    }

    /// Requests that succeeded so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients; (succeeded, failed, first errors).
    pub fn stop(self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let errors = self.errors.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// One connect → write `msg` → read it back → close, each step bounded by 5 s.
pub fn echo_once(addr: std::net::SocketAddr, msg: &[u8]) -> std::io::Result<()> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// Child processes of `pid`, with their state letter (`Z`: zombie), from /proc.
pub fn children_of(pid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut f = rest.split(' ');
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if f.next().and_then(|pp| pp.parse::<u32>().ok()) == Some(pid) {
            out.push((p, state));
        }
    }
    out
}

/// Open descriptors of process `pid`, from /proc.
pub fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sends `sig` to `pid` (with kill(1), to need no unsafe code here).
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// Whether `program` runs here (`program arg` succeeds). Under CI its absence fails the test,
/// since `.ci/run` installs it; elsewhere the caller skips, and this says why.
pub fn tool_available(program: &str, arg: &str, install: &str) -> bool {
    let found = Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(!is_ci(), "{program} is required when CI is set ({install})");
        eprintln!("SKIPPED: {program} is not installed ({install})");
    }
    found
}

/// A free TCP port on 127.0.0.1 (free when this returns; nobody else should take it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
