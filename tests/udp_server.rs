//! `UdpServer`: CPython's UDP echo cases, oversized datagrams, the empty-reply decision.

mod util;

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use socketserver::{Addr, DatagramHandler, DatagramRequest, Dispatch, HandlerResult, UdpServer};
use util::{DatagramEcho, eventually, serve};

const MODES: [Dispatch; 3] = [
    Dispatch::Sync,
    Dispatch::Thread,
    Dispatch::Pool { workers: 4 },
];

fn client_for(server: &Addr) -> UdpSocket {
    let bind = if server.inet().unwrap().is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let c = UdpSocket::bind(bind).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.connect(server.inet().unwrap()).unwrap();
    c
}

fn round_trip(c: &UdpSocket, msg: &[u8]) -> Vec<u8> {
    c.send(msg).unwrap();
    let mut buf = [0u8; 9000];
    let n = c.recv(&mut buf).expect("reply");
    buf[..n].to_vec()
}

#[test]
fn three_round_trips_in_every_mode_v4_and_v6() {
    util::init_logs();
    let v6 = util::ipv6_loopback();
    for mode in MODES {
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let is_v6 = host.starts_with('[');
            if is_v6 && !v6 {
                continue;
            }
            let ran = Arc::new(AtomicUsize::new(0));
            let r = ran.clone();
            let server = UdpServer::builder(move || DatagramEcho(r.clone()))
                .dispatch(mode)
                .bind(host)
                .unwrap();
            let addr = server.local_addr().clone();
            assert_eq!(addr.inet().unwrap().is_ipv6(), is_v6, "{addr}");
            assert_ne!(addr.inet().unwrap().port(), 0);
            let running = serve(server);
            let c = client_for(&addr);
            for _ in 0..3 {
                assert_eq!(round_trip(&c, b"hello world\n"), b"hello world\n");
            }
            let server = running.stop();
            assert_eq!(ran.load(Ordering::SeqCst), 3, "{mode:?}");
            assert_eq!(server.stats().accepted, 3);
            let port = addr.inet().unwrap();
            drop(server);
            // Closed: the port can be bound again.
            UdpSocket::bind(port).expect("port released on close");
        }
    }
}

#[test]
fn shutdown_from_inside_a_handler_in_every_mode() {
    for mode in MODES {
        let server = UdpServer::builder(DatagramEcho::default)
            .dispatch(mode)
            .bind("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr().clone();
        let running = serve(server);
        client_for(&addr).send(b"shutdown").unwrap();
        assert!(
            eventually(Duration::from_secs(5), || running.is_finished()),
            "{mode:?}"
        );
    }
}

#[test]
fn oversized_datagrams_are_reported_not_truncated() {
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let server = UdpServer::builder(move || DatagramEcho(r.clone()))
        .max_packet_size(100)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let c = client_for(&addr);
    c.send(&[b'x'; 101]).unwrap();
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .oversized_datagrams
        == 1));
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "handler saw a truncated datagram"
    );
    // Exactly the maximum is served whole.
    assert_eq!(round_trip(&c, &[b'y'; 100]), vec![b'y'; 100]);
}

#[test]
fn empty_replies_are_not_sent_unless_asked_for() {
    for send_empty in [false, true] {
        let server = UdpServer::builder(DatagramEcho::default)
            .send_empty_reply(send_empty)
            .bind("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr().clone();
        let running = serve(server);
        let c = client_for(&addr);
        // Expecting an empty reply, wait generously; expecting none, 300 ms (a reply arriving
        // later would still show up in the round trip below and fail it).
        let wait = if send_empty { 5_000 } else { 300 };
        c.set_read_timeout(Some(Duration::from_millis(wait)))
            .unwrap();
        c.send(b"silent").unwrap();
        let mut buf = [0u8; 16];
        match c.recv(&mut buf) {
            Ok(n) => assert!(send_empty && n == 0, "unexpected reply of {n} bytes"),
            Err(e) => assert!(!send_empty, "expected an empty reply, got {e}"),
        }
        // The server is still answering.
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(round_trip(&c, b"next"), b"next");
        drop(running);
    }
}

#[test]
fn handler_errors_are_counted_and_no_reply_is_sent() {
    struct Fails;
    impl DatagramHandler for Fails {
        fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult {
            req.wfile.extend_from_slice(b"partial");
            if req.packet() == b"panic" {
                panic!("datagram handler panicked");
            }
            Err("failed".into())
        }
    }
    let server = UdpServer::builder(|| Fails).bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let c = client_for(&addr);
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    c.send(b"error").unwrap();
    c.send(b"panic").unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        let s = running.handle.stats();
        s.handler_errors == 1 && s.panics == 1
    }));
    let mut buf = [0u8; 16];
    assert!(
        c.recv(&mut buf).is_err(),
        "a failed handler's partial reply was sent"
    );
}

#[test]
fn verify_request_drops_datagrams_from_unwanted_peers() {
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let server = UdpServer::builder(move || DatagramEcho(r.clone()))
        .verify_request(|_| false)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    client_for(&addr).send(b"hello").unwrap();
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .rejected
        == 1));
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[test]
fn a_second_udp_server_cannot_take_the_same_port() {
    let first = UdpServer::bind("127.0.0.1:0", DatagramEcho::default).unwrap();
    let addr = first.local_addr().inet().unwrap();
    let second = UdpServer::bind(addr, DatagramEcho::default);
    assert!(
        second.is_err(),
        "two UDP servers bound {addr} and would split its traffic"
    );
    drop(second);
    drop(first);
    // Explicitly asked for by both, SO_REUSEADDR is still available.
    let first = UdpServer::builder(DatagramEcho::default)
        .reuse_address(true)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = first.local_addr().inet().unwrap();
    let second = UdpServer::builder(DatagramEcho::default)
        .reuse_address(true)
        .bind(addr)
        .expect("both sockets set SO_REUSEADDR: the second bind succeeds");
    assert_eq!(second.local_addr().inet(), Some(addr));
}

