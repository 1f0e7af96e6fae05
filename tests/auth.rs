//! `Auth`: the tutorial's HMAC challenge-response as server middleware and as a client, against
//! itself and against clients that misbehave, and the handshake cap. (Against real CPython:
//! tests/interop.rs.)

mod util;

use util::{InMode, Mode};

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socketserver::transport::Tcp;
use socketserver::{
    Addr, Auth, Builder, CHALLENGE_LEN, Digest, TcpServer, answer_challenge, connect_with_auth,
};
use util::{ByteEcho, connect, eventually, serve};

const KEY: &[u8] = b"alex_s";

/// An echo server behind `auth`, and the count of handlers that ran.
fn echo_server(auth: Auth, mode: Mode) -> (util::Running<Tcp<ByteEcho>>, Addr, Arc<AtomicUsize>) {
    echo_server_with(auth, mode, |b| b)
}

/// [`echo_server`], with more settings (the handshake deadline, say) made by `adjust`.
fn echo_server_with(
    auth: Auth,
    mode: Mode,
    adjust: impl FnOnce(Builder<Tcp<ByteEcho>>) -> Builder<Tcp<ByteEcho>>,
) -> (util::Running<Tcp<ByteEcho>>, Addr, Arc<AtomicUsize>) {
    util::init_logs();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let server = adjust(TcpServer::builder(move || util::counting_echo(&r)))
        .mode(mode)
        .auth(auth)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    (serve(server), addr, ran)
}

fn read_challenge(s: &mut TcpStream) -> [u8; CHALLENGE_LEN] {
    let mut c = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut c).unwrap();
    c
}

fn hex_mac(digest: Digest, key: &[u8], challenge: &[u8]) -> String {
    hex::encode(util::hmac(digest, key, challenge))
}

/// True if the server closed the connection (EOF or reset) within the read timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn right_key_echoes_in_every_mode_with_both_digests() {
    for mode in util::STREAM_MODES {
        for digest in [Digest::Md5, Digest::Sha256] {
            let (running, addr, ran) = echo_server(Auth::hmac(KEY).digest(digest), mode);
            let mut s = connect_with_auth(&addr, KEY, digest, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"hello world\n").unwrap();
            let mut got = [0u8; 12];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hello world\n");
            drop(s);
            let server = running.stop();
            assert_eq!(ran.load(Ordering::SeqCst), 1, "{mode:?} {digest}");
            assert_eq!(server.stats().auth_failures, 0);
        }
    }
}

#[test]
fn wrong_key_never_reaches_the_handler_and_is_counted() {
    for mode in util::STREAM_MODES {
        let (running, addr, ran) = echo_server(Auth::hmac(KEY), mode);
        let mut s =
            connect_with_auth(&addr, b"wrong", Digest::Sha256, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"hello\n");
        assert!(closed_by_server(&mut s), "{mode:?}: connection not closed");
        assert!(eventually(Duration::from_secs(5), || running
            .handle
            .stats()
            .auth_failures
            == 1));
        assert_eq!(ran.load(Ordering::SeqCst), 0, "{mode:?}: handler ran");
        // The right key with the wrong digest (an MD5 answer to a SHA-256 server) fails too:
        // its 32 hex characters and the 32 bytes after them make a 64-character reply that is
        // not the SHA-256 digest.
        let mut md5 = connect_with_auth(&addr, KEY, Digest::Md5, Duration::from_secs(5)).unwrap();
        md5.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = md5.write_all(&[b'0'; 32]);
        assert!(
            closed_by_server(&mut md5),
            "{mode:?}: md5 answer accepted by a sha256 server"
        );
        assert!(eventually(Duration::from_secs(5), || running
            .handle
            .stats()
            .auth_failures
            == 2));
        // And the server goes on.
        let mut ok = connect_with_auth(&addr, KEY, Digest::Sha256, Duration::from_secs(5)).unwrap();
        ok.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        ok.read_exact(&mut b).unwrap();
        drop(ok);
        drop(running);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}

#[test]
fn digest_and_data_in_one_write_reach_the_handler_whole() {
    let (running, addr, _) = echo_server(Auth::hmac(KEY).digest(Digest::Md5), Mode::Thread);
    let mut s = connect(&addr);
    let challenge = read_challenge(&mut s);
    let mut first = hex_mac(Digest::Md5, KEY, &challenge).into_bytes();
    first.extend_from_slice(b"application bytes right after the digest");
    s.write_all(&first).unwrap();
    let mut got = vec![0u8; 40];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, b"application bytes right after the digest");
    drop(s); // close joins in-flight handlers (block_on_close): hang up first
    drop(running);
}

