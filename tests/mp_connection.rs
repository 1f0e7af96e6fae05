//! Python's `multiprocessing.connection`: interop with every CPython >= 3.11 found (Client
//! against our server, our client against Listener), the 3.11 exchange byte for byte, and
//! malformed or oversized frames.

mod util;

use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use proptest::prelude::*;
use socketserver::{
    Auth, Error, Handler, HandlerResult, MpConnection, MpVersion, Request, TcpServer,
    UnixStreamServer, mp_client_handshake, mp_connect, mp_connect_with, mp_server_handshake,
};
use util::{Python, eventually, serve};

const KEY: &str = "interop secret";
const WRONG_KEY: &str = "not the secret";
/// Bounds every Python child: generous, for a loaded 2-core machine.
const PY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bounds every socket read of a raw peer in these tests.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

const VERSIONS: [MpVersion; 2] = [MpVersion::Modern, MpVersion::Legacy];

fn minor(py: &Python) -> u32 {
    py.version
        .strip_prefix("3.")
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("unexpected Python version {}", py.version))
}

fn hmac_md5(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<md5::Md5> as KeyInit>::new_from_slice(key).unwrap();
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

/// `payload` with its 4-byte big-endian length in front, as Python frames it.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    v
}

/// Whether `e` is the clean end of the connection (end of file where a message would start).
fn is_eof(e: &Error) -> bool {
    let by_hand = e.is_io()
        && e.io_error()
            .is_some_and(|io| io.kind() == io::ErrorKind::UnexpectedEof);
    assert_eq!(e.is_eof(), by_hand, "Error::is_eof disagrees for {e}");
    by_hand
}

/// Our server's handler: counts that it ran, then echoes every message back.
struct MpEcho {
    handled: Arc<AtomicUsize>,
}

