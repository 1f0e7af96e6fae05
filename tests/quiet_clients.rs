//! No default cuts a healthy quiet client, checked on the examples as a user runs them, for
//! longer than the 60 s idle timeout that earlier versions defaulted to: a chat talker that
//! sends a line every 2 s beside a listener that never says a word, and 2,000 idle connections
//! to the event-mode key-value server. Both tests run side by side, about 80 s of wall time.

mod util;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use util::Example;

/// Past the 60 s an idle timeout used to allow.
const QUIET_FOR: Duration = Duration::from_secs(65);

fn connect(addr: &str) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    BufReader::new(s)
}

/// A chat client, once the server has welcomed it into the room.
fn join(addr: &str) -> BufReader<TcpStream> {
    let mut c = connect(addr);
    assert!(hear(&mut c).starts_with("* welcome, "));
    c
}

fn hear(c: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    c.read_line(&mut line).expect("a line in time");
    assert!(line.ends_with('\n'), "closed by the server, got {line:?}");
    line.trim_end().to_owned()
}

#[test]
fn a_chat_talker_and_a_silent_listener_stay_connected() {
    let server = Example::start("chat_server", &["--addr", "127.0.0.1:0"], "chat server on ");
    let mut listener = join(&server.addr);
    let mut talker = join(&server.addr);
    let talker_addr = talker.get_ref().local_addr().unwrap().to_string();
    assert_eq!(hear(&mut listener), format!("* {talker_addr} joined"));
    // A line every 2 s for 16 s: past the minimum rate's 10 s grace, and past the 14 s after
    // which a talker was once judged a slow request.
    let started = Instant::now();
    for n in 0..8 {
        std::thread::sleep(Duration::from_secs(2));
        talker
            .get_mut()
            .write_all(format!("line {n}\n").as_bytes())
            .unwrap();
        assert_eq!(hear(&mut listener), format!("{talker_addr}: line {n}"));
    }
    // Then the room is silent, nothing read or written either way, for longer than the idle
    // timeout that was once the default.
    std::thread::sleep(QUIET_FOR);
    let listener_addr = listener.get_ref().local_addr().unwrap().to_string();
    listener.get_mut().write_all(b"still here\n").unwrap();
    assert_eq!(hear(&mut talker), format!("{listener_addr}: still here"));
    talker.get_mut().write_all(b"me too\n").unwrap();
    assert_eq!(hear(&mut listener), format!("{talker_addr}: me too"));
    assert!(
        server.log.matching("dropped").is_empty(),
        "{}",
        server.log.dump()
    );
    eprintln!("chat: both connected after {:?}", started.elapsed());
}

#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[test]
fn two_thousand_idle_event_mode_connections_stay_open() {
    const IDLE: usize = 2000;
    let server = Example::start(
        "kv_server",
        &["--addr", "127.0.0.1:0", "--mode", "event", "--workers", "2"],
        "kv server on ",
    );
    let mut clients: Vec<_> = (0..IDLE).map(|_| connect(&server.addr)).collect();
    // Each one is served once, then falls silent.
    for c in &mut clients {
        c.get_mut().write_all(b"GET k\n").unwrap();
        assert_eq!(hear(c), "NOT_FOUND");
    }
    std::thread::sleep(QUIET_FOR);
    let mut answered = 0;
    for c in &mut clients {
        c.get_mut().write_all(b"GET k\n").unwrap();
        assert_eq!(hear(c), "NOT_FOUND", "after {answered} answered");
        answered += 1;
    }
    assert_eq!(answered, IDLE);
    eprintln!("kv_server --mode event: {IDLE} connections idle for {QUIET_FOR:?}, all answered");
}
