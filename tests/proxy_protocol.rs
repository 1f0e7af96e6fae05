//! The PROXY protocol stage (`Builder::proxy_protocol`): real headers from a real HAProxy (v1
//! and v2), and hand-made bad ones (untrusted, garbage, truncated, wrong signature, split,
//! slow, oversized), each refused with its counter; the bytes after a header reach the handler.

mod haproxy;
mod util;

use util::{InMode, Mode};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use proptest::prelude::*;
use socketserver::{
    Addr, AdmissionFailure, Auth, CHALLENGE_LEN, Digest, HandlerResult, Next, ProxyProtocol,
    Request, Stats, TcpServer, UnixStreamServer, handler_fn,
};
use util::{eventually, serve};

/// Tells the client who it is as the server sees it, then echoes lines: the first line is
/// `peer=... proxy=... v=... local=... authority=... cn=... first=<the client's first line>`.
fn describe(req: &mut Request) -> HandlerResult {
    let mut r = BufReader::new(req.stream().clone());
    let mut first = String::new();
    r.read_line(&mut first)?;
    let p = req.proxy();
    let line = format!(
        "peer={} proxy={} v={} local={} authority={} cn={} first={}",
        req.peer_addr(),
        req.proxy_addr().map_or("-".into(), |a| a.to_string()),
        p.map_or(0, |p| p.version()),
        p.is_some_and(|p| p.is_local()),
        p.and_then(|p| p.authority()).unwrap_or("-"),
        p.and_then(|p| p.ssl())
            .and_then(|s| s.cn)
            .unwrap_or("-".into()),
        first.trim_end()
    );
    writeln!(req, "{line}")?;
    let mut rest = String::new();
    while r.read_line(&mut rest)? > 0 {
        req.write_all(rest.as_bytes())?;
        rest.clear();
    }
    Ok(())
}

type Server = util::Running<
    socketserver::transport::Tcp<socketserver::HandlerFn<fn(&mut Request) -> HandlerResult>>,
>;

fn server(config: ProxyProtocol) -> (Server, SocketAddr) {
    util::init_logs();
    let s = TcpServer::builder(|| handler_fn(describe as fn(&mut Request) -> HandlerResult))
        .proxy_protocol(config)
        .handshake_timeout(Duration::from_secs(2))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = s.local_addr().inet().unwrap();
    (serve(s), addr)
}

fn loopback() -> ProxyProtocol {
    ProxyProtocol::trusting(["127.0.0.0/8"]).unwrap()
}

/// Sends `bytes` on a new connection, then reads the first line of the answer ("" if the
/// server closed without one).
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(bytes).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(c).read_line(&mut line);
    line
}

/// A v2 PROXY header for a TCP client `src` to `dst`, with `tlvs` (type, value).
fn v2(command: u8, src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    v2_with(command, &V2Addrs::Inet(src, dst, false), tlvs)
}

fn stats_within(running: &Server, check: impl Fn(&Stats) -> bool) -> Stats {
    let ok = eventually(Duration::from_secs(5), || check(&running.handle.stats()));
    let s = running.handle.stats();
    assert!(ok, "counters never got there: {s:?}");
    s
}

#[test]
fn a_v1_header_names_the_client_and_the_bytes_after_it_reach_the_handler() {
    let (running, addr) = server(loopback());
    // The header and the client's first line in one segment: the stage must stop at CRLF.
    let answer = exchange(
        addr,
        b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\nhello\n",
    );
    assert!(
        answer.starts_with("peer=203.0.113.7:56324 proxy=127.0.0.1:"),
        "{answer}"
    );
    assert!(
        answer.contains(" v=1 local=false ") && answer.ends_with("first=hello\n"),
        "{answer}"
    );
    drop(running);
}

#[test]
fn a_v2_header_gives_the_client_and_its_authority_and_ssl_tlvs() {
    let (running, addr) = server(loopback());
    // SSL TLV: client_ssl | cert_conn, verify 0, then a CN sub-TLV (0x22).
    let mut ssl = vec![0x03, 0, 0, 0, 0];
    ssl.extend_from_slice(&[0x22, 0, 6]);
    ssl.extend_from_slice(b"client");
    let mut bytes = v2(
        0x21,
        "198.51.100.9:40000".parse().unwrap(),
        "192.0.2.1:443".parse().unwrap(),
        &[(0x02, b"example.com"), (0x20, &ssl)],
    );
    bytes.extend_from_slice(b"hi there\n");
    let answer = exchange(addr, &bytes);
    assert!(
        answer.starts_with("peer=198.51.100.9:40000 proxy=127.0.0.1:"),
        "{answer}"
    );
    assert!(
        answer.contains(" v=2 local=false authority=example.com cn=client first=hi there"),
        "{answer}"
    );
    drop(running);
}

