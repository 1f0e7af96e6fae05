//! Dual-stack IPv6 listeners: a server bound to `[::]` serves IPv4 clients too and reports
//! them with their IPv4 address; `only_v6(true)` turns that off.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use socketserver::{
    DatagramHandler, DatagramRequest, HandlerResult, Request, TcpServer, UdpServer, handler_fn,
};
use util::serve;

/// Writes the peer address the handler sees, then closes.
fn tell_peer(req: &mut Request) -> HandlerResult {
    let peer = req.peer_addr().to_string();
    req.write_all(peer.as_bytes())?;
    Ok(())
}

/// What the server says `from`'s connection came from.
fn seen_as(server: SocketAddr, from: &str) -> (String, SocketAddr) {
    let target: SocketAddr = match from {
        "v4" => ([127, 0, 0, 1], server.port()).into(),
        _ => format!("[::1]:{}", server.port()).parse().unwrap(),
    };
    let mut c = TcpStream::connect(target).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let me = c.local_addr().unwrap();
    let mut seen = String::new();
    c.read_to_string(&mut seen).unwrap();
    (seen, me)
}

#[test]
fn a_server_on_the_ipv6_wildcard_serves_ipv4_clients_as_ipv4() {
    util::init_logs();
    if !util::ipv6_loopback() {
        return;
    }
    let server = TcpServer::bind("[::]:0", || handler_fn(tell_peer)).unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let (seen, me) = seen_as(addr, "v4");
    assert_eq!(seen, me.to_string(), "an IPv4 client must be shown as IPv4");
    assert!(seen.starts_with("127.0.0.1:"), "{seen}");
    let (seen6, me6) = seen_as(addr, "v6");
    assert_eq!(seen6, me6.to_string());
    assert!(seen6.starts_with("[::1]:"), "{seen6}");
    drop(running);
}

#[test]
fn only_v6_refuses_ipv4_clients() {
    util::init_logs();
    if !util::ipv6_loopback() {
        return;
    }
    let server = TcpServer::builder(|| handler_fn(tell_peer))
        .only_v6(true)
        .bind("[::]:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let v4 = TcpStream::connect(("127.0.0.1", addr.port()));
    assert!(v4.is_err(), "an IPv4 client reached an only_v6 server");
    let (seen6, _) = seen_as(addr, "v6");
    assert!(seen6.starts_with("[::1]:"), "{seen6}");
    drop(running);
}

/// Answers each datagram with the peer address it sees.
struct TellPeer;

impl DatagramHandler for TellPeer {
    fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        let peer = req.peer_addr().to_string();
        req.allow_any_reply_size();
        req.wfile.extend_from_slice(peer.as_bytes());
        Ok(())
    }
}

#[test]
fn a_udp_server_on_the_ipv6_wildcard_answers_ipv4_clients_as_ipv4() {
    util::init_logs();
    if !util::ipv6_loopback() {
        return;
    }
    let server = UdpServer::bind("[::]:0", || TellPeer).unwrap();
    let port = server.local_addr().inet().unwrap().port();
    let running = serve(server);
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.send_to(b"who am i", ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 128];
    let (n, _) = c
        .recv_from(&mut buf)
        .expect("the reply reached the IPv4 client");
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        c.local_addr().unwrap().to_string()
    );
    drop(running);
}