/// Sends `total` numbered datagrams in bursts of `burst`, collecting each burst's echoes before
/// the next (a paced load that never overflows the socket buffers). Returns how many echoes came
/// back out of order (numbered below one already received) and how many never came back.
fn echo_in_bursts(c: &UdpSocket, total: u32, burst: u32) -> (u32, u32) {
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (mut out_of_order, mut lost, mut highest) = (0, 0, None);
    let mut buf = [0u8; 16];
    for start in (0..total).step_by(burst as usize) {
        let end = (start + burst).min(total);
        for i in start..end {
            c.send(&i.to_be_bytes()).unwrap();
        }
        for _ in start..end {
            let Ok(n) = c.recv(&mut buf) else {
                lost += 1;
                continue;
            };
            let i = u32::from_be_bytes(buf[..n].try_into().unwrap());
            if highest.is_some_and(|h| i < h) {
                out_of_order += 1;
            }
            highest = highest.max(Some(i));
        }
    }
    (out_of_order, lost)
}

#[test]
fn by_default_datagrams_are_answered_in_order_and_none_is_lost() {
    // Python's UDPServer is synchronous; a thread per datagram reordered 487 of 2,000 echoes.
    let server = UdpServer::bind("127.0.0.1:0", DatagramEcho::default).unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let c = client_for(&addr);
    let (out_of_order, lost) = echo_in_bursts(&c, 2000, 16);
    println!(
        "default dispatch: 2000 echoes in bursts of 16: {out_of_order} out of order, {lost} lost"
    );
    assert_eq!((out_of_order, lost), (0, 0));
    assert_eq!(running.handle.stats().accepted, 2000);
}

/// Replies `factor` times the datagram's size, part through `send` (the first byte of the
/// packet says how many times) and the rest through `wfile`; `x` in the packet lifts the guard.
struct Amplifier;

impl DatagramHandler for Amplifier {
    fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        let p = req.packet().to_vec();
        if p.contains(&b'x') {
            req.allow_any_reply_size();
        }
        let (sent, written) = (usize::from(p[0] - b'0'), usize::from(p[1] - b'0'));
        for _ in 0..sent {
            if let Err(e) = req.send(&p) {
                assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
                req.wfile.extend_from_slice(b"send refused");
                return Ok(());
            }
        }
        req.wfile = p.repeat(written);
        Ok(())
    }
}

/// Asserts that the replies to the last datagram have the sizes `expected` (and no more arrive
/// in the next 50 ms; a late one would also show up with the next datagram's).
fn assert_replies(c: &UdpSocket, expected: &[usize]) {
    let mut buf = [0u8; 9000];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got: Vec<usize> = expected
        .iter()
        .map_while(|_| c.recv(&mut buf).ok())
        .collect();
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    got.extend(c.recv(&mut buf).ok());
    assert_eq!(got, expected);
}

#[test]
fn replies_over_three_times_the_request_are_dropped_and_counted() {
    let server = UdpServer::bind("127.0.0.1:0", || Amplifier).unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let dropped = |n| {
        assert!(
            eventually(Duration::from_secs(5), || running
                .handle
                .stats()
                .amplification_dropped
                == n),
            "{:?}",
            running.handle.stats()
        );
    };
    let c = client_for(&addr);
    // 3x through wfile is allowed; so is 1x sent and 2x written.
    c.send(b"03-request-").unwrap();
    assert_replies(&c, &[33]);
    c.send(b"12-request-").unwrap();
    assert_replies(&c, &[11, 22]);
    // 4x through wfile is dropped whole, not truncated.
    c.send(b"04-request-").unwrap();
    dropped(1);
    assert_replies(&c, &[]);
    // The budget spans send and wfile: 2x sent leaves room for 1x, not 2x.
    c.send(b"22-request-").unwrap();
    dropped(2);
    assert_replies(&c, &[11, 11]);
    // A fourth send is refused with an error the handler sees (it then replies 12 bytes: 3x
    // the budget is spent, so that reply is dropped too).
    c.send(b"40-request-").unwrap();
    dropped(4);
    assert_replies(&c, &[11, 11, 11]);
    // The handler can lift the guard for a request it trusts.
    c.send(b"09-request-x").unwrap();
    assert_replies(&c, &[108]);
    dropped(4);
}

#[test]
fn the_amplification_guard_can_be_widened_or_turned_off() {
    for (ratio, expect) in [(Some(9), &[99][..]), (None, &[99]), (Some(1), &[])] {
        let server = UdpServer::builder(|| Amplifier)
            .max_reply_ratio(ratio)
            .bind("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr().clone();
        let running = serve(server);
        let c = client_for(&addr);
        c.send(b"09-request-").unwrap();
        assert_replies(&c, expect);
        // Served on the serving thread (sync): once it has stopped, the count is final.
        let dropped = running.stop().stats().amplification_dropped;
        assert_eq!(dropped, u64::from(expect.is_empty()), "{ratio:?}");
    }
}