#[test]
fn a_local_header_is_a_health_check_and_keeps_the_real_addresses() {
    let (running, addr) = server(loopback());
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let me = c.local_addr().unwrap();
    let mut local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec();
    local.extend_from_slice(b"ping\n");
    c.write_all(&local).unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    assert!(
        line.starts_with(&format!("peer={me} proxy={me} v=2 local=true")),
        "{line}"
    );
    // v1's UNKNOWN is the same.
    let answer = exchange(addr, b"PROXY UNKNOWN\r\nping\n");
    assert!(
        answer.contains(" v=1 local=true ") && answer.contains("first=ping"),
        "{answer}"
    );
    drop(running);
}

#[test]
fn a_header_from_an_untrusted_peer_is_refused_without_being_read() {
    let (running, addr) = server(ProxyProtocol::trusting(["10.0.0.0/8"]).unwrap());
    let answer = exchange(addr, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nhello\n");
    assert_eq!(answer, "", "the handler ran for an untrusted peer");
    let s = stats_within(&running, |s| s.proxy_untrusted == 1);
    assert_eq!(s.proxy_malformed + s.proxy_missing, 0, "{s:?}");
    drop(running);
}

#[test]
fn bad_headers_are_refused_each_with_its_counter() {
    let (running, addr) = server(loopback());
    let peer = "1.2.3.4:5".parse().unwrap();
    let dst = "5.6.7.8:9".parse().unwrap();
    // No header at all: an HTTP request.
    assert_eq!(exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "");
    stats_within(&running, |s| s.proxy_missing == 1);
    // Garbage after a right start.
    assert_eq!(exchange(addr, b"PROXY TCP9 what is this\r\nhello\n"), "");
    stats_within(&running, |s| s.proxy_malformed == 1);
    // v2 with a wrong signature byte.
    let mut wrong = v2(0x21, peer, dst, &[]);
    wrong[4] = b'X';
    assert_eq!(exchange(addr, &wrong), "");
    stats_within(&running, |s| s.proxy_malformed == 2);
    // v2 with a bad version nibble.
    let mut version = v2(0x21, peer, dst, &[]);
    version[12] = 0x31;
    assert_eq!(exchange(addr, &version), "");
    stats_within(&running, |s| s.proxy_malformed == 3);
    // Truncated: half a header, then the client hangs up.
    let whole = v2(0x21, peer, dst, &[]);
    {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(&whole[..20]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(c.read(&mut [0; 16]).unwrap_or(0), 0);
    }
    stats_within(&running, |s| s.proxy_malformed == 4);
    // Oversized: a v1 line with no end, and a v2 that announces 60,000 bytes.
    let mut long = b"PROXY TCP4 ".to_vec();
    long.resize(300, b'1');
    assert_eq!(exchange(addr, &long), "");
    let mut huge = v2(0x21, peer, dst, &[]);
    huge[14..16].copy_from_slice(&60_000u16.to_be_bytes());
    assert_eq!(exchange(addr, &huge), "");
    let s = stats_within(&running, |s| s.proxy_oversized == 2);
    assert_eq!(
        (s.proxy_missing, s.proxy_malformed, s.proxy_untrusted),
        (1, 4, 0),
        "{s:?}"
    );
    // And the server still serves a good one.
    let ok = exchange(addr, b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 2000\r\nok\n");
    assert!(ok.starts_with("peer=1.2.3.4:1000 "), "{ok}");
    drop(running);
}

#[test]
fn a_header_split_over_many_segments_is_read_whole_and_no_further() {
    let (running, addr) = server(loopback());
    let mut bytes = v2(
        0x21,
        "192.0.2.50:1234".parse().unwrap(),
        "192.0.2.1:80".parse().unwrap(),
        &[(0x02, b"split.example")],
    );
    bytes.extend_from_slice(b"after\n");
    for (header, tail) in [
        (bytes.clone(), 6),
        (
            b"PROXY TCP4 192.0.2.50 192.0.2.1 1234 80\r\nafter\n".to_vec(),
            6,
        ),
    ] {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // One byte per segment, the last header byte together with the data.
        let (head, rest) = header.split_at(header.len() - tail - 1);
        for b in head {
            c.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        c.write_all(rest).unwrap();
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line).unwrap();
        assert!(line.starts_with("peer=192.0.2.50:1234 "), "{line}");
        assert!(line.ends_with("first=after\n"), "{line}");
    }
    drop(running);
}

#[test]
fn a_header_that_does_not_arrive_within_the_deadline_is_cut() {
    let (running, addr) = server(loopback());
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"PROXY TCP4 1.2.").unwrap();
    let started = std::time::Instant::now();
    // The server closes once its 2 s deadline passes.
    assert_eq!(c.read(&mut [0; 16]).unwrap_or(0), 0);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "{took:?}"
    );
    stats_within(&running, |s| s.proxy_timeouts == 1);
    drop(running);
}

/// Thread mode, and event mode on one worker (whose parked admissions keep the deadline
/// themselves).
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
const DEADLINE_MODES: [Mode; 2] = [Mode::Thread, Mode::Event(1)];
#[cfg(not(all(target_os = "linux", not(socketserver_portable))))]
const DEADLINE_MODES: [Mode; 1] = [Mode::Thread];

#[test]
fn one_deadline_covers_the_proxy_header_and_the_hmac_handshake_together() {
    util::init_logs();
    const KEY: &[u8] = b"header, then hmac";
    let deadline = Duration::from_millis(800);
    for mode in DEADLINE_MODES {
        let served = Arc::new(AtomicUsize::new(0));
        let s = served.clone();
        let server = TcpServer::builder(move || util::counting_echo(&s))
            .mode(mode)
            .proxy_protocol(loopback())
            .auth(Auth::hmac(KEY))
            .handshake_timeout(deadline)
            .bind("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr().inet().unwrap();
        let running = serve(server);
        let header = v2(0x21, "192.0.2.7:5555".parse().unwrap(), addr, &[]);
        // Sends the header in two halves `pause` apart, then the HMAC answer the same way;
        // true if the handler then echoes.
        let attempt = |pause: Duration| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.set_nodelay(true).unwrap();
            let (first, rest) = header.split_at(header.len() / 2);
            c.write_all(first).unwrap();
            std::thread::sleep(pause);
            c.write_all(rest).unwrap();
            // The challenge comes once the header is whole: the PROXY stage is over.
            let mut challenge = [0u8; CHALLENGE_LEN];
            c.read_exact(&mut challenge).unwrap();
            let answer = hex::encode(util::hmac(Digest::Sha256, KEY, &challenge));
            let (first, rest) = answer.as_bytes().split_at(answer.len() / 2);
            c.write_all(first).unwrap();
            std::thread::sleep(pause);
            // Once the server has cut the connection these may fail: the read tells.
            let _ = c.write_all(rest);
            let _ = c.write_all(b"ping");
            let mut echo = [0u8; 4];
            c.read_exact(&mut echo).is_ok() && &echo == b"ping"
        };
        // Both stages well within the deadline, together too: served.
        assert!(attempt(Duration::from_millis(100)), "{mode:?}");
        // Each stage within the deadline (500 ms of 800), together over it: cut.
        assert!(
            !attempt(Duration::from_millis(500)),
            "{mode:?}: the header and the handshake each had a deadline of their own"
        );
        assert!(
            eventually(Duration::from_secs(5), || running
                .handle
                .stats()
                .handshake_timeouts
                == 1),
            "{mode:?}: {:?}",
            running.handle.stats()
        );
        let stats = running.handle.stats();
        assert_eq!(
            (stats.auth_failures, stats.proxy_missing),
            (0, 0),
            "{mode:?}: {stats:?}"
        );
        assert_eq!(served.load(Ordering::SeqCst), 1, "{mode:?}");
    }
}

#[test]
fn verify_request_and_max_per_source_see_the_client_not_the_proxy() {
    util::init_logs();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let s = TcpServer::builder(|| handler_fn(describe as fn(&mut Request) -> HandlerResult))
        .proxy_protocol(loopback())
        .verify_request(move |peer| {
            log.lock().unwrap().push(peer.clone());
            peer.inet()
                .is_some_and(|a| a.ip().to_string() != "192.0.2.66")
        })
        .max_per_source(1)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = s.local_addr().inet().unwrap();
    let running = serve(s);
    assert_eq!(
        exchange(addr, b"PROXY TCP4 192.0.2.66 192.0.2.1 1 2\r\nx\n"),
        ""
    );
    stats_within(&running, |s| s.rejected == 1);
    // Two clients through the one proxy address: both served, though max_per_source is 1.
    let mut a = TcpStream::connect(addr).unwrap();
    a.write_all(b"PROXY TCP4 192.0.2.10 192.0.2.1 1 2\r\nx\n")
        .unwrap();
    let mut ra = BufReader::new(a.try_clone().unwrap());
    let mut line = String::new();
    ra.read_line(&mut line).unwrap();
    assert!(line.starts_with("peer=192.0.2.10:1 "), "{line}");
    let other = exchange(addr, b"PROXY TCP4 192.0.2.11 192.0.2.1 1 2\r\nx\n");
    assert!(other.starts_with("peer=192.0.2.11:1 "), "{other}");
    // A second connection of a client that is still connected is over its cap.
    assert_eq!(
        exchange(addr, b"PROXY TCP4 192.0.2.10 192.0.2.1 3 2\r\nx\n"),
        ""
    );
    stats_within(&running, |s| s.per_source_rejected == 1);
    drop((a, ra));
    let seen: Vec<String> = seen.lock().unwrap().iter().map(Addr::to_string).collect();
    assert_eq!(seen[0], "192.0.2.66:1");
    assert!(seen.iter().all(|p| p.starts_with("192.0.2.")), "{seen:?}");
    drop(running);
}

#[test]
fn a_unix_stream_server_takes_headers_from_any_local_peer() {
    util::init_logs();
    let path = util::sock_path("proxy");
    let s = UnixStreamServer::builder(|| handler_fn(describe as fn(&mut Request) -> HandlerResult))
        .proxy_protocol(ProxyProtocol::new())
        .bind(&path)
        .unwrap();
    let running = serve(s);
    let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"PROXY TCP6 2001:db8::5 2001:db8::1 4000 443\r\nunix\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    assert!(
        line.starts_with("peer=[2001:db8::5]:4000 proxy=unix:"),
        "{line}"
    );
    assert!(line.ends_with("first=unix\n"), "{line}");
    drop(running);
}

