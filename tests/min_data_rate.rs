//! `Builder::min_data_rate` (`MinDataRate`): a request trickled slower than the minimum rate is
//! cut and counted; a fast request, and a handler that computes instead of reading, are not.

mod util;

use util::InMode;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use socketserver::{Addr, MinDataRate, MpConnection, Request, TcpServer, handler_fn};
use util::{connect, eventually, line_echo, serve};

/// 100 bytes/s after 300 ms, with the idle timeout far away so that only the rate can cut.
const RATE: MinDataRate = MinDataRate::new(100, Duration::from_millis(300));
const IDLE: Duration = Duration::from_secs(30);

/// Sends `bytes` a few at a time, `every` apart, stopping early if the server hangs up.
/// Returns how long it kept sending.
fn trickle(c: &mut TcpStream, bytes: &[u8], piece: usize, every: Duration) -> Duration {
    let t = Instant::now();
    for p in bytes.chunks(piece) {
        if c.write_all(p).is_err() {
            break;
        }
        std::thread::sleep(every);
    }
    t.elapsed()
}

#[test]
fn a_trickled_line_is_cut_and_counted() {
    let server = TcpServer::builder(line_echo)
        .min_data_rate(RATE)
        .idle_timeout(IDLE)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut c = connect(&addr);
    c.set_nodelay(true).unwrap();
    let reader = c.try_clone().unwrap();
    let closed = std::thread::spawn(move || {
        let t = Instant::now();
        let got = util::read_to_eof(reader);
        (got, t.elapsed())
    });
    // 10 bytes/s, a tenth of the minimum: allowed 300 ms + 10 ms per byte, so cut at ~0.35 s.
    let _ = trickle(&mut c, &[b'a'; 40], 1, Duration::from_millis(100));
    let (got, after) = closed.join().unwrap();
    let stats = running.handle.stats();
    println!("a line trickled at 10 bytes/s: cut after {after:?}; {stats:?}");
    assert_eq!(got.unwrap_or_default(), b"", "nothing was echoed");
    assert!(after < Duration::from_secs(3), "cut only after {after:?}");
    assert_eq!((stats.slow_closed, stats.idle_closed), (1, 0));
}

#[test]
fn a_request_faster_than_the_minimum_is_served() {
    let server = TcpServer::builder(line_echo)
        .min_data_rate(RATE)
        .idle_timeout(IDLE)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let c = connect(&addr);
    c.set_nodelay(true).unwrap();
    let mut r = BufReader::new(c);
    // Three lines of 400 bytes, each sent over 1 s at 400 bytes/s: four times the minimum, and
    // each longer than the grace period.
    for i in 0..3u8 {
        let mut line = vec![b'a' + i; 399];
        line.push(b'\n');
        let took = trickle(r.get_mut(), &line, 40, Duration::from_millis(100));
        let mut echoed = Vec::new();
        r.read_until(b'\n', &mut echoed).unwrap();
        assert_eq!(echoed, line, "line {i} (sent over {took:?}) was not echoed");
    }
    assert_eq!(running.handle.stats().slow_closed, 0);
}

#[test]
fn time_the_handler_spends_computing_does_not_count() {
    // Reads one byte of the request, then computes for three times the allowance before it
    // answers: the client is not to blame, and is not cut.
    let server = TcpServer::builder(|| {
        handler_fn(|req: &mut Request| {
            let mut b = [0u8; 1];
            req.read_exact(&mut b)?;
            std::thread::sleep(Duration::from_millis(1000));
            req.write_all(b"done")?;
            Ok(())
        })
    })
    .min_data_rate(RATE)
    .idle_timeout(Duration::from_millis(200))
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut c = connect(&addr);
    c.write_all(b"x").unwrap();
    assert_eq!(util::read_to_eof(&mut c).unwrap(), b"done");
    let stats = running.handle.stats();
    assert_eq!((stats.slow_closed, stats.idle_closed), (0, 0), "{stats:?}");
}

