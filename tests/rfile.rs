//! `RFile`, a `StreamRequest`'s `rfile`: line reads bounded by `StreamOptions::max_line`, typed
//! errors that carry the peer, and `for line in s.rfile.lines()` as written.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socketserver::{
    Addr, Handler, HandlerFailure, HandlerResult, Request, StreamOptions, TcpServer,
};
use util::{connect, serve};

/// Echoes each line (without its newline) in brackets, the idiom of the docs.
struct Brackets;

impl Handler for Brackets {
    fn handle(&mut self, s: &mut Request) -> HandlerResult {
        for line in s.rfile.lines() {
            writeln!(s.wfile, "[{}]", line?)?;
        }
        Ok(())
    }
}

/// What the `handle_error` hook saw: the peer, and the error's predicates and message.
#[derive(Debug, Default)]
struct Seen {
    peer: Option<Addr>,
    too_large: bool,
    bad_message: bool,
    timeout: bool,
    error_addr: Option<Addr>,
    message: String,
}

fn record(seen: &Arc<Mutex<Seen>>) -> impl Fn(&Addr, &HandlerFailure) + Send + Sync + 'static {
    let seen = seen.clone();
    move |peer, failure| {
        let mut s = seen.lock().unwrap();
        s.peer = Some(peer.clone());
        s.timeout = failure.is_timeout();
        s.message = failure.to_string();
        if let HandlerFailure::Error(e) = failure
            && let Some(e) = e.downcast_ref::<socketserver::Error>()
        {
            s.too_large = e.is_too_large();
            s.bad_message = e.is_bad_message();
            s.error_addr = e.addr().cloned();
        }
    }
}

fn brackets_server(max_line: usize, seen: &Arc<Mutex<Seen>>) -> TcpServer<Brackets> {
    TcpServer::builder(|| Brackets)
        .stream_options(StreamOptions::new().with_max_line(max_line))
        .handle_error(record(seen))
        .bind("127.0.0.1:0")
        .unwrap()
}

#[test]
fn lines_up_to_max_line_pass_and_a_longer_one_is_too_large() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let server = brackets_server(16, &seen);
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut c = connect(&addr);
    let me = Addr::Inet(c.local_addr().unwrap());
    // 16 bytes with the newline: the longest line allowed. Then CRLF, then 17 bytes.
    c.write_all(b"short\n0123456789abcde\nwindows\r\n0123456789abcdef\nnever\n")
        .unwrap();
    let got = util::read_to_eof(&mut c).unwrap();
    assert_eq!(got, b"[short]\n[0123456789abcde]\n[windows]\n");
    drop(running);
    let s = seen.lock().unwrap();
    assert!(s.too_large, "{s:?}");
    assert_eq!(
        s.error_addr.as_ref(),
        Some(&me),
        "the error names the peer: {s:?}"
    );
    assert!(s.message.contains("line longer than 16 bytes"), "{s:?}");
    assert!(s.message.contains(&me.to_string()), "{s:?}");
}

#[test]
fn a_line_that_is_not_utf8_is_a_bad_message() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let server = brackets_server(1024, &seen);
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut c = connect(&addr);
    c.write_all(b"ok\n\xff\xfe\n").unwrap();
    assert_eq!(util::read_to_eof(&mut c).unwrap(), b"[ok]\n");
    drop(running);
    assert!(seen.lock().unwrap().bad_message);
}

#[test]
fn read_until_and_read_line_are_bounded_and_leave_the_buffer_usable() {
    // read_until keeps what it read (as std does); read_line leaves its String as it was.
    struct Probe(Arc<Mutex<Vec<String>>>);
    impl Handler for Probe {
        fn handle(&mut self, s: &mut Request) -> HandlerResult {
            let mut log = Vec::new();
            let mut bytes = Vec::new();
            let e = s.rfile.read_until(b';', &mut bytes).unwrap_err();
            log.push(format!("until: {} {}", e.is_too_large(), bytes.len()));
            let mut line = String::from("kept");
            let e = s.rfile.read_line(&mut line).unwrap_err();
            log.push(format!("line: {} {line}", e.is_too_large()));
            // The rest of the long line, then a short one: the reader still works.
            let mut rest = [0u8; 3];
            s.rfile.read_exact(&mut rest)?;
            line.clear();
            s.rfile.read_line(&mut line)?;
            log.push(format!("after: {line:?}"));
            // `&mut RFile` is a BufRead for code that takes one.
            let mut via_trait = String::new();
            BufRead::read_line(&mut &mut s.rfile, &mut via_trait)?;
            log.push(format!("trait: {via_trait:?} max {}", s.rfile.max_line()));
            *self.0.lock().unwrap() = log;
            Ok(())
        }
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let server = TcpServer::builder(move || Probe(l.clone()))
        .stream_options(StreamOptions::new().with_max_line(8))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut c = connect(&addr);
    c.write_all(b"0123456789abcdefgh\nshort\nlonger than eight\n")
        .unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = util::read_to_eof(&mut c);
    drop(running);
    assert_eq!(
        *log.lock().unwrap(),
        [
            "until: true 8",
            "line: true kept",
            "after: \"short\\n\"",
            "trait: \"longer than eight\\n\" max 8",
        ]
    );
}

#[test]
fn a_read_timeout_is_an_error_whose_is_timeout_is_true() {
    /// is_timeout(), addr() and the message of the error the handler saw.
    type Outcome = (bool, Option<Addr>, String);
    struct WaitForLine(Arc<Mutex<Option<Outcome>>>);
    impl Handler for WaitForLine {
        fn handle(&mut self, s: &mut Request) -> HandlerResult {
            let mut line = String::new();
            let e = s.rfile.read_line(&mut line).unwrap_err();
            *self.0.lock().unwrap() = Some((e.is_timeout(), e.addr().cloned(), e.to_string()));
            Ok(())
        }
    }
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let server = TcpServer::builder(move || WaitForLine(s.clone()))
        .read_timeout(Duration::from_millis(150))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut c = connect(&addr);
    let me = Addr::Inet(c.local_addr().unwrap());
    c.write_all(b"no newline").unwrap();
    assert_eq!(util::read_to_eof(&mut c).unwrap(), b"");
    drop(running);
    let (timeout, addr, message) = seen.lock().unwrap().take().expect("handler ran");
    assert!(timeout, "{message}");
    assert_eq!(addr, Some(me));
    assert!(message.contains("no data for 150ms"), "{message}");
}

#[test]
fn fill_buf_and_consume_still_echo_byte_for_byte() {
    // The README's first example, through RFile's inherent fill_buf / consume.
    struct Echo;
    impl Handler for Echo {
        fn handle(&mut self, s: &mut Request) -> HandlerResult {
            loop {
                let data = s.rfile.fill_buf()?;
                if data.is_empty() {
                    return Ok(());
                }
                s.wfile.write_all(data)?;
                let n = data.len();
                s.rfile.consume(n);
            }
        }
    }
    let server = TcpServer::bind("127.0.0.1:0", || Echo).unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let c = connect(&addr);
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    let writer = {
        let mut c = c.try_clone().unwrap();
        let payload = payload.clone();
        std::thread::spawn(move || {
            c.write_all(&payload).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut got = Vec::new();
    BufReader::new(c).read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got, payload);
    drop(running);
}
