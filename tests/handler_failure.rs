//! `HandlerFailure` and how the server reports it: a handler ended by a read or write timeout is
//! logged at info ("no data from PEER for 150ms"), counted in `Stats::timeouts` and not as a
//! handler error, and `is_timeout()` tells it apart in a `handle_error` hook.
//!
//! This binary installs its own logger, to see the level and text of each line.

mod util;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use socketserver::{Addr, Handler, Request, TcpServer, handler_fn};
use util::{connect, serve};

/// Every log record of this process: level and message.
fn records() -> &'static Mutex<Vec<(log::Level, String)>> {
    static RECORDS: OnceLock<Mutex<Vec<(log::Level, String)>>> = OnceLock::new();
    RECORDS.get_or_init(|| Mutex::new(Vec::new()))
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        records()
            .lock()
            .unwrap()
            .push((r.level(), r.args().to_string()));
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static CAPTURE: Capture = Capture;
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
}

/// The records that mention `peer`.
fn lines_about(peer: &Addr) -> Vec<(log::Level, String)> {
    let peer = peer.to_string();
    records()
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, m)| m.contains(&peer))
        .cloned()
        .collect()
}

#[test]
fn a_read_timeout_is_logged_at_info_and_counted_as_a_timeout() {
    capture_logs();
    let raw = Arc::new(Mutex::new(None));
    let r = raw.clone();
    let server = TcpServer::builder(move || {
        let r = r.clone();
        handler_fn(move |req: &mut Request| {
            let mut b = [0u8; 1];
            let e = req.read(&mut b).unwrap_err();
            *r.lock().unwrap() = Some((
                e.kind(),
                e.to_string(),
                socketserver::Error::from(std::io::Error::new(e.kind(), e.to_string()))
                    .is_timeout(),
            ));
            Err(e.into())
        })
    })
    .read_timeout(Duration::from_millis(150))
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let c = connect(&addr);
    let me = Addr::Inet(c.local_addr().unwrap());
    assert_eq!(util::read_to_eof(&c).unwrap(), b"");
    let stats = running.handle.stats();
    drop(running);
    let (kind, message, is_timeout) = raw.lock().unwrap().take().expect("handler ran");
    assert_eq!(kind, std::io::ErrorKind::TimedOut, "{message}");
    assert_eq!(message, "no data for 150ms (read timeout)");
    assert!(is_timeout);
    assert_eq!((stats.timeouts, stats.handler_errors), (1, 0), "{stats:?}");
    let lines = lines_about(&me);
    assert_eq!(
        lines,
        [(
            log::Level::Info,
            format!("no data from {me} for 150ms; connection closed")
        )]
    );
}

#[test]
fn a_write_timeout_is_reported_the_same_way() {
    capture_logs();
    let server = TcpServer::builder(|| {
        handler_fn(|req: &mut Request| {
            // The client never reads: the socket buffers fill, then a write times out.
            let chunk = vec![b'x'; 64 * 1024];
            loop {
                req.write_all(&chunk)?;
            }
        })
    })
    .write_timeout(Duration::from_millis(200))
    .idle_timeout(None)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let c = connect(&addr);
    let me = Addr::Inet(c.local_addr().unwrap());
    assert!(util::eventually(Duration::from_secs(10), || running
        .handle
        .stats()
        .timeouts
        == 1));
    drop(c);
    drop(running);
    assert_eq!(
        lines_about(&me),
        [(
            log::Level::Info,
            format!("{me} read nothing for 200ms; connection closed")
        )]
    );
}

#[test]
fn handle_error_hooks_tell_timeouts_apart() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let server = TcpServer::builder(|| {
        handler_fn(|req: &mut Request| {
            let mut b = [0u8; 1];
            req.read_exact(&mut b)?;
            if b[0] == b'e' {
                return Err("a plain handler error".into());
            }
            // Otherwise wait for a byte that never comes.
            req.read_exact(&mut b)?;
            Ok(())
        })
    })
    .read_timeout(Duration::from_millis(100))
    .handle_error(move |_, failure| s.lock().unwrap().push(failure.is_timeout()))
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    for first in [b"e", b"t"] {
        let mut c = connect(&addr);
        c.write_all(first).unwrap();
        assert_eq!(util::read_to_eof(&mut c).unwrap(), b"");
    }
    let stats = running.handle.stats();
    drop(running);
    assert_eq!(*seen.lock().unwrap(), [false, true]);
    assert_eq!((stats.timeouts, stats.handler_errors), (1, 1));
}

#[test]
fn a_timeout_from_rfile_is_reported_like_a_raw_one() {
    use socketserver::HandlerResult;
    struct Lines;
    impl Handler for Lines {
        fn handle(&mut self, s: &mut Request) -> HandlerResult {
            for line in s.rfile.lines() {
                writeln!(s.wfile, "{}", line?)?;
            }
            Ok(())
        }
    }
    capture_logs();
    let server = TcpServer::builder(|| Lines)
        .read_timeout(Duration::from_millis(120))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut c = connect(&addr);
    let me = Addr::Inet(c.local_addr().unwrap());
    c.write_all(b"one line\n").unwrap();
    assert_eq!(util::read_to_eof(&mut c).unwrap(), b"one line\n");
    let stats = running.handle.stats();
    drop(running);
    assert_eq!((stats.timeouts, stats.handler_errors), (1, 0));
    assert_eq!(
        lines_about(&me),
        [(
            log::Level::Info,
            format!("no data from {me} for 120ms; connection closed")
        )]
    );
}

/// A handler that wants four bytes; the client sends two, then resets.
fn wants_four_bytes(req: &mut Request) -> socketserver::HandlerResult {
    let mut b = [0u8; 4];
    req.read_exact(&mut b)?;
    Ok(())
}

/// Sends two bytes to `addr`, then resets the connection (SO_LINGER 0); returns our address.
fn two_bytes_then_reset(addr: &Addr) -> Addr {
    let mut c = connect(addr);
    let me = Addr::Inet(c.local_addr().unwrap());
    c.write_all(b"ab").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    me
}

#[test]
fn a_client_that_resets_mid_request_is_a_debug_line_not_a_handler_error() {
    // What HAProxy's health checks do after their PROXY header, and what a killed client does.
    capture_logs();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let server = TcpServer::builder(|| handler_fn(wants_four_bytes))
        .handle_error(move |_, failure| s.lock().unwrap().push(failure.is_disconnect()))
        .bind("127.0.0.1:0")
        .unwrap();
    let running = serve(server);
    let me = two_bytes_then_reset(&running.handle.local_addr().clone());
    assert!(util::eventually(Duration::from_secs(5), || !seen
        .lock()
        .unwrap()
        .is_empty()));
    let stats = running.handle.stats();
    drop(running);
    assert_eq!(*seen.lock().unwrap(), [true]);
    assert_eq!(stats.handler_errors, 0, "{stats:?}");
    // Without a hook, the default report is at debug.
    let server = TcpServer::builder(|| handler_fn(wants_four_bytes))
        .bind("127.0.0.1:0")
        .unwrap();
    let running = serve(server);
    let me2 = two_bytes_then_reset(&running.handle.local_addr().clone());
    assert!(util::eventually(Duration::from_secs(5), || !lines_about(
        &me2
    )
    .is_empty()));
    drop(running);
    let lines = lines_about(&me2);
    assert!(
        lines.iter().all(|(level, _)| *level == log::Level::Debug),
        "{lines:?}"
    );
    assert!(lines_about(&me).is_empty(), "the hook took the first one");
}