/// HAProxy in front, sending `option` (`send-proxy` or `send-proxy-v2`), with health checks
/// that send the header too: the handler sees the test's own socket as the client.
fn through_haproxy(option: &str, version: u8) {
    if !haproxy::available() {
        return;
    }
    let (running, addr) = server(loopback());
    let lb = haproxy::Haproxy::start(&format!(
        "  server s1 {addr} {option} check inter 200ms check-send-proxy"
    ));
    for i in 0..3 {
        let mut c = TcpStream::connect(lb.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let me = c.local_addr().unwrap();
        writeln!(c, "line {i}").unwrap();
        writeln!(c, "echo {i}").unwrap();
        let mut r = BufReader::new(c);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(
            line.starts_with(&format!("peer={me} proxy=127.0.0.1:")),
            "{line}"
        );
        assert!(
            line.contains(&format!(" v={version} local=false ")),
            "{line}"
        );
        assert!(line.ends_with(&format!("first=line {i}\n")), "{line}");
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, format!("echo {i}\n"));
    }
    // Health checks arrive with a header of their own (v2: LOCAL) and are accepted.
    let before = running.handle.stats().accepted;
    assert!(
        eventually(Duration::from_secs(5), || running.handle.stats().accepted
            >= before + 2),
        "no health check arrived"
    );
    let s = running.handle.stats();
    assert_eq!(
        (
            s.proxy_missing,
            s.proxy_malformed,
            s.proxy_untrusted,
            s.proxy_timeouts
        ),
        (0, 0, 0, 0),
        "{s:?}"
    );
    drop(lb);
    drop(running);
}

