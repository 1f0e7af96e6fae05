//! Interop with real CPython, every 3.8+ interpreter found (`python3` on PATH and pyenv's): the
//! tutorial's HMAC handshake both ways, `multiprocessing.connection` both ways and byte for
//! byte, and the standard library's socket clients against each server kind.
//!
//! Its own harness (libtest-mimic, `harness = false`) so that what did not run says so: each
//! case runs once per interpreter it applies to, as `case::cpython3.N`, and a case with no
//! interpreter to run on is reported **ignored**, with the reason, in the summary line. Under CI
//! (`CI` set) finding no CPython at all fails every case instead. Cases that need one side of
//! the `multiprocessing` handshake that changed in 3.12 run only on the interpreters that speak
//! it; where none is installed, the byte-exact transcripts recorded from CPython 3.11, 3.12 and
//! 3.13 (unit tests in src/mp.rs) and our own `MpVersion::Legacy` cover it, and the case is
//! ignored, even under CI.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Completion, Trial};
use socketserver::{
    Auth, Digest, Dispatch, MpConnection, MpVersion, TcpServer, UdpServer, UnixDatagramServer,
    UnixStreamServer, connect_with_auth, mp_connect, mp_connect_with,
};
use util::{
    DatagramEcho, MpEcho, Python, accept_within, eventually, framed, line_echo, mp_server, read_n,
    serve, sock_path,
};

/// Bounds every Python child: generous, for a loaded 2-core machine.
const PY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bounds every socket read of a raw peer in these tests.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// The interpreters a case applies to: minor versions `from..=to` of CPython 3.
struct Case {
    name: &'static str,
    from: u32,
    to: u32,
    run: fn(&Python),
}

const ANY: (u32, u32) = (util::MIN_PYTHON_MINOR, u32::MAX);

const fn case(name: &'static str, (from, to): (u32, u32), run: fn(&Python)) -> Case {
    Case {
        name,
        from,
        to,
        run,
    }
}

const CASES: &[Case] = &[
    case(
        "hmac::tutorial_client_against_our_server",
        ANY,
        tutorial_client_against_our_server,
    ),
    case(
        "hmac::our_client_against_a_tutorial_server",
        ANY,
        our_client_against_a_tutorial_server,
    ),
    case(
        "mp::client_echoes_through_our_server_both_versions",
        ANY,
        mp_client_echoes,
    ),
    case(
        "mp::client_with_wrong_key_is_refused_before_the_handler",
        ANY,
        mp_client_wrong_key,
    ),
    case("mp::client_over_a_unix_socket", ANY, mp_client_over_unix),
    case(
        "mp::our_client_against_a_listener",
        ANY,
        our_client_against_listener,
    ),
    // Python's Client sends the 3.11 handshake up to 3.11 and the {sha256} one from 3.12.
    case(
        "mp::client_bytes_3_11_handshake",
        (util::MIN_PYTHON_MINOR, 11),
        mp_client_bytes,
    ),
    case(
        "mp::client_bytes_3_12_handshake",
        (12, u32::MAX),
        mp_client_bytes,
    ),
    case("udp::client_round_trips", ANY, udp_client),
    case(
        "unix_datagram::client_round_trips",
        ANY,
        unix_datagram_client,
    ),
    case("unix_stream::client_round_trips", ANY, unix_stream_client),
    case(
        "examples::tutorial_with_the_readmes_python_client",
        ANY,
        tutorial_example,
    ),
];

fn main() {
    let args = Arguments::from_args();
    let found = util::pythons();
    let mut trials = Vec::new();
    for case in CASES {
        let on: Vec<Python> = found
            .iter()
            .filter(|p| (case.from..=case.to).contains(&p.minor))
            .cloned()
            .collect();
        if on.is_empty() {
            trials.push(not_run(case, &found));
        }
        for py in on {
            let run = case.run;
            let name = format!("{}::cpython{}", case.name, py.version);
            trials.push(Trial::test(name, move || {
                util::init_logs();
                run(&py);
                Ok(())
            }));
        }
    }
    libtest_mimic::run(&args, trials).exit();
}

