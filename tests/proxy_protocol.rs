//! The PROXY protocol stage (`Builder::proxy_protocol`): real headers from a real HAProxy (v1
//! and v2), and hand-made bad ones (untrusted, garbage, truncated, wrong signature, split,
//! slow, oversized), each refused with its counter; the bytes after a header reach the handler.

mod haproxy;
mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socketserver::{
    Addr, HandlerResult, ProxyProtocol, Request, Stats, TcpServer, UnixStreamServer, handler_fn,
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
        .proxy_protocol(config.timeout(Duration::from_secs(2)))
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

/// A v2 PROXY header for a TCP/IPv4 client `src` to `dst`, with `tlvs` (type, value).
fn v2(command: u8, src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 only");
    };
    let mut body = Vec::new();
    body.extend_from_slice(&s.ip().octets());
    body.extend_from_slice(&d.ip().octets());
    body.extend_from_slice(&s.port().to_be_bytes());
    body.extend_from_slice(&d.port().to_be_bytes());
    for (t, v) in tlvs {
        body.push(*t);
        body.extend_from_slice(&(v.len() as u16).to_be_bytes());
        body.extend_from_slice(v);
    }
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(command);
    h.push(0x11);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
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
    .dispatch(socketserver::Dispatch::Event { workers: 1 })
    .proxy_protocol(loopback().timeout(Duration::from_secs(2)))
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