#[test]
fn through_haproxy_send_proxy_v1() {
    through_haproxy("send-proxy", 1);
}

#[test]
fn through_haproxy_send_proxy_v2() {
    through_haproxy("send-proxy-v2", 2);
}

#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[test]
fn event_dispatch_parks_until_the_header_is_whole_and_serves_the_real_client() {
    util::init_logs();
    // One worker: a header trickled in pieces must not hold it from another client.
    let server = TcpServer::builder(|| {
        socketserver::message_fn(|s| {
            let mut line = String::new();
            if s.rfile.read_line(&mut line)? == 0 {
                return Ok(socketserver::Next::Close);
            }
            let proxy = s.proxy_addr().map_or("-".into(), |a| a.to_string());
            let peer = s.peer_addr().to_string();
            writeln!(s.wfile, "peer={peer} proxy={proxy} {}", line.trim_end())?;
            Ok(socketserver::Next::Message)
        })
    })
    .event(1)
    .proxy_protocol(loopback())
    .handshake_timeout(Duration::from_secs(2))
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let client: SocketAddr = "192.0.2.7:5555".parse().unwrap();
    let header = v2(0x21, client, addr, &[]);
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.set_nodelay(true).unwrap();
    for piece in header.chunks(5) {
        slow.write_all(piece).unwrap();
        // Meanwhile a whole header and its line are served at once.
        let fast = exchange(
            addr,
            &[&v2(0x21, client, addr, &[])[..], b"fast\n"].concat(),
        );
        assert!(
            fast.starts_with("peer=192.0.2.7:5555 proxy=127.0.0.1:"),
            "{fast}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    slow.write_all(b"slow\n").unwrap();
    let mut line = String::new();
    BufReader::new(&slow).read_line(&mut line).unwrap();
    assert!(
        line.starts_with("peer=192.0.2.7:5555 proxy=127.0.0.1:"),
        "{line}"
    );
    assert!(line.trim_end().ends_with(" slow"), "{line}");
    // Bad input is refused as in the other modes.
    assert_eq!(exchange(addr, b"GET / HTTP/1.0\r\n\r\n"), "");
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .proxy_missing
        == 1));
    drop(slow);
    drop(running);
}

// The PROXY stage fed hostile input: arbitrary bytes, valid v1 and v2 headers (every address
// family, TLVs of every length), the same truncated and bit-flipped, split across reads. Each
// connection must end in exactly one verdict: the handler ran, with exactly the bytes after the
// header and the client the header named, or the connection was refused and counted once, under
// the reason the bytes call for. A peer outside the trusted blocks never gets past the stage.

/// The PROXY v2 signature.
const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v2 payload the server accepts (`ProxyProtocol::MAX_V2_PAYLOAD`).
const MAX_V2: usize = ProxyProtocol::MAX_V2_PAYLOAD;

/// A long-lived server for the property tests: its handler reports the peer it was given and
/// echoes every byte it reads until the client half-closes.
struct Target {
    addr: SocketAddr,
    handle: socketserver::ServerHandle,
    handled: Arc<AtomicUsize>,
    /// Its trust and dispatch mode, for a failure to name.
    name: String,
}

/// The property tests' handler: tells the client the peer it was given as soon as the
/// connection is admitted (so that one that sends nothing after its header is answered too),
/// then echoes every byte it reads until the client half-closes.
struct Report(Arc<AtomicUsize>);