/// A `multiprocessing.connection` frame header that announces a body which never comes: the
/// handler is blocked in `recv_bytes`, and the rate rule (not only the idle timeout) frees it.
#[test]
fn an_mp_frame_header_without_its_body_is_cut() {
    let server = TcpServer::builder(|| {
        handler_fn(|req: &mut Request| {
            let mut conn = MpConnection::new(req.stream());
            loop {
                let m = conn.recv_bytes()?;
                conn.send_bytes(&m)?;
            }
        })
    })
    .min_data_rate(RATE)
    .idle_timeout(IDLE)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut c = connect(&addr);
    let t = Instant::now();
    // One whole frame, echoed; then a header announcing 100 bytes, and silence.
    c.write_all(&[0, 0, 0, 2, b'h', b'i']).unwrap();
    let mut echoed = [0u8; 6];
    c.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, &[0, 0, 0, 2, b'h', b'i']);
    c.write_all(&100i32.to_be_bytes()).unwrap();
    assert_eq!(util::read_to_eof(&mut c).unwrap_or_default(), b"");
    let after = t.elapsed();
    assert!(
        eventually(Duration::from_secs(5), || running
            .handle
            .stats()
            .slow_closed
            == 1),
        "{:?}",
        running.handle.stats()
    );
    println!("mp frame header without its body: cut after {after:?}");
    assert!(after < Duration::from_secs(5), "cut only after {after:?}");
    assert_eq!(running.handle.stats().idle_closed, 0);
}

#[test]
fn min_data_rate_none_turns_the_rule_off() {
    let server = TcpServer::builder(line_echo)
        .min_data_rate(None)
        .idle_timeout(IDLE)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr: Addr = server.local_addr().clone();
    let running = serve(server);
    let c = connect(&addr);
    c.set_nodelay(true).unwrap();
    let mut r = BufReader::new(c);
    // 10 bytes/s for 0.8 s: the strict rate above would cut this.
    trickle(r.get_mut(), b"slow-line\n", 1, Duration::from_millis(80));
    let mut echoed = String::new();
    r.read_line(&mut echoed).unwrap();
    assert_eq!(echoed, "slow-line\n");
    assert_eq!(running.handle.stats().slow_closed, 0);
}

/// Reads lines and answers none of them (a chat server's talker, whose lines go to others).
struct Listens;

impl socketserver::MessageHandler for Listens {
    fn handle_message(
        &mut self,
        s: &mut socketserver::Request,
    ) -> Result<socketserver::Next, socketserver::HandlerError> {
        let mut line = String::new();
        Ok(match s.rfile.read_line(&mut line)? {
            0 => socketserver::Next::Close,
            _ => socketserver::Next::Message,
        })
    }

    fn message_ready(&self, buffered: &[u8]) -> bool {
        buffered.contains(&b'\n')
    }
}

/// The rate judges only a unit in progress: a client that sends a whole line now and then, and
/// is never answered, is no slow request, in any mode; one that trickles a line still is.
#[test]
fn lines_sent_now_and_then_without_replies_are_not_a_slow_request() {
    // Sync mode serves one connection at a time: the trickler would wait for the talker.
    for mode in util::STREAM_MODES.into_iter().skip(1) {
        let server = TcpServer::builder(|| Listens)
            .mode(mode)
            .min_data_rate(RATE)
            .bind("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr().clone();
        let running = serve(server);
        let mut talker = connect(&addr);
        // Five times the grace, in lines 150 ms apart: 10 bytes each, some 70 bytes/s in all,
        // under the minimum, as a chat talker's typing is.
        for i in 0..10 {
            talker
                .write_all(format!("line {i:03}\n").as_bytes())
                .unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
        let mut trickler = connect(&addr);
        let _ = trickle(&mut trickler, &[b't'; 30], 1, Duration::from_millis(100));
        assert!(
            eventually(Duration::from_secs(3), || running
                .handle
                .stats()
                .slow_closed
                == 1),
            "{mode:?}: {:?}",
            running.handle.stats()
        );
        talker
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        assert!(
            talker.read(&mut [0u8; 1]).is_err(),
            "{mode:?}: the talker was cut"
        );
        drop((talker, trickler));
        drop(running);
    }
}