impl Handler for MpEcho {
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        self.handled.fetch_add(1, Ordering::SeqCst);
        let mut conn = MpConnection::new(req.stream());
        let mut buf = Vec::new();
        loop {
            match conn.recv_bytes_into(&mut buf) {
                Ok(()) => conn.send_bytes(&buf)?,
                Err(e) if is_eof(&e) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn mp_server(
    auth: Auth,
) -> (
    util::Running<impl socketserver::transport::Transport>,
    SocketAddr,
    Arc<AtomicUsize>,
) {
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let server = TcpServer::builder(move || MpEcho { handled: h.clone() })
        .auth(auth)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    (serve(server), addr, handled)
}

/// A Python child whose stdout lines arrive on a channel; killed and reaped on drop.
struct Kid {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    what: String,
}

impl Kid {
    fn spawn(py: &Python, script: &str, args: &[&str]) -> Kid {
        let mut child = py.spawn(script, args);
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Kid {
            child,
            lines,
            stderr,
            what: format!("python {}", py.version),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The next stdout line, waiting at most `PY_TIMEOUT`.
    fn line(&self) -> String {
        self.lines.recv_timeout(PY_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "{}: no line on stdout ({e}); stderr:\n{}",
                self.what,
                self.stderr()
            )
        })
    }

    /// Waits for the child to exit, at most `PY_TIMEOUT` (it is killed on drop otherwise).
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {PY_TIMEOUT:?}; stderr:\n{}",
                self.what,
                self.stderr()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Accepts one connection, waiting at most `IO_TIMEOUT`; the stream gets read/write timeouts.
fn accept_within(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                return s;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "nobody connected");
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

const PY_CLIENT: &str = r#"
import sys
from multiprocessing.connection import Client, AuthenticationError
port, key = int(sys.argv[1]), sys.argv[2].encode()
try:
    c = Client(("127.0.0.1", port), authkey=key)
except AuthenticationError as e:
    print("AuthenticationError:", e, flush=True)
    sys.exit(3)
for m in [b"", b"hello", bytes(range(256)) * 4096]:
    c.send_bytes(m)
    r = c.recv_bytes()
    assert r == m, (len(m), len(r))
c.close()
print("OK", flush=True)
"#;

#[test]
fn python_client_echoes_through_our_server_both_versions() {
    util::init_logs();
    for py in util::pythons() {
        eprintln!("interop with CPython {} ({})", py.version, py.exe.display());
        for version in VERSIONS {
            let auth = Auth::multiprocessing(KEY).mp_version(version);
            let (running, addr, handled) = mp_server(auth);
            let port = addr.port().to_string();
            let out = py.run(PY_CLIENT, &[&port, KEY], PY_TIMEOUT);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.trim() == "OK",
                "python {} vs {version:?}: {} {stdout}\n{}",
                py.version,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(eventually(IO_TIMEOUT, || running.handle.stats().active == 0));
            let stats = running.handle.stats();
            assert_eq!(handled.load(Ordering::SeqCst), 1);
            assert_eq!(stats.auth_failures, 0, "{stats:?}");
            assert_eq!(stats.handler_errors, 0, "{stats:?}");
            drop(running);
        }
    }
}

#[test]
fn python_client_with_wrong_key_is_refused_before_the_handler() {
    util::init_logs();
    for py in util::pythons() {
        eprintln!("interop with CPython {} ({})", py.version, py.exe.display());
        for version in VERSIONS {
            let auth = Auth::multiprocessing(KEY).mp_version(version);
            let (running, addr, handled) = mp_server(auth);
            let port = addr.port().to_string();
            let out = py.run(PY_CLIENT, &[&port, WRONG_KEY], PY_TIMEOUT);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                out.status.code(),
                Some(3),
                "python {} vs {version:?}: {stdout}\n{}",
                py.version,
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                stdout.trim(),
                "AuthenticationError: digest sent was rejected"
            );
            assert!(
                eventually(IO_TIMEOUT, || running.handle.stats().auth_failures == 1),
                "{:?}",
                running.handle.stats()
            );
            let server = running.stop();
            assert_eq!(handled.load(Ordering::SeqCst), 0, "the handler ran");
            assert_eq!(server.stats().auth_failures, 1);
        }
    }
}

#[test]
fn python_client_over_a_unix_socket() {
    util::init_logs();
    let Some(py) = util::python3() else { return };
    let path = util::sock_path("mp");
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let server = UnixStreamServer::builder(move || MpEcho { handled: h.clone() })
        .auth(Auth::multiprocessing(KEY))
        .bind(&path)
        .unwrap();
    let running = serve(server);
    let script = r#"
import sys
from multiprocessing.connection import Client
with Client(sys.argv[1], authkey=sys.argv[2].encode()) as c:
    c.send_bytes(b"over AF_UNIX")
    assert c.recv_bytes() == b"over AF_UNIX"
print("OK")
"#;
    let out = py.run(script, &[path.to_str().unwrap(), KEY], PY_TIMEOUT);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "OK",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(eventually(IO_TIMEOUT, || running.handle.stats().active == 0));
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    drop(running);
    let _ = std::fs::remove_file(&path);
}

const PY_LISTENER: &str = r#"
import sys
from multiprocessing.connection import Listener, AuthenticationError
key, n = sys.argv[1].encode(), int(sys.argv[2])
with Listener(("127.0.0.1", 0), authkey=key) as l:
    print(l.address[1], flush=True)
    for _ in range(n):
        try:
            c = l.accept()
        except AuthenticationError as e:
            print("AuthenticationError:", e, flush=True)
            continue
        count = 0
        while True:
            try:
                m = c.recv_bytes()
            except EOFError:
                break
            c.send_bytes(m)
            count += 1
        c.close()
        print("served", count, flush=True)
"#;

fn echo_three(conn: &mut MpConnection<TcpStream>) {
    conn.get_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    for m in [&b""[..], b"hello", &big] {
        conn.send_bytes(m).unwrap();
        assert_eq!(conn.recv_bytes().unwrap(), m);
    }
}

#[test]
fn our_client_against_python_listener() {
    util::init_logs();
    for py in util::pythons() {
        eprintln!("interop with CPython {} ({})", py.version, py.exe.display());
        let mut kid = Kid::spawn(&py, PY_LISTENER, &[KEY, "3"]);
        let port: u16 = kid.line().parse().expect("port");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let timeout = Duration::from_secs(10);

        let mut conn = mp_connect(addr, KEY.as_bytes(), timeout).unwrap();
        echo_three(&mut conn);
        drop(conn);
        assert_eq!(kid.line(), "served 3", "{}", py.version);

        let mut conn = mp_connect_with(addr, KEY.as_bytes(), timeout, MpVersion::Legacy).unwrap();
        echo_three(&mut conn);
        drop(conn);
        assert_eq!(kid.line(), "served 3", "{}", py.version);

        let e = mp_connect(addr, WRONG_KEY.as_bytes(), timeout).unwrap_err();
        assert!(e.is_auth_rejected(), "{}: {e:?}", py.version);
        assert!(
            e.to_string().starts_with("digest rejected with 127.0.0.1:"),
            "{e}"
        );
        assert_eq!(
            kid.line(),
            "AuthenticationError: digest received was wrong",
            "{}",
            py.version
        );
        assert!(kid.wait().success(), "{}", kid.stderr());
    }
}

const PY_RAW_CLIENT: &str = r#"
import sys
from multiprocessing.connection import Client
c = Client(("127.0.0.1", int(sys.argv[1])), authkey=sys.argv[2].encode())
c.send_bytes(b"after")
print("OK", flush=True)
"#;

/// A raw Rust peer plays a listener of the given form against the real Python `Client` and
/// checks every byte Python sends.
fn python_client_bytes(py: &Python, listener_3_12: bool) {
    let key = KEY.as_bytes();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let mut kid = Kid::spawn(py, PY_RAW_CLIENT, &[&port, KEY]);
    let mut s = accept_within(&listener);
    let py_3_12 = minor(py) >= 12;

    // Our challenge and Python's answer.
    let message: Vec<u8> = if listener_3_12 {
        [&b"{sha256}"[..], &[0x5a; 40]].concat()
    } else {
        vec![0xa5; 20]
    };
    s.write_all(&framed(&[&b"#CHALLENGE#"[..], &message].concat()))
        .unwrap();
    let want = if listener_3_12 && py_3_12 {
        framed(&[&b"{sha256}"[..], &hmac_sha256(key, &message)].concat())
    } else {
        // 3.11 always answers raw MD5 (over the whole message, prefix included); 3.12+ does
        // for a 20-byte challenge.
        framed(&hmac_md5(key, &message))
    };
    assert_eq!(hex::encode(read_n(&mut s, want.len())), hex::encode(&want));
    s.write_all(b"\x00\x00\x00\x09#WELCOME#").unwrap();

    // Python's challenge, and our answer as the listener we play would give it.
    let (len, prefix): (usize, &[u8]) = if py_3_12 {
        (11 + 8 + 40, b"#CHALLENGE#{sha256}")
    } else {
        (11 + 20, b"#CHALLENGE#")
    };
    let frame = read_n(&mut s, 4 + len);
    assert_eq!(frame[..4], (len as u32).to_be_bytes(), "{}", py.version);
    assert_eq!(&frame[4..4 + prefix.len()], prefix, "{}", py.version);
    let theirs = &frame[4 + 11..];
    let answer = if listener_3_12 && py_3_12 {
        [&b"{sha256}"[..], &hmac_sha256(key, theirs)].concat()
    } else {
        hmac_md5(key, theirs)
    };
    s.write_all(&framed(&answer)).unwrap();
    assert_eq!(read_n(&mut s, 13), b"\x00\x00\x00\x09#WELCOME#");
    assert_eq!(read_n(&mut s, 9), b"\x00\x00\x00\x05after");
    assert_eq!(kid.line(), "OK");
    assert!(kid.wait().success(), "{}", kid.stderr());
}

#[test]
fn python_client_bytes_on_the_wire_match_the_reference() {
    for py in util::pythons() {
        eprintln!("interop with CPython {} ({})", py.version, py.exe.display());
        python_client_bytes(&py, false);
        python_client_bytes(&py, true);
    }
}

/// Plays a Python 3.11 client against `s`, checking each byte the server sends, and returns
/// the stream once the handshake is over.
fn play_3_11_client(s: &mut (impl Read + Write), key: &[u8]) {
    let head = read_n(s, 4 + 11);
    assert_eq!(
        hex::encode(&head),
        hex::encode(b"\x00\x00\x00\x1f#CHALLENGE#")
    );
    let r = read_n(s, 20);
    s.write_all(&framed(&hmac_md5(key, &r))).unwrap();
    assert_eq!(read_n(s, 13), b"\x00\x00\x00\x09#WELCOME#");
    let ours = [0x42u8; 20];
    s.write_all(&framed(&[&b"#CHALLENGE#"[..], &ours].concat()))
        .unwrap();
    let want = framed(&hmac_md5(key, &ours));
    assert_eq!(want[..4], [0, 0, 0, 0x10]);
    assert_eq!(hex::encode(read_n(s, 20)), hex::encode(&want));
    s.write_all(b"\x00\x00\x00\x09#WELCOME#").unwrap();
}

#[test]
fn legacy_server_speaks_python_3_11_byte_for_byte() {
    let auth = Auth::multiprocessing(KEY).mp_version(MpVersion::Legacy);
    let (running, addr, handled) = mp_server(auth);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    play_3_11_client(&mut s, KEY.as_bytes());
    s.write_all(b"\x00\x00\x00\x02hi").unwrap();
    assert_eq!(read_n(&mut s, 6), b"\x00\x00\x00\x02hi");
    drop(s);
    assert!(eventually(IO_TIMEOUT, || running.handle.stats().active == 0));
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    // Same exchange through the public handshake on a plain socket pair.
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    b.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let server = thread::spawn(move || {
        mp_server_handshake(a, KEY.as_bytes(), MpVersion::Legacy).map(|mut c| c.recv_bytes())
    });
    play_3_11_client(&mut b, KEY.as_bytes());
    b.write_all(b"\x00\x00\x00\x03end").unwrap();
    assert_eq!(server.join().unwrap().unwrap().unwrap(), b"end");
}

#[test]
fn legacy_client_speaks_python_3_11_byte_for_byte() {
    let key = KEY.as_bytes();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = thread::spawn(move || {
        mp_connect_with(addr, key, IO_TIMEOUT, MpVersion::Legacy).and_then(|mut c| {
            c.send_bytes(b"hi")?;
            c.recv_bytes()
        })
    });
    let mut s = accept_within(&listener);
    let r = [0x17u8; 20];
    s.write_all(b"\x00\x00\x00\x1f#CHALLENGE#").unwrap();
    s.write_all(&r).unwrap();
    let want = [&[0, 0, 0, 0x10][..], &hmac_md5(key, &r)].concat();
    assert_eq!(hex::encode(read_n(&mut s, 20)), hex::encode(&want));
    s.write_all(b"\x00\x00\x00\x09#WELCOME#").unwrap();
    assert_eq!(
        hex::encode(read_n(&mut s, 15)),
        hex::encode(b"\x00\x00\x00\x1f#CHALLENGE#")
    );
    let theirs = read_n(&mut s, 20);
    s.write_all(&framed(&hmac_md5(key, &theirs))).unwrap();
    assert_eq!(read_n(&mut s, 13), b"\x00\x00\x00\x09#WELCOME#");
    assert_eq!(read_n(&mut s, 6), b"\x00\x00\x00\x02hi");
    s.write_all(b"\x00\x00\x00\x02ok").unwrap();
    assert_eq!(client.join().unwrap().unwrap(), b"ok");
}

#[test]
fn silent_client_times_out_and_the_handler_never_runs() {
    let auth = Auth::multiprocessing(KEY).handshake_timeout(Duration::from_millis(300));
    let (running, addr, handled) = mp_server(auth);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let head = read_n(&mut s, 4 + 19);
    assert_eq!(head, b"\x00\x00\x00\x3b#CHALLENGE#{sha256}");
    let start = Instant::now();
    let rest = util::read_to_eof(&mut s).unwrap_or_default();
    assert_eq!(
        rest.len(),
        40,
        "only the challenge, then the connection is closed"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(eventually(IO_TIMEOUT, || running
        .handle
        .stats()
        .handshake_timeouts
        == 1));
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    assert_eq!(running.handle.stats().auth_failures, 0);
}

#[test]
fn connect_times_out_against_a_silent_listener() {
    // gh-123736: Python's Client waits forever here.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let start = Instant::now();
    let e = mp_connect(addr, KEY.as_bytes(), Duration::from_millis(300)).unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    drop(listener);
}

#[test]
fn empty_key_is_refused_up_front() {
    // gh-88118: Python's Client freezes with an empty authkey.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let e = mp_connect(addr, b"", IO_TIMEOUT).unwrap_err();
    assert!(e.is_config(), "{e:?}");
    let e = TcpServer::builder(|| MpEcho {
        handled: Arc::default(),
    })
    .auth(Auth::multiprocessing(Vec::new()))
    .bind("127.0.0.1:0")
    .unwrap_err();
    assert!(e.is_config(), "{e:?}");
}

#[test]
fn oversized_answer_is_cut_without_waiting_for_it() {
    let (running, addr, handled) = mp_server(Auth::multiprocessing(KEY));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    read_n(&mut s, 4 + 59);
    // Announce 2 GiB - 1 bytes, send none: the server must refuse at once, not wait or allocate.
    s.write_all(b"\x7f\xff\xff\xff").unwrap();
    let rest = util::read_to_eof(&mut s).unwrap_or_default();
    assert!(
        rest.is_empty(),
        "no verdict after a bad message length: {rest:?}"
    );
    assert!(eventually(IO_TIMEOUT, || running
        .handle
        .stats()
        .auth_failures
        == 1));
    assert_eq!(running.handle.stats().handshake_timeouts, 0);
    assert_eq!(handled.load(Ordering::SeqCst), 0);
}

/// A peer whose bytes are scripted; what we write is recorded.
#[derive(Debug)]
struct Scripted {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Scripted {
    fn new(input: Vec<u8>) -> Scripted {
        Scripted {
            input: Cursor::new(input),
            output: Vec::new(),
        }
    }
}

impl Read for Scripted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn recv(wire: &[u8], max: usize) -> (Result<Vec<u8>, Error>, usize) {
    let mut c = MpConnection::new(Cursor::new(wire.to_vec())).with_max_message(max);
    let mut buf = Vec::new();
    let r = c.recv_bytes_into(&mut buf).map(|()| buf.clone());
    (r, buf.capacity())
}

#[test]
fn malformed_frames_are_typed_errors_without_allocation() {
    let long = |n: u64| [&[0xff; 4][..], &n.to_be_bytes()].concat();
    type Case = (&'static str, Vec<u8>, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        ("-2", b"\xff\xff\xff\xfe".to_vec(), Error::is_bad_message),
        (
            "i32::MIN",
            b"\x80\x00\x00\x00".to_vec(),
            Error::is_bad_message,
        ),
        ("-1 and u64::MAX", long(u64::MAX), Error::is_too_large),
        ("-1 and 2^63", long(1 << 63), Error::is_too_large),
        ("-1 and max + 1", long(1025), Error::is_too_large),
        ("max + 1", b"\x00\x00\x04\x01".to_vec(), Error::is_too_large),
        (
            "2 GiB - 1",
            b"\x7f\xff\xff\xff".to_vec(),
            Error::is_too_large,
        ),
        ("header cut", b"\x00\x00".to_vec(), Error::is_bad_message),
        (
            "long header cut",
            b"\xff\xff\xff\xff\x00\x00".to_vec(),
            Error::is_bad_message,
        ),
        (
            "payload cut",
            b"\x00\x00\x04\x00abc".to_vec(),
            Error::is_bad_message,
        ),
    ];
    for (name, wire, pred) in cases {
        let (r, cap) = recv(&wire, 1024);
        let e = r.expect_err(name);
        assert!(pred(&e), "{name}: {e:?}");
        assert!(cap <= 1024, "{name}: {cap} bytes allocated");
        if e.is_too_large() || name.starts_with('-') || name.starts_with('i') {
            assert!(e.to_string().contains("bad message length"), "{name}: {e}");
            assert_eq!(cap, 0, "{name}");
        }
    }
    // A 1 MiB length allowed by the maximum, but only 3 bytes sent: memory follows the bytes.
    let (r, cap) = recv(b"\x00\x10\x00\x00abc", 1 << 20);
    assert!(r.unwrap_err().is_bad_message());
    assert!(cap <= 64 * 1024, "{cap} bytes allocated for 3");
    // At a message boundary, end of file is the peer closing: an I/O error, UnexpectedEof.
    let (r, _) = recv(b"", 1024);
    assert!(is_eof(&r.unwrap_err()));
    // Exactly the maximum is fine, in either length form.
    let (r, _) = recv(&[&b"\x00\x00\x00\x03"[..], b"abc"].concat(), 3);
    assert_eq!(r.unwrap(), b"abc");
    let (r, _) = recv(&[&long(3)[..], b"abc"].concat(), 3);
    assert_eq!(r.unwrap(), b"abc");
}

#[test]
fn handshake_rejects_malformed_messages_with_typed_errors() {
    let key = KEY.as_bytes();
    let server = |input: Vec<u8>| {
        let mut io = Scripted::new(input);
        let e = mp_server_handshake(&mut io, key, MpVersion::Modern).unwrap_err();
        (e, io.output)
    };
    // Answers: too long, lying 8-byte length, cut short, garbage of a legal size.
    for (input, bad_message) in [
        (framed(&[0u8; 257]), true),
        ([&[0xff; 4][..], &[0x7f; 8]].concat(), true),
        (b"\x00\x00\x00\x28{sha256}".to_vec(), true),
        (framed(b"{sha256}0123456789abcdef0123456789abcdef"), false),
        (framed(&[0u8; 16]), false),
    ] {
        let (e, out) = server(input);
        if bad_message {
            assert!(e.is_bad_message(), "{e:?}");
            assert_eq!(out.len(), 4 + 59, "no verdict");
        } else {
            assert!(e.is_auth_failed(), "{e:?}");
            assert!(e.to_string().starts_with("digest wrong"), "{e}");
            assert!(out.ends_with(b"\x00\x00\x00\x09#FAILURE#"));
        }
    }
    let (e, _) = server(framed(&[0u8; 257]));
    assert!(e.to_string().contains("bad message length"), "{e}");

    let client = |input: Vec<u8>| {
        let mut io = Scripted::new(input);
        mp_client_handshake(&mut io, key, MpVersion::Modern).unwrap_err()
    };
    let e = client(framed(b"#WELCOME#"));
    assert!(e.is_bad_message(), "{e:?}");
    let e = client(framed(&[&b"#CHALLENGE#"[..], &[1; 19]].concat()));
    assert!(e.is_bad_message(), "{e:?}");
    let e = client(framed(&[&b"#CHALLENGE#"[..], &[1; 300]].concat()));
    assert!(e.to_string().contains("bad message length"), "{e}");
    let challenge = framed(&[&b"#CHALLENGE#"[..], &[1; 20]].concat());
    let e = client([&challenge[..], &framed(b"#FAILURE#")].concat());
    assert!(e.is_auth_rejected(), "{e:?}");
    assert!(e.to_string().starts_with("digest rejected"), "{e}");
    let e = client([&challenge[..], &framed(b"#WELCOME")].concat());
    assert!(e.is_auth_rejected(), "{e:?}");
}

fn frame_strategy() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        any::<i32>().prop_map(|n| n.to_be_bytes().to_vec()),
        any::<u64>().prop_map(|n| [&[0xff; 4][..], &n.to_be_bytes()].concat()),
        (0u32..300).prop_map(|n| n.to_be_bytes().to_vec()),
        (65_536u32..1 << 20).prop_map(|n| n.to_be_bytes().to_vec()),
        (0u64..300).prop_map(|n| [&[0xff; 4][..], &n.to_be_bytes()].concat()),
    ];
    (header, proptest::collection::vec(any::<u8>(), 0..300))
        .prop_map(|(h, body)| [h, body].concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_input_never_panics_or_allocates_its_claimed_length(
        frames in proptest::collection::vec(frame_strategy(), 0..6),
        raw in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let wire = [frames.concat(), raw].concat();
        let max = 1 << 20;
        let mut c = MpConnection::new(Cursor::new(wire.clone())).with_max_message(max);
        let mut buf = Vec::new();
        while c.recv_bytes_into(&mut buf).is_ok() {
            prop_assert!(buf.len() <= wire.len());
        }
        // A lying length of up to 1 MiB costs at most what was sent plus one 64 KiB step.
        prop_assert!(buf.capacity() <= 64 * 1024 + 2 * wire.len(), "{}", buf.capacity());

        let mut io = Scripted::new(wire.clone());
        let r = mp_server_handshake(&mut io, KEY.as_bytes(), MpVersion::Modern);
        prop_assert!(r.is_err(), "random bytes passed the server handshake");
        let mut io = Scripted::new(wire);
        let r = mp_client_handshake(&mut io, KEY.as_bytes(), MpVersion::Legacy);
        prop_assert!(r.is_err(), "random bytes passed the client handshake");
    }
}

/// Receives one message on `ours` within `budget`, on a thread of its own.
fn receive_within(
    ours: std::os::unix::net::UnixStream,
    budget: &socketserver::MpBudget,
) -> thread::JoinHandle<Result<Vec<u8>, Error>> {
    let budget = budget.clone();
    thread::spawn(move || MpConnection::new(ours).with_budget(budget).recv_bytes())
}

#[test]
fn partly_received_messages_share_one_budget_and_give_it_back() {
    use socketserver::MpBudget;
    use std::os::unix::net::UnixStream;
    const KIB: usize = 1024;
    let budget = MpBudget::new(1024 * KIB);
    let message: Vec<u8> = (0..800 * KIB).map(|i| i as u8).collect();
    let wire = framed(&message);

    // A: 700 KiB of an 800 KiB message arrive, then the sender pauses.
    let (a_ours, mut a_peer) = UnixStream::pair().unwrap();
    let a = receive_within(a_ours, &budget);
    let split = 4 + 700 * KIB;
    let a_sender = {
        let head = wire[..split].to_vec();
        let mut peer = a_peer.try_clone().unwrap();
        thread::spawn(move || peer.write_all(&head).unwrap())
    };
    assert!(
        eventually(Duration::from_secs(10), || budget.in_use() >= 700 * KIB),
        "{budget:?}"
    );
    a_sender.join().unwrap();
    let held_by_a = budget.in_use();

    // B: another 800 KiB message finds no room beside A's and is refused, typed.
    let (b_ours, mut b_peer) = UnixStream::pair().unwrap();
    let b = receive_within(b_ours, &budget);
    let b_sender = {
        let wire = wire.clone();
        thread::spawn(move || {
            // Fails with a broken pipe once B gives up: expected.
            let _ = b_peer.write_all(&wire);
        })
    };
    // (Never print a message: 800 KiB of numbers.)
    let Err(e) = b.join().unwrap() else {
        panic!("B was not refused")
    };
    assert!(e.is_too_large(), "{e}");
    assert!(e.to_string().contains("in-flight budget"), "{e}");
    b_sender.join().unwrap();
    // B's part was given back; A still holds its own.
    assert_eq!(budget.in_use(), held_by_a);

    // A completes whole, and gives its part back.
    a_peer.write_all(&wire[split..]).unwrap();
    assert!(
        a.join().unwrap().unwrap() == message,
        "A's message arrived altered"
    );
    assert_eq!(budget.in_use(), 0);

    // A failed read gives back too: end of file inside a message.
    let (c_ours, mut c_peer) = UnixStream::pair().unwrap();
    let c = receive_within(c_ours, &budget);
    c_peer.write_all(&wire[..split]).unwrap();
    drop(c_peer);
    let Err(e) = c.join().unwrap() else {
        panic!("C read a truncated message")
    };
    assert!(e.is_bad_message(), "{e}");
    assert_eq!(budget.in_use(), 0);

    // Alone, a message larger than the whole budget still gets through: the budget bounds
    // messages in flight together, max_message each one.
    let big: Vec<u8> = vec![7; 3 * 1024 * KIB];
    let mut conn = MpConnection::new(Cursor::new(framed(&big))).with_budget(budget.clone());
    assert!(
        conn.recv_bytes().unwrap() == big,
        "the big message arrived altered"
    );
    assert_eq!(budget.in_use(), 0);

    // By default every connection draws on the one process-wide budget.
    let conn = MpConnection::new(Cursor::new(Vec::new()));
    assert_eq!(conn.budget().capacity(), socketserver::DEFAULT_MP_BUDGET);
}

#[test]
fn a_header_with_no_body_does_not_hold_its_thread() {
    // A logged-in client declares a 1 MiB message, sends 10 bytes of it, and goes silent. The
    // idle timeout cuts it. (With the default minimum data rate of the server's streams, the
    // explicit idle_timeout becomes unnecessary.)
    let errors = Arc::new(Mutex::new(Vec::new()));
    let errs = errors.clone();
    let server = TcpServer::builder(move || MpEcho {
        handled: Arc::new(AtomicUsize::new(0)),
    })
    .auth(Auth::multiprocessing(KEY))
    .idle_timeout(Duration::from_millis(300))
    .handle_error(move |_, failure| errs.lock().unwrap().push(failure.to_string()))
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let conn = mp_connect(addr, KEY.as_bytes(), IO_TIMEOUT).unwrap();
    let mut s = conn.into_inner();
    s.write_all(&(1024 * 1024u32).to_be_bytes()).unwrap();
    s.write_all(&[0u8; 10]).unwrap();
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 1];
    let closed = matches!(s.read(&mut b), Ok(0) | Err(_)) && t.elapsed() < Duration::from_secs(5);
    assert!(closed, "connection still open after {:?}", t.elapsed());
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .idle_closed
        == 1));
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .active
        == 0));
    let errors = errors.lock().unwrap();
    assert!(
        errors.iter().any(|e| e.contains("message truncated")),
        "{errors:?}"
    );
}