impl socketserver::MessageHandler for Report {
    fn setup(&mut self, s: &mut socketserver::Request) -> HandlerResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        // Every accessor of what the stage kept of the header: none may panic.
        if let Some(p) = s.proxy() {
            let _ = (p.version(), p.is_local(), p.destination(), p.authority());
            let _ = (p.alpn(), p.unique_id(), p.ssl(), format!("{p:?}"));
        }
        let peer = format!("peer={}\n", s.peer_addr());
        s.wfile.write_all(peer.as_bytes())?;
        s.wfile.flush()?;
        Ok(())
    }

    fn handle_message(
        &mut self,
        s: &mut socketserver::Request,
    ) -> Result<Next, socketserver::HandlerError> {
        let mut rest = Vec::new();
        s.rfile.read_to_end(&mut rest)?;
        s.wfile.write_all(&rest)?;
        Ok(Next::Close)
    }
}

fn target(trust: &str, mode: Mode) -> Target {
    util::init_logs();
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let server = TcpServer::builder(move || Report(h.clone()))
        .mode(mode)
        .proxy_protocol(ProxyProtocol::trusting([trust]).unwrap())
        .handshake_timeout(Duration::from_secs(5))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let handle = server.handle();
    // Runs for the rest of the test process.
    std::thread::spawn(move || server.serve_forever());
    Target {
        addr,
        handle,
        handled,
        name: format!("{mode:?} trusting {trust}"),
    }
}

/// Where each property test sends its cases: its own servers, so that the counters each sees
/// move only with its own connections (the tests run in parallel).
struct Targets {
    thread: Target,
    event: Target,
    untrusted: Target,
}

impl Targets {
    fn new() -> Targets {
        Targets {
            thread: target("127.0.0.0/8", Mode::Thread),
            event: target("127.0.0.1", util::EVENT_MODE),
            // A v4-mapped block of another network: loopback is not in it.
            untrusted: target("::ffff:10.0.0.0/8", Mode::Thread),
        }
    }
}

/// What the bytes sent call for, worked out from the spec (independently of the server):
/// the header's length, or which refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// A header of this many bytes, complete (it may still fail to parse).
    Header(usize),
    Oversized,
    /// A header cut short by the end of the connection, or what is none but starts like one.
    Malformed,
    Missing,
}

fn expect(b: &[u8]) -> Expect {
    let starts =
        |sig: &[u8]| !b.is_empty() && b[..b.len().min(sig.len())] == sig[..b.len().min(sig.len())];
    if starts(SIG) {
        if b.len() < 16 {
            return Expect::Malformed;
        }
        let total = 16 + usize::from(u16::from_be_bytes([b[14], b[15]]));
        return match total {
            t if t > 16 + MAX_V2 => Expect::Oversized,
            t if b.len() >= t => Expect::Header(t),
            _ => Expect::Malformed,
        };
    }
    if starts(b"PROXY ") {
        return match b.iter().take(107).position(|&c| c == b'\n') {
            Some(i) => Expect::Header(i + 1),
            None if b.len() >= 107 => Expect::Oversized,
            None => Expect::Malformed,
        };
    }
    match b.first() {
        Some(b'\r' | b'P') => Expect::Malformed,
        _ => Expect::Missing,
    }
}

/// How one connection ended, from the server's counters and what the client got back.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The handler ran: the peer it saw and the bytes it read after the header.
    Served(String, Vec<u8>),
    /// Refused, counted under this `proxy_*` counter (and once as a PROXY admission failure).
    Refused(&'static str),
}