#[test]
fn an_uppercase_hex_digest_is_the_same_digest() {
    // Python's hexdigest() is lowercase; the same MAC in uppercase hex is accepted too (it
    // proves the same key).
    let (running, addr, ran) = echo_server(Auth::hmac(KEY), Mode::Thread);
    let mut s = connect(&addr);
    let challenge = read_challenge(&mut s);
    let upper = hex_mac(Digest::Sha256, KEY, &challenge).to_ascii_uppercase();
    s.write_all(upper.as_bytes()).unwrap();
    s.write_all(b"U").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"U");
    drop(s);
    drop(running);
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

#[test]
fn a_replayed_digest_is_rejected() {
    let (running, addr, ran) = echo_server(Auth::hmac(KEY), Mode::Thread);
    let mut first = connect(&addr);
    let c1 = read_challenge(&mut first);
    let captured = hex_mac(Digest::Sha256, KEY, &c1);
    first.write_all(captured.as_bytes()).unwrap();
    first.write_all(b"1").unwrap();
    let mut b = [0u8; 1];
    first.read_exact(&mut b).unwrap();

    let mut second = connect(&addr);
    let c2 = read_challenge(&mut second);
    assert_ne!(c1, c2, "challenges must be fresh");
    second.write_all(captured.as_bytes()).unwrap();
    assert!(closed_by_server(&mut second));
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .auth_failures
        == 1));
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "only the first session reached the handler"
    );
}

