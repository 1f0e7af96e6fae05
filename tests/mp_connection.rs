//! Python's `multiprocessing.connection` on the wire: the 3.11 exchange byte for byte, deadlines
//! on the server's handshake, and malformed or oversized frames. (Interop with real CPython is
//! in tests/interop.rs.)

mod util;

use std::io::{self, Cursor, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use socketserver::{
    Auth, Digest, Error, MpConnection, MpVersion, TcpServer, mp_client_handshake, mp_connect,
    mp_connect_with, mp_server_handshake,
};
use util::{MpEcho, accept_within, eventually, framed, mp_server, read_n, serve};

const KEY: &str = "interop secret";
/// Bounds every socket read of a raw peer in these tests.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn hmac_md5(key: &[u8], msg: &[u8]) -> Vec<u8> {
    util::hmac(Digest::Md5, key, msg)
}

/// Whether `e` is the clean end of the connection (end of file where a message would start).
fn is_eof(e: &Error) -> bool {
    let by_hand = e.is_io()
        && e.io_error()
            .is_some_and(|io| io.kind() == io::ErrorKind::UnexpectedEof);
    assert_eq!(e.is_eof(), by_hand, "Error::is_eof disagrees for {e}");
    by_hand
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
    let mut s = accept_within(&listener, IO_TIMEOUT);
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
    let auth = Auth::multiprocessing(KEY);
    let (running, addr, handled) = util::mp_server_within(auth, Duration::from_millis(300));
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

/// Reads the server's 3.12+ challenge from `s` and returns the framed answer the key gives.
fn answer_to_challenge(s: &mut TcpStream) -> Vec<u8> {
    let frame = read_n(s, 4 + 11 + 8 + 40);
    assert_eq!(frame[..4 + 19], *b"\x00\x00\x00\x3b#CHALLENGE#{sha256}");
    mp_answer(&frame[4 + 11..])
}

/// `{sha256}` and the HMAC-SHA256 of `message` under `KEY`, framed: the 3.12+ answer.
fn mp_answer(message: &[u8]) -> Vec<u8> {
    let mac = util::hmac(Digest::Sha256, KEY.as_bytes(), message);
    framed(&[&b"{sha256}"[..], &mac].concat())
}

/// Writes `bytes` one at a time, each in its own segment, pausing `pause` after each; false
/// once a write fails (the server has hung up).
fn trickle(s: &mut TcpStream, bytes: &[u8], pause: Duration) -> bool {
    s.set_nodelay(true).unwrap();
    for b in bytes {
        if s.write_all(&[*b]).is_err() {
            return false;
        }
        thread::sleep(pause);
    }
    true
}

#[test]
fn a_handshake_trickled_a_byte_at_a_time_within_the_deadline_succeeds() {
    let timeout = Duration::from_secs(10);
    let (running, addr, handled) = util::mp_server_within(Auth::multiprocessing(KEY), timeout);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let t = Instant::now();
    // Each of our three messages a byte at a time, 5 ms apart: the answer to the server's
    // challenge, our own challenge, and the verdict on the server's answer.
    let pause = Duration::from_millis(5);
    let answer = answer_to_challenge(&mut s);
    assert!(trickle(&mut s, &answer, pause), "cut off");
    assert_eq!(read_n(&mut s, 13), b"\x00\x00\x00\x09#WELCOME#");
    let ours = [&b"{sha256}"[..], &[0x33; 40]].concat();
    let challenge = framed(&[&b"#CHALLENGE#"[..], &ours].concat());
    assert!(trickle(&mut s, &challenge, pause), "cut off");
    assert_eq!(read_n(&mut s, 4 + 8 + 32), mp_answer(&ours));
    assert!(trickle(&mut s, b"\x00\x00\x00\x09#WELCOME#", pause));
    let took = t.elapsed();
    // The handler has the connection now.
    s.write_all(&framed(b"after a slow handshake")).unwrap();
    assert_eq!(read_n(&mut s, 4 + 22), framed(b"after a slow handshake"));
    drop(s);
    assert!(eventually(IO_TIMEOUT, || running.handle.stats().active == 0));
    let stats = running.handle.stats();
    assert_eq!(handled.load(Ordering::SeqCst), 1, "{stats:?}");
    assert_eq!((stats.handshake_timeouts, stats.auth_failures), (0, 0));
    assert!(
        took < timeout,
        "the trickle took {took:?}: no test of the deadline"
    );
}

#[test]
fn a_handshake_trickled_past_the_deadline_times_out() {
    let timeout = Duration::from_millis(400);
    let (running, addr, handled) = util::mp_server_within(Auth::multiprocessing(KEY), timeout);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let answer = answer_to_challenge(&mut s);
    // 44 bytes 30 ms apart: each pause far inside the deadline, the whole 1.3 s past it.
    let t = Instant::now();
    let finished = trickle(&mut s, &answer, Duration::from_millis(30));
    let took = t.elapsed();
    let rest = util::read_to_eof(&mut s).unwrap_or_default();
    assert!(
        !finished,
        "the server took a trickled answer for {took:?} with a {timeout:?} deadline; it sent {rest:?}"
    );
    assert!(rest.is_empty(), "no verdict after a timeout: {rest:?}");
    assert!(
        eventually(IO_TIMEOUT, || running.handle.stats().handshake_timeouts
            == 1),
        "{:?}",
        running.handle.stats()
    );
    assert_eq!(running.handle.stats().auth_failures, 0);
    assert_eq!(handled.load(Ordering::SeqCst), 0);
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
    let e = TcpServer::builder(|| util::MpEcho {
        handled: Default::default(),
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