fn proxy_counters(s: &Stats) -> [(&'static str, u64); 5] {
    [
        ("untrusted", s.proxy_untrusted),
        ("missing", s.proxy_missing),
        ("malformed", s.proxy_malformed),
        ("oversized", s.proxy_oversized),
        ("timeouts", s.proxy_timeouts),
    ]
}

/// The peer a handler sees when the header named no client (`LOCAL`, `UNKNOWN`): the
/// connection's own, which the verdict shows as this.
const SELF: &str = "self";

/// How long a connection may take to be answered or closed, and its verdict to be counted: a
/// loopback round trip takes a millisecond, and a failing case should fail (and shrink) fast.
const VERDICT_WITHIN: Duration = Duration::from_secs(3);

/// Sends `bytes` to `t` split at `splits`, half-closes, and reads what comes back; the verdict,
/// once the counters show exactly one.
fn attempt(t: &Target, bytes: &[u8], splits: &[usize]) -> Verdict {
    let (handled, before) = (t.handled.load(Ordering::SeqCst), t.handle.stats());
    let mut c = TcpStream::connect(t.addr).unwrap();
    c.set_read_timeout(Some(VERDICT_WITHIN)).unwrap();
    let me = c.local_addr().unwrap();
    if util::send_split(&mut c, bytes, splits) {
        let _ = c.shutdown(std::net::Shutdown::Write);
    }
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let moved = || {
        let s = t.handle.stats();
        let failed = s.admission_failures(AdmissionFailure::Proxy)
            - before.admission_failures(AdmissionFailure::Proxy);
        (t.handled.load(Ordering::SeqCst) - handled, failed, s)
    };
    assert!(
        eventually(VERDICT_WITHIN, || {
            let (h, f, _) = moved();
            h + f as usize > 0
        }),
        "{}: neither served nor refused: {bytes:?}",
        t.name
    );
    let (served, failed, after) = moved();
    assert_eq!(
        served + failed as usize,
        1,
        "one connection, one verdict: {after:?}"
    );
    let reasons: Vec<&str> = proxy_counters(&after)
        .iter()
        .zip(proxy_counters(&before))
        .flat_map(|(&(name, n), (_, m))| std::iter::repeat_n(name, (n - m) as usize))
        .collect();
    if served == 1 {
        assert!(reasons.is_empty(), "served, yet counted as {reasons:?}");
        let end = answer
            .iter()
            .position(|&b| b == b'\n')
            .expect("the peer line");
        let peer = String::from_utf8(answer[..end].to_vec()).unwrap();
        let mut peer = peer.strip_prefix("peer=").unwrap().to_owned();
        if peer == me.to_string() {
            peer = SELF.to_owned();
        }
        return Verdict::Served(peer, answer[end + 1..].to_vec());
    }
    assert_eq!(reasons.len(), 1, "refused once, counted as {reasons:?}");
    assert!(
        answer.is_empty(),
        "a refused connection was answered: {answer:?}"
    );
    Verdict::Refused(reasons[0])
}

/// Sends `bytes` to every target and checks each verdict against what the bytes call for;
/// the trusted targets' verdict (the same in thread and event mode).
fn check(ts: &Targets, bytes: &[u8], splits: &[usize]) -> Verdict {
    assert_eq!(
        attempt(&ts.untrusted, bytes, splits),
        Verdict::Refused("untrusted"),
        "an untrusted peer got through"
    );
    let thread = attempt(&ts.thread, bytes, splits);
    match (expect(bytes), &thread) {
        (Expect::Header(len), Verdict::Served(peer, rest)) => {
            assert_eq!(
                rest,
                &bytes[len..],
                "not exactly the bytes after the header"
            );
            assert!(peer == SELF || peer.parse::<SocketAddr>().is_ok(), "{peer}");
        }
        (Expect::Header(_), v) => assert_eq!(v, &Verdict::Refused("malformed")),
        (Expect::Oversized, v) => assert_eq!(v, &Verdict::Refused("oversized")),
        (Expect::Malformed, v) => assert_eq!(v, &Verdict::Refused("malformed")),
        (Expect::Missing, v) => assert_eq!(v, &Verdict::Refused("missing")),
    }
    let event = attempt(&ts.event, bytes, splits);
    assert_eq!(thread, event, "thread and event modes differ");
    thread
}

/// `addr` as the handler shows a client: an IPv4-mapped IPv6 address as its IPv4 address.
fn shown(addr: SocketAddr) -> String {
    SocketAddr::new(addr.ip().to_canonical(), addr.port()).to_string()
}

fn inet4() -> impl Strategy<Value = SocketAddr> {
    (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| (Ipv4Addr::from(ip), port).into())
}

/// IPv6 addresses, a quarter of them IPv4-mapped (`::ffff:a.b.c.d`).
fn inet6() -> impl Strategy<Value = SocketAddr> {
    let ip = prop_oneof![
        3 => any::<[u8; 16]>().prop_map(Ipv6Addr::from),
        1 => any::<[u8; 4]>().prop_map(|a| Ipv4Addr::from(a).to_ipv6_mapped()),
    ];
    (ip, any::<u16>()).prop_map(|(ip, port)| (ip, port).into())
}

/// A valid v1 header and the peer the handler must see.
fn v1_header() -> impl Strategy<Value = (Vec<u8>, String)> {
    let line = |proto: &str, s: SocketAddr, d: SocketAddr| {
        let line = format!(
            "PROXY {proto} {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        );
        (line.into_bytes(), shown(s))
    };
    prop_oneof![
        (inet4(), inet4()).prop_map(move |(s, d)| line("TCP4", s, d)),
        (inet6(), inet6()).prop_map(move |(s, d)| line("TCP6", s, d)),
        // UNKNOWN, with whatever the proxy put after it (the spec says ignore it).
        "[ -~]{0,80}".prop_map(|junk| {
            let sep = if junk.is_empty() { "" } else { " " };
            (
                format!("PROXY UNKNOWN{sep}{junk}\r\n").into_bytes(),
                SELF.to_owned(),
            )
        }),
    ]
}

/// The address block of a v2 header: its family and protocol byte, and its bytes.
#[derive(Clone, Debug)]
enum V2Addrs {
    Unspec,
    Inet(SocketAddr, SocketAddr, bool),
    Unix([u8; 216], bool),
}

impl V2Addrs {
    fn encode(&self) -> (u8, Vec<u8>) {
        let ip = |a: &SocketAddr| match a.ip() {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
            std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        match self {
            V2Addrs::Unspec => (0x00, Vec::new()),
            V2Addrs::Inet(s, d, udp) => {
                let family = if s.is_ipv4() { 0x10 } else { 0x20 };
                let body = [ip(s), ip(d), s.port().to_be_bytes().to_vec()].concat();
                (
                    family | (1 + u8::from(*udp)),
                    [body, d.port().to_be_bytes().to_vec()].concat(),
                )
            }
            V2Addrs::Unix(paths, udp) => (0x31 + u8::from(*udp), paths.to_vec()),
        }
    }
}

fn v2_addrs() -> impl Strategy<Value = V2Addrs> {
    prop_oneof![
        Just(V2Addrs::Unspec),
        (inet4(), inet4(), any::<bool>()).prop_map(|(s, d, u)| V2Addrs::Inet(s, d, u)),
        (inet6(), inet6(), any::<bool>()).prop_map(|(s, d, u)| V2Addrs::Inet(s, d, u)),
        (any::<[u8; 216]>(), any::<bool>()).prop_map(|(p, u)| V2Addrs::Unix(p, u)),
    ]
}

/// A well-formed TLV: the types a proxy sends whose values are free bytes (or a host name).
fn tlv() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let bytes = |max: usize| proptest::collection::vec(any::<u8>(), 0..max);
    prop_oneof![
        (Just(0x01u8), bytes(40)),
        (
            Just(0x02u8),
            "[a-z0-9.-]{0,60}".prop_map(String::into_bytes)
        ),
        (Just(0x04u8), bytes(40)),
        (Just(0x05u8), bytes(129)),
        (0xE0u8..=0xEF, bytes(200)),
    ]
}

/// A v2 header with `command` (0x21 `PROXY`, 0x20 `LOCAL`), the addresses and the TLVs
/// (type, value).
fn v2_with(command: u8, addrs: &V2Addrs, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let (family, mut body) = addrs.encode();
    for (t, v) in tlvs {
        body.push(*t);
        body.extend_from_slice(&(v.len() as u16).to_be_bytes());
        body.extend_from_slice(v);
    }
    let mut h = SIG.to_vec();
    h.extend_from_slice(&[command, family]);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

/// A valid v2 header and the peer the handler must see.
fn v2_header() -> impl Strategy<Value = (Vec<u8>, String)> {
    (
        any::<bool>(),
        v2_addrs(),
        proptest::collection::vec(tlv(), 0..5),
    )
        .prop_map(|(local, addrs, tlvs)| {
            let peer = match &addrs {
                V2Addrs::Inet(s, _, _) if !local => shown(*s),
                _ => SELF.to_owned(),
            };
            let tlvs: Vec<(u8, &[u8])> = tlvs.iter().map(|(t, v)| (*t, &v[..])).collect();
            (
                v2_with(if local { 0x20 } else { 0x21 }, &addrs, &tlvs),
                peer,
            )
        })
}

/// A valid header of either version, the peer the handler must see, and the client's first
/// bytes after it.
fn valid() -> impl Strategy<Value = (Vec<u8>, String, Vec<u8>)> {
    (
        prop_oneof![v1_header(), v2_header()],
        proptest::collection::vec(any::<u8>(), 1..64),
    )
        .prop_map(|((h, peer), tail)| (h, peer, tail))
}

/// Bytes that are no valid header: anything, or anything after a header's first bytes.
fn hostile() -> impl Strategy<Value = Vec<u8>> {
    let any_bytes = |max: usize| proptest::collection::vec(any::<u8>(), 0..max);
    prop_oneof![
        any_bytes(300),
        any_bytes(80).prop_map(|b| [&SIG[..], &b].concat()),
        any_bytes(120).prop_map(|b| [&b"PROXY "[..], &b].concat()),
        (any_bytes(120), any::<u16>()).prop_map(|(b, n)| [
            &SIG[..],
            &[0x21, 0x11],
            &n.to_be_bytes(),
            &b
        ]
        .concat()),
    ]
}

/// What is done to a valid header and the bytes after it.
#[derive(Clone, Debug)]
enum Damage {
    /// Cut at this byte (modulo the length), then the connection ends.
    Truncate(usize),
    /// These bits flipped (modulo the length in bits).
    Flip(Vec<usize>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        proptest::collection::vec(any::<usize>(), 1..4).prop_map(Damage::Flip),
    ]
}

fn splits() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1usize..40, 0..5)
}

fn targets(cell: &'static OnceLock<Targets>) -> &'static Targets {
    cell.get_or_init(Targets::new)
}

proptest! {
    // Shrinking a failure that waits out VERDICT_WITHIN per step is capped at 20 s.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        max_shrink_time: 20_000,
        ..ProptestConfig::default()
    })]

    /// Valid v1 and v2 headers of every kind, split anywhere: the handler sees the client the
    /// header names (its own address for LOCAL and UNKNOWN), and exactly the bytes after it.
    #[test]
    fn a_valid_header_names_its_client_and_leaves_the_rest_for_the_handler(
        (header, peer, tail) in valid(),
        splits in splits(),
    ) {
        static T: OnceLock<Targets> = OnceLock::new();
        let bytes = [header, tail.clone()].concat();
        prop_assert_eq!(check(targets(&T), &bytes, &splits), Verdict::Served(peer, tail));
    }

    /// Arbitrary bytes, alone or after a header's first bytes: refused, counted once under the
    /// reason the bytes call for, or (if they happen to be a header) framed exactly.
    #[test]
    fn hostile_bytes_are_refused_once_or_framed_exactly(
        bytes in hostile(),
        splits in splits(),
    ) {
        static T: OnceLock<Targets> = OnceLock::new();
        check(targets(&T), &bytes, &splits);
    }

    /// Valid headers truncated or with bits flipped: never a panic, never a byte read past the
    /// header, each refusal counted once.
    #[test]
    fn damaged_headers_are_refused_once_or_framed_exactly(
        (header, _peer, tail) in valid(),
        damage in damage(),
        splits in splits(),
    ) {
        static T: OnceLock<Targets> = OnceLock::new();
        let mut bytes = [header, tail].concat();
        match damage {
            Damage::Truncate(at) => bytes.truncate(at % (bytes.len() + 1)),
            Damage::Flip(bits) => {
                for bit in bits {
                    let bit = bit % (bytes.len() * 8);
                    bytes[bit / 8] ^= 1 << (bit % 8);
                }
            }
        }
        check(targets(&T), &bytes, &splits);
    }
}