/// The trial for a case no interpreter found applies to: ignored with the reason, or failed
/// under CI when there is no CPython at all.
fn not_run(case: &Case, found: &[Python]) -> Trial {
    let fail = found.is_empty() && util::is_ci();
    let why = if found.is_empty() {
        format!(
            "no CPython 3.{}+ found (python3 on PATH, $PYENV_ROOT or ~/.pyenv/versions/*/bin/python3){}",
            util::MIN_PYTHON_MINOR,
            if fail {
                ": required when CI is set"
            } else {
                ""
            }
        )
    } else {
        let versions: Vec<&str> = found.iter().map(|p| p.version.as_str()).collect();
        format!(
            "needs CPython 3.{}{}, found only {}; the byte-exact CPython transcripts in src/mp.rs cover it",
            case.from,
            if case.to == u32::MAX {
                "+".to_string()
            } else {
                format!(" to 3.{}", case.to)
            },
            versions.join(", ")
        )
    };
    Trial::ignorable_test(case.name, move || {
        if fail {
            Err(why.into())
        } else {
            Ok(Completion::ignored_with(why))
        }
    })
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

// The tutorial's HMAC handshake.

const HMAC_KEY: &str = "alex_s";

const PY_TUTORIAL_CLIENT: &str = r#"
import hmac, socket, sys
port, key, digest = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
sk = socket.socket()
sk.settimeout(10)
sk.connect(('127.0.0.1', port))
msg = b''
while len(msg) < 32:              # the tutorial's sk.recv(32), made robust
    chunk = sk.recv(32 - len(msg))
    if not chunk:
        break
    msg += chunk
res = hmac.new(key, msg, digest).hexdigest()
sk.send(res.encode('utf-8'))
try:
    sk.sendall(b'hello from python\n')
    data = sk.recv(1024)
except ConnectionResetError:
    data = b''
print('REPLY', data)
sk.close()
"#;

fn tutorial_client_against_our_server(py: &Python) {
    for digest in [Digest::Md5, Digest::Sha256] {
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let server = TcpServer::builder(move || util::counting_echo(&r))
            .dispatch(Dispatch::Thread)
            .auth(Auth::hmac(HMAC_KEY).digest(digest))
            .bind("127.0.0.1:0")
            .unwrap();
        let port = server.local_addr().inet().unwrap().port().to_string();
        let running = serve(server);
        let out = py.run(
            PY_TUTORIAL_CLIENT,
            &[&port, HMAC_KEY, digest.name()],
            PY_TIMEOUT,
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("REPLY b'hello from python\\n'"),
            "{digest}: {stdout}"
        );
        let out = py.run(
            PY_TUTORIAL_CLIENT,
            &[&port, "not-the-key", digest.name()],
            PY_TIMEOUT,
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("REPLY b''"),
            "{digest}: wrong key was answered: {stdout}"
        );
        assert!(eventually(IO_TIMEOUT, || running
            .handle
            .stats()
            .auth_failures
            == 1));
        assert_eq!(ran.load(Ordering::SeqCst), 1, "{digest}");
    }
}

/// The README's client for `examples/tutorial.rs`, word for word (the README shows this body).
const PY_README_TUTORIAL_CLIENT: &str = r#"
import hmac, socket, sys

port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
sk = socket.socket()
sk.connect(("127.0.0.1", port))
challenge = sk.recv(32)
sk.send(hmac.new(b"alex_s", challenge, "md5").hexdigest().encode("utf-8"))
for _ in range(3):
    print(sk.recv(1024))  # b'hello'
    sk.send(b"byebye")
sk.close()
"#;

/// `examples/tutorial.rs` as a program, with the README's Python client: three greetings each
/// way, and a client with the wrong key refused before the handler says a word.
fn tutorial_example(py: &Python) {
    let readme = include_str!("../README.md");
    assert!(
        readme.contains(&format!(
            "```python\n{}```",
            PY_README_TUTORIAL_CLIENT.trim_start()
        )),
        "README.md no longer shows the tutorial's client as this test runs it"
    );
    let mut server = std::process::Command::new(util::example_exe("tutorial"))
        .arg("127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the tutorial example");
    let (tx, said) = mpsc::channel();
    let out = server.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = || {
        said.recv_timeout(IO_TIMEOUT)
            .expect("a line from the tutorial example")
    };
    let port = next()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("the example says where it listens")
        .to_string();
    let out = py.run(PY_README_TUTORIAL_CLIENT, &[&port], PY_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("b'hello'").count(), 3, "{stdout}");
    for _ in 0..3 {
        let line = next();
        assert!(line.ends_with(r#" says "byebye""#), "{line}");
    }
    // Then "... hung up", or nothing when the client's close crossed the next `hello` (a reset).
    let _ = said.recv_timeout(Duration::from_millis(300));
    // The wrong key: no greeting, and the handler never runs.
    let wrong = PY_README_TUTORIAL_CLIENT.replace(r#"b"alex_s""#, r#"b"wrong!""#);
    let out = py.run(&wrong, &[&port], PY_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("hello"), "wrong key greeted: {stdout}");
    thread::sleep(Duration::from_millis(300));
    let _ = server.kill();
    let _ = server.wait();
    assert!(said.try_recv().is_err(), "the handler ran for a wrong key");
}

const PY_TUTORIAL_SERVER: &str = r#"
import hmac, os, socket, sys
key, digest = sys.argv[1].encode(), sys.argv[2]
sk = socket.socket()
sk.bind(('127.0.0.1', 0))
sk.listen()
sk.settimeout(10)
print(sk.getsockname()[1], flush=True)
conn, addr = sk.accept()
conn.settimeout(10)
msg = os.urandom(32)
conn.send(msg)
result = hmac.new(key, msg, digest)
# The tutorial reads recv(1024), which can swallow what the client sends after the digest;
# read exactly the digest's length instead.
client_digest = conn.recv(len(result.hexdigest()))
if hmac.compare_digest(result.hexdigest(), client_digest.decode('utf-8', 'replace')):
    print('LEGAL', flush=True)
    conn.sendall(conn.recv(1024))
else:
    print('ILLEGAL', flush=True)
conn.close()
sk.close()
"#;

fn our_client_against_a_tutorial_server(py: &Python) {
    for digest in [Digest::Md5, Digest::Sha256] {
        for (key, legal) in [(HMAC_KEY.as_bytes(), true), (&b"wrong key"[..], false)] {
            let mut kid = Kid::spawn(py, PY_TUTORIAL_SERVER, &[HMAC_KEY, digest.name()]);
            let port: u16 = kid.line().parse().expect("python printed its port");
            let result = (|| {
                let mut s =
                    connect_with_auth(("127.0.0.1", port), key, digest, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"ping")?;
                let mut got = Vec::new();
                s.read_to_end(&mut got)?;
                Ok::<_, socketserver::Error>(got)
            })();
            let verdict = kid.line();
            assert!(kid.wait().success(), "{}", kid.stderr());
            if legal {
                assert_eq!(verdict, "LEGAL", "{digest}");
                assert_eq!(result.unwrap(), b"ping");
            } else {
                assert_eq!(verdict, "ILLEGAL", "{digest}");
                // No acknowledgement in this protocol: the refusal shows as end-of-file.
                assert!(result.map_or(true, |got| got.is_empty()));
            }
        }
    }
}

// multiprocessing.connection.

const MP_KEY: &str = "interop secret";
const MP_WRONG_KEY: &str = "not the secret";
const VERSIONS: [MpVersion; 2] = [MpVersion::Modern, MpVersion::Legacy];

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

fn mp_client_echoes(py: &Python) {
    for version in VERSIONS {
        let auth = Auth::multiprocessing(MP_KEY).mp_version(version);
        let (running, addr, handled) = mp_server(auth);
        let port = addr.port().to_string();
        let out = py.run(PY_CLIENT, &[&port, MP_KEY], PY_TIMEOUT);
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

fn mp_client_wrong_key(py: &Python) {
    for version in VERSIONS {
        let auth = Auth::multiprocessing(MP_KEY).mp_version(version);
        let (running, addr, handled) = mp_server(auth);
        let port = addr.port().to_string();
        let out = py.run(PY_CLIENT, &[&port, MP_WRONG_KEY], PY_TIMEOUT);
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

fn mp_client_over_unix(py: &Python) {
    let path = sock_path("mp");
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let server = UnixStreamServer::builder(move || MpEcho { handled: h.clone() })
        .auth(Auth::multiprocessing(MP_KEY))
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
    let out = py.run(script, &[path.to_str().unwrap(), MP_KEY], PY_TIMEOUT);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "OK",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(eventually(IO_TIMEOUT, || running.handle.stats().active == 0));
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    drop(running);
    assert!(!path.exists());
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

fn our_client_against_listener(py: &Python) {
    let mut kid = Kid::spawn(py, PY_LISTENER, &[MP_KEY, "3"]);
    let port: u16 = kid.line().parse().expect("port");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let timeout = Duration::from_secs(10);

    let mut conn = mp_connect(addr, MP_KEY.as_bytes(), timeout).unwrap();
    echo_three(&mut conn);
    drop(conn);
    assert_eq!(kid.line(), "served 3", "{}", py.version);

    let mut conn = mp_connect_with(addr, MP_KEY.as_bytes(), timeout, MpVersion::Legacy).unwrap();
    echo_three(&mut conn);
    drop(conn);
    assert_eq!(kid.line(), "served 3", "{}", py.version);

    let e = mp_connect(addr, MP_WRONG_KEY.as_bytes(), timeout).unwrap_err();
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

const PY_RAW_CLIENT: &str = r#"
import sys
from multiprocessing.connection import Client
c = Client(("127.0.0.1", int(sys.argv[1])), authkey=sys.argv[2].encode())
c.send_bytes(b"after")
print("OK", flush=True)
"#;

/// A raw Rust peer plays a 3.11 listener, then a 3.12 one, against the real Python `Client`
/// and checks every byte Python sends: the 3.11 handshake from 3.8-3.11, the `{sha256}` one
/// from 3.12 on.
fn mp_client_bytes(py: &Python) {
    for listener_3_12 in [false, true] {
        mp_client_bytes_against(py, listener_3_12);
    }
}

fn mp_client_bytes_against(py: &Python, listener_3_12: bool) {
    let key = MP_KEY.as_bytes();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let mut kid = Kid::spawn(py, PY_RAW_CLIENT, &[&port, MP_KEY]);
    let mut s = accept_within(&listener, IO_TIMEOUT);
    let py_3_12 = py.minor >= 12;

    // Our challenge and Python's answer.
    let message: Vec<u8> = if listener_3_12 {
        [&b"{sha256}"[..], &[0x5a; 40]].concat()
    } else {
        vec![0xa5; 20]
    };
    s.write_all(&framed(&[&b"#CHALLENGE#"[..], &message].concat()))
        .unwrap();
    let want = if listener_3_12 && py_3_12 {
        framed(&[&b"{sha256}"[..], &util::hmac(Digest::Sha256, key, &message)].concat())
    } else {
        // 3.11 and older always answer raw MD5 (over the whole message, prefix included);
        // 3.12+ does for a 20-byte challenge.
        framed(&util::hmac(Digest::Md5, key, &message))
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
        [&b"{sha256}"[..], &util::hmac(Digest::Sha256, key, theirs)].concat()
    } else {
        util::hmac(Digest::Md5, key, theirs)
    };
    s.write_all(&framed(&answer)).unwrap();
    assert_eq!(read_n(&mut s, 13), b"\x00\x00\x00\x09#WELCOME#");
    assert_eq!(read_n(&mut s, 9), b"\x00\x00\x00\x05after");
    assert_eq!(kid.line(), "OK");
    assert!(kid.wait().success(), "{}", kid.stderr());
}

// The standard library's socket clients against each server kind.

fn udp_client(py: &Python) {
    let server = UdpServer::builder(DatagramEcho::default)
        .bind("127.0.0.1:0")
        .unwrap();
    let port = server.local_addr().inet().unwrap().port().to_string();
    let running = serve(server);
    py.run_ok(
        r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
for _ in range(3):
    s.sendto(b"hello world\n", ("127.0.0.1", int(sys.argv[1])))
    data, _ = s.recvfrom(8192)
    assert data == b"hello world\n", data
print("OK")
"#,
        &[&port],
    );
    assert_eq!(running.stop().stats().accepted, 3);
}

fn unix_datagram_client(py: &Python) {
    let path = sock_path("dgram-py");
    let client_path = sock_path("dgram-py-client");
    let server = UnixDatagramServer::builder(DatagramEcho::default)
        .bind(&path)
        .unwrap();
    let running = serve(server);
    py.run_ok(
        r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.settimeout(5)
s.bind(sys.argv[2])
try:
    for _ in range(3):
        s.sendto(b"hello world\n", sys.argv[1])
        data = s.recv(8192)
        assert data == b"hello world\n", data
    print("OK")
finally:
    os.unlink(sys.argv[2])
"#,
        &[path.to_str().unwrap(), client_path.to_str().unwrap()],
    );
    drop(running);
    assert!(!path.exists());
    assert!(!client_path.exists());
}

fn unix_stream_client(py: &Python) {
    let path = sock_path("py");
    let server = UnixStreamServer::bind(&path, line_echo).unwrap();
    let running = serve(server);
    py.run_ok(
        r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
f = s.makefile("rwb")
for _ in range(3):
    f.write(b"hello world\n"); f.flush()
    assert f.readline() == b"hello world\n"
print("OK")
"#,
        &[path.to_str().unwrap()],
    );
    drop(running);
    assert!(!path.exists());
}