#[test]
fn malformed_answers_are_rejected_cleanly() {
    let (running, addr, ran) = echo_server(Auth::hmac(KEY), Mode::Pool(2));
    let cases: [(&str, Vec<u8>, bool); 4] = [
        ("truncated digest", b"0123456789abcdef".to_vec(), true),
        ("non-hex garbage", vec![b'z'; 64], false),
        ("over-long reply", vec![b'A'; 500], false),
        ("uppercase of a wrong digest", vec![b'F'; 64], false),
    ];
    for (i, (what, reply, half_close)) in cases.iter().enumerate() {
        let mut s = connect(&addr);
        read_challenge(&mut s);
        s.write_all(reply).unwrap();
        if *half_close {
            s.shutdown(Shutdown::Write).unwrap();
        }
        assert!(closed_by_server(&mut s), "{what}: not closed");
        assert!(
            eventually(Duration::from_secs(5), || running
                .handle
                .stats()
                .auth_failures
                == i as u64 + 1),
            "{what}: not counted"
        );
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    // Still serving honest clients.
    let mut ok = connect_with_auth(&addr, KEY, Digest::Sha256, Duration::from_secs(5)).unwrap();
    ok.write_all(b"k").unwrap();
    let mut b = [0u8; 1];
    ok.read_exact(&mut b).unwrap();
}

#[test]
fn a_silent_or_trickling_client_times_out() {
    let timeout = Duration::from_millis(300);
    let (running, addr, ran) = echo_server_with(Auth::hmac(KEY), Mode::Thread, |b| {
        b.handshake_timeout(timeout)
    });
    let mut silent = connect(&addr);
    read_challenge(&mut silent);
    let t = Instant::now();
    assert!(closed_by_server(&mut silent));
    let waited = t.elapsed();
    // The server's deadline started before our read did: allow for scheduling delays.
    assert!(
        waited >= timeout / 2 && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    // One hex character every 100 ms never completes: the deadline covers the whole handshake.
    let mut trickle = connect(&addr);
    read_challenge(&mut trickle);
    let t = Instant::now();
    let mut closed = false;
    for _ in 0..64 {
        if trickle.write_all(b"a").is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if t.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    assert!(
        closed || closed_by_server(&mut trickle),
        "trickling client not cut"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .handshake_timeouts
        == 2));
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

/// Silent handshakes fill the cap, and more connections keep arriving while an honest client
/// is in its handshake. The cap evicts the oldest unfinished handshake, so the honest client,
/// the newest, outlives `CAP - 1` arrivals and is served; the `CAP`-th makes it the oldest and
/// cuts it. (Evicting the newest instead would cut it at the first arrival.)
#[test]
fn the_cap_evicts_the_oldest_handshake_first() {
    const CAP: usize = 4;
    let timeout = Duration::from_secs(10);
    // A thread per connection, and a pool with no worker to spare: the cap's handshakes plus
    // the honest one. (With a pool no larger than the cap, no connection past the cap is ever
    // accepted, so nothing is evicted: silent clients hold every worker until they time out.)
    for mode in [Mode::Thread, Mode::Pool(CAP + 1)] {
        let (running, addr, ran) = echo_server_with(Auth::hmac(KEY), mode, |b| {
            b.handshake_timeout(timeout).max_pending_handshakes(CAP)
        });
        // A connection whose handshake has begun: the server sends the challenge only after
        // entering the handshake in its table of unfinished ones.
        let silent = || {
            let mut s = connect(&addr);
            read_challenge(&mut s);
            s
        };
        let mut held: Vec<TcpStream> = (0..CAP).map(|_| silent()).collect();
        for arrivals in [CAP - 1, CAP] {
            let mut honest = connect(&addr);
            let challenge = read_challenge(&mut honest);
            held.extend((0..arrivals).map(|_| silent()));
            let answer = hex_mac(Digest::Sha256, KEY, &challenge);
            let served = honest.write_all(answer.as_bytes()).is_ok()
                && honest.write_all(b"x").is_ok()
                && honest.read_exact(&mut [0u8; 1]).is_ok();
            assert_eq!(
                served,
                arrivals < CAP,
                "{mode:?}: cap {CAP}, {arrivals} connections arrived during the honest handshake"
            );
            drop(honest); // frees its worker
        }
        let stats = running.handle.stats();
        // The first honest client evicted one to enter; every arrival evicted one (the second
        // honest client found a free slot: the first had left).
        assert_eq!(
            stats.handshake_evictions,
            (1 + (CAP - 1) + CAP) as u64,
            "{mode:?}"
        );
        assert_eq!((stats.auth_failures, stats.handshake_timeouts), (0, 0));
        assert_eq!(ran.load(Ordering::SeqCst), 1, "{mode:?}");
        drop(held);
    }
}

#[test]
fn an_empty_key_is_rejected_when_the_server_is_built() {
    let e = TcpServer::builder(util::line_echo)
        .auth(Auth::hmac(Vec::new()))
        .bind("127.0.0.1:0")
        .unwrap_err();
    assert!(e.is_config(), "{e}");
    let mut s = std::io::Cursor::new(vec![0u8; 32]);
    assert!(
        answer_challenge(&mut s, b"", Digest::Md5)
            .unwrap_err()
            .is_config()
    );
}

#[test]
fn client_errors_are_typed() {
    // Refused: nobody listens.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let free = l.local_addr().unwrap();
    drop(l);
    let e = connect_with_auth(free, KEY, Digest::Md5, Duration::from_secs(2)).unwrap_err();
    assert!(e.is_refused(), "{e}");
    assert_eq!(e.addr().and_then(Addr::inet), Some(free));

    // Refused: the server closes before the challenge.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let closer = std::thread::spawn(move || drop(l.accept().unwrap()));
    let e = connect_with_auth(addr, KEY, Digest::Md5, Duration::from_secs(2)).unwrap_err();
    assert!(e.is_refused(), "{e}");
    closer.join().unwrap();

    // Timed out: the server never sends a challenge.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = Instant::now();
    let e = connect_with_auth(addr, KEY, Digest::Md5, Duration::from_millis(200)).unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}

#[test]
fn a_digest_mismatch_is_logged_as_one_not_as_a_bare_timeout() {
    util::in_own_process(
        "a_digest_mismatch_is_logged_as_one_not_as_a_bare_timeout",
        || {
            let timeout = Duration::from_millis(300);
            let (running, addr, ran) = echo_server_with(Auth::hmac(KEY), Mode::Thread, |b| {
                b.handshake_timeout(timeout)
            });
            // The tutorial's client: MD5, to a server that expects SHA-256 (the default).
            let mut md5_client = connect(&addr);
            let challenge = read_challenge(&mut md5_client);
            md5_client
                .write_all(hex_mac(Digest::Md5, KEY, &challenge).as_bytes())
                .unwrap();
            assert!(closed_by_server(&mut md5_client));
            assert!(eventually(Duration::from_secs(5), || running
                .handle
                .stats()
                .handshake_timeouts
                == 1));
            assert_eq!(ran.load(Ordering::SeqCst), 0);
            let lines = util::captured_logs();
            let line = lines
                .iter()
                .find(|l| l.message.contains("timed out"))
                .unwrap_or_else(|| panic!("no timeout logged: {lines:?}"));
            assert_eq!(line.level, log::Level::Warn);
            let peer = md5_client.local_addr().unwrap();
            assert_eq!(
                line.message,
                format!(
                    "handshake with {peer} timed out after {timeout:?}: 32 of 64 hex digits \
                 received: is the client using MD5 while the server expects SHA-256?"
                )
            );
        },
    );
}