/// Split at every byte across two reads, a header is read whole and no further; cut at every
/// byte (the client hanging up there), it is refused at once, in every mode, and counted once.
#[test]
fn a_header_split_or_cut_at_every_byte() {
    static T: OnceLock<Targets> = OnceLock::new();
    let client: SocketAddr = "[2001:db8::7]:4321".parse().unwrap();
    let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4321 443\r\n".to_vec();
    let addrs = V2Addrs::Inet(client, "[2001:db8::1]:443".parse().unwrap(), false);
    let v2 = v2_with(0x21, &addrs, &[(0x02, b"split.example"), (0xE5, &[7; 9])]);
    for header in [v1, v2] {
        let bytes = [&header[..], b"after\n"].concat();
        for at in 1..bytes.len() {
            assert_eq!(
                check(targets(&T), &bytes, &[at]),
                Verdict::Served(client.to_string(), b"after\n".to_vec()),
                "split at {at}"
            );
        }
        for at in 0..header.len() {
            let why = if at == 0 { "missing" } else { "malformed" };
            assert_eq!(
                check(targets(&T), &header[..at], &[]),
                Verdict::Refused(why),
                "cut at {at}"
            );
        }
    }
}

#[test]
fn v2_tlvs_of_every_length_up_to_the_limit_and_none_past_it() {
    static T: OnceLock<Targets> = OnceLock::new();
    let t = &targets(&T).thread;
    let client: SocketAddr = "192.0.2.9:999".parse().unwrap();
    let addrs = V2Addrs::Inet(client, "192.0.2.1:80".parse().unwrap(), false);
    // The addresses take 12 bytes of the payload, the TLV's type and length 3.
    let longest = MAX_V2 - 12 - 3;
    for len in 0..=longest + 1 {
        let header = v2_with(0x21, &addrs, &[(0xE0, &vec![0xAB; len])]);
        let bytes = [&header[..], b"x"].concat();
        let want = if len <= longest {
            Verdict::Served(client.to_string(), b"x".to_vec())
        } else {
            Verdict::Refused("oversized")
        };
        assert_eq!(attempt(t, &bytes, &[]), want, "a TLV of {len} bytes");
        if len % 61 == 0 && len <= longest {
            // The same TLV claiming one byte more than the header holds.
            let mut bad = bytes.clone();
            let at = 16 + 12 + 1;
            bad[at..at + 2].copy_from_slice(&(len as u16 + 1).to_be_bytes());
            assert_eq!(
                check(targets(&T), &bad, &[]),
                Verdict::Refused("malformed"),
                "{len}"
            );
        }
    }
}

/// The log says why a header was refused: cut short ("truncated") or wrong ("invalid fields").
#[test]
fn a_refused_header_is_logged_with_what_was_wrong_with_it() {
    util::in_own_process(
        "a_refused_header_is_logged_with_what_was_wrong_with_it",
        || {
            let (running, addr) = server(loopback());
            // Complete lines, so the parser sees them whole: one ends before its ports, the
            // other names a protocol there is none of.
            assert_eq!(exchange(addr, b"PROXY TCP4 192.0.2.1 192.0.2.2\r\n"), "");
            assert_eq!(
                exchange(addr, b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n"),
                ""
            );
            stats_within(&running, |s| s.proxy_malformed == 2);
            let lines = util::captured_logs();
            let refusals: Vec<&str> = lines
                .iter()
                .filter(|l| l.message.starts_with("PROXY stage refused a connection"))
                .map(|l| l.message.as_str())
                .collect();
            assert_eq!(refusals.len(), 2, "{lines:?}");
            assert!(
                refusals[0].ends_with("malformed PROXY header: truncated"),
                "{refusals:?}"
            );
            assert!(
                refusals[1].ends_with("malformed PROXY header: invalid fields"),
                "{refusals:?}"
            );
            drop(running);
        },
    );
}
