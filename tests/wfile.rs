//! Replies leave at once: formatted writes on `WFile` (a `StreamRequest`'s `wfile`) and
//! `Request` go out in one write, and `TCP_NODELAY` is on by default (`Builder::nodelay`).
//!
//! The figure is the median round trip of a one-line request answered with
//! `writeln!(w, "hello {}", n)`: with Nagle's algorithm and the reply in pieces, each line waits
//! ~40 ms for the client's delayed ACK; in one piece, or with TCP_NODELAY, it takes well under a
//! millisecond.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::time::{Duration, Instant};

use socketserver::{Addr, Handler, HandlerResult, Request, TcpServer, handler_fn};
use util::{connect, serve};

const ROUND_TRIPS: usize = 20;
/// A stall is ~40 ms (the delayed ACK); a round trip on loopback well under 1 ms. The bound sits
/// between, with room for a loaded machine.
const BOUND: Duration = Duration::from_millis(20);

/// Median time for a `n\n` request to be answered with `hello n\n`.
fn median_round_trip(addr: &Addr) -> Duration {
    let c = connect(addr);
    let mut r = BufReader::new(c);
    let mut times = Vec::new();
    for n in 0..ROUND_TRIPS {
        let t = Instant::now();
        r.get_mut().write_all(format!("{n}\n").as_bytes()).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        times.push(t.elapsed());
        assert_eq!(line, format!("hello {n}\n"));
    }
    times.sort();
    times[ROUND_TRIPS / 2]
}

/// Reads one request line from a raw `Request`.
fn read_request(req: &mut Request) -> std::io::Result<Option<u64>> {
    let mut digits = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if req.read(&mut b)? == 0 {
            return Ok(None);
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&digits).parse().ok());
        }
        digits.push(b[0]);
    }
}

#[test]
fn formatted_writes_on_request_leave_in_one_piece_even_with_nagle() {
    let server = TcpServer::builder(|| {
        handler_fn(|req: &mut Request| {
            assert!(!req.stream().as_tcp().unwrap().nodelay()?);
            while let Some(n) = read_request(req)? {
                writeln!(req, "hello {n}")?;
            }
            Ok(())
        })
    })
    .nodelay(false)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let _running = serve(server);
    let median = median_round_trip(&addr);
    println!("writeln!(req, ..) with Nagle on: median round trip {median:?}");
    assert!(median < BOUND, "median round trip {median:?}");
}

#[test]
fn formatted_writes_on_wfile_leave_in_one_piece_even_with_nagle() {
    struct Hello;
    impl Handler for Hello {
        fn handle(&mut self, s: &mut Request) -> HandlerResult {
            for line in s.rfile.lines() {
                writeln!(s.wfile, "hello {}", line?)?;
            }
            Ok(())
        }
    }
    let server = TcpServer::builder(|| Hello)
        .nodelay(false)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let _running = serve(server);
    let median = median_round_trip(&addr);
    println!("writeln!(s.wfile, ..) with Nagle on: median round trip {median:?}");
    assert!(median < BOUND, "median round trip {median:?}");
}

#[test]
fn replies_in_pieces_do_not_stall_by_default() {
    // Three unformatted writes per reply: only TCP_NODELAY (on by default) keeps them prompt.
    let server = TcpServer::builder(|| {
        handler_fn(|req: &mut Request| {
            assert!(req.stream().as_tcp().unwrap().nodelay()?);
            while let Some(n) = read_request(req)? {
                req.write_all(b"hello ")?;
                req.write_all(n.to_string().as_bytes())?;
                req.write_all(b"\n")?;
            }
            Ok(())
        })
    })
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let _running = serve(server);
    let median = median_round_trip(&addr);
    println!("a reply in three writes, default TCP_NODELAY: median round trip {median:?}");
    assert!(median < BOUND, "median round trip {median:?}");
}
