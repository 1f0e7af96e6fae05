//! `Dispatch::Event` and `MessageHandler`: what only event mode does. (What every mode does,
//! event mode included, is in the suites that loop over `util::STREAM_MODES`: tcp_server,
//! unix_stream_server, auth, reliability.)

// Event dispatch, prefork and socket activation are Linux-only parts of the crate.
#![cfg(all(target_os = "linux", not(socketserver_portable)))]

mod util;

use util::{InMode, Mode};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use socketserver::{
    Addr, Auth, Digest, HandlerError, HandlerResult, MessageHandler, Next, Request, TcpServer,
    UnixStreamServer, connect_with_auth, message_fn, mp_connect,
};
use util::{connect, eventually, line_echo, serve};

const EVENT: Mode = Mode::Event(1);

/// Counts the heap, so that a test can bound what misbehaving clients make the server hold.
#[global_allocator]
static HEAP: util::CountingAlloc = util::CountingAlloc;

/// Counts what the lifecycle did, per connection and in all.
#[derive(Clone, Default)]
struct Counts {
    setups: Arc<AtomicUsize>,
    messages: Arc<AtomicUsize>,
    finishes: Arc<AtomicUsize>,
}

/// Answers each line with `N:line`, N counting the connection's messages (state that must
/// survive parking); `close` answers and ends the connection; `panic` panics.
struct Numbered {
    counts: Counts,
    served: u64,
}

impl MessageHandler for Numbered {
    fn setup(&mut self, _: &mut Request) -> HandlerResult {
        self.counts.setups.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn handle_message(&mut self, s: &mut Request) -> Result<Next, HandlerError> {
        self.counts.messages.fetch_add(1, Ordering::SeqCst);
        let mut line = String::new();
        if s.rfile.read_line(&mut line)? == 0 {
            return Ok(Next::Close);
        }
        self.served += 1;
        let line = line.trim_end();
        if line == "panic" {
            panic!("message panic");
        }
        writeln!(s.wfile, "{}:{line}", self.served)?;
        Ok(if line == "close" {
            Next::Close
        } else {
            Next::Message
        })
    }

    fn finish(&mut self, _: &mut Request) -> HandlerResult {
        self.counts.finishes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn message_ready(&self, buffered: &[u8]) -> bool {
        buffered.contains(&b'\n')
    }
}

fn numbered_server(
    workers: usize,
) -> (
    util::Running<socketserver::transport::Tcp<Numbered>>,
    Addr,
    Counts,
) {
    util::init_logs();
    let counts = Counts::default();
    let c = counts.clone();
    let server = TcpServer::builder(move || Numbered {
        counts: c.clone(),
        served: 0,
    })
    .event(workers)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    (serve(server), addr, counts)
}

fn read_line(r: &mut BufReader<TcpStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l
}

#[test]
fn pipelined_messages_in_one_segment_are_served_one_call_each_with_state_kept() {
    let _serial = util::serial();
    let (running, addr, counts) = numbered_server(1);
    let mut c = connect(&addr);
    c.write_all(b"a\nb\nc\n").unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    assert_eq!(
        [read_line(&mut r), read_line(&mut r), read_line(&mut r)],
        ["1:a\n", "2:b\n", "3:c\n"]
    );
    // Parked in between, the handler's count goes on.
    std::thread::sleep(Duration::from_millis(50));
    c.write_all(b"d\n").unwrap();
    assert_eq!(read_line(&mut r), "4:d\n");
    assert_eq!(counts.messages.load(Ordering::SeqCst), 4);
    assert_eq!(counts.setups.load(Ordering::SeqCst), 1);
    drop((c, r));
    assert!(eventually(Duration::from_secs(5), || counts
        .finishes
        .load(Ordering::SeqCst)
        == 1));
    drop(running);
}

#[test]
fn a_message_split_over_many_segments_is_one_call_and_holds_no_worker_meanwhile() {
    let _serial = util::serial();
    // One worker: if the trickled message held it, the other client could not be served.
    let (running, addr, counts) = numbered_server(1);
    let mut slow = connect(&addr);
    slow.set_nodelay(true).unwrap();
    let mut fast = BufReader::new(connect(&addr));
    for (i, b) in b"split message".iter().enumerate() {
        slow.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        if i % 4 == 0 {
            let t = Instant::now();
            fast.get_mut().write_all(b"x\n").unwrap();
            let got = read_line(&mut fast);
            assert!(got.ends_with(":x\n"), "{got}");
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "the other client waited {:?} behind a half-sent message",
                t.elapsed()
            );
        }
    }
    slow.write_all(b"\n").unwrap();
    let mut r = BufReader::new(slow.try_clone().unwrap());
    assert_eq!(read_line(&mut r), "1:split message\n");
    // Every fast message and the one slow message: one call each, none for a fragment.
    let fast_messages = b"split message".len().div_ceil(4);
    assert_eq!(counts.messages.load(Ordering::SeqCst), fast_messages + 1);
    drop((slow, r, fast));
    drop(running);
}

#[test]
fn a_handler_that_closes_ends_the_connection_and_one_that_keeps_it_does_not() {
    let _serial = util::serial();
    let (running, addr, counts) = numbered_server(2);
    let mut keep = BufReader::new(connect(&addr));
    let mut close = BufReader::new(connect(&addr));
    keep.get_mut().write_all(b"stay\n").unwrap();
    close.get_mut().write_all(b"close\n").unwrap();
    assert_eq!(read_line(&mut keep), "1:stay\n");
    assert_eq!(read_line(&mut close), "1:close\n");
    assert_eq!(read_line(&mut close), "", "the connection should be closed");
    assert!(eventually(Duration::from_secs(5), || counts
        .finishes
        .load(Ordering::SeqCst)
        == 1));
    // The kept one still answers.
    keep.get_mut().write_all(b"again\n").unwrap();
    assert_eq!(read_line(&mut keep), "2:again\n");
    // `finish` ran; the connection leaves the registry right after it.
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .active
        == 1));
    drop(keep);
    drop(running);
}

#[test]
fn a_panic_closes_only_its_own_connection() {
    let _serial = util::serial();
    util::quiet_panics("message panic");
    let (running, addr, counts) = numbered_server(1);
    let mut other = BufReader::new(connect(&addr));
    other.get_mut().write_all(b"before\n").unwrap();
    assert_eq!(read_line(&mut other), "1:before\n");
    let mut bad = BufReader::new(connect(&addr));
    bad.get_mut().write_all(b"panic\n").unwrap();
    assert_eq!(
        read_line(&mut bad),
        "",
        "the panicking connection is closed"
    );
    other.get_mut().write_all(b"after\n").unwrap();
    assert_eq!(read_line(&mut other), "2:after\n");
    assert_eq!(running.handle.stats().panics, 1);
    // finish ran for the connection whose message panicked.
    assert!(eventually(Duration::from_secs(5), || counts
        .finishes
        .load(Ordering::SeqCst)
        == 1));
    drop((other, bad));
    drop(running);
}

/// Holds N connections from one Python process (this process holds the server's N, and the
/// descriptor limit would not fit both): every tenth sends a message first, then all park;
/// every 97th is checked to still answer; `READY`; then it waits for the server to close them.
const HOLDER: &str = r#"
import socket, sys
addr = (sys.argv[1], int(sys.argv[2])); n = int(sys.argv[3])
conns = []
for i in range(n):
    c = socket.create_connection(addr)
    if i % 10 == 0:
        c.sendall(b"m"); assert c.recv(1) == b"m"
    conns.append(c)
for c in conns[::97]:
    c.sendall(b"z"); assert c.recv(1) == b"z"
print("READY", flush=True)
for c in conns:
    c.settimeout(30)
    assert c.recv(1) == b""
print("CLOSED", len(conns), flush=True)
"#;

#[test]
fn ten_thousand_parked_connections_hold_no_threads_and_shutdown_is_quick() {
    let _serial = util::serial();
    const N: usize = 10_000;
    const WORKERS: usize = 2;
    util::init_logs();
    let Some(python) = util::pythons().into_iter().next() else {
        assert!(!util::is_ci(), "python3 is required under CI");
        return;
    };
    let threads_before = util::thread_count();
    let server = TcpServer::builder(util::byte_echo)
        .event(WORKERS)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let mut holder = python.spawn(
        HOLDER,
        &[
            &addr.ip().to_string(),
            &addr.port().to_string(),
            &N.to_string(),
        ],
    );
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    if ready.trim() != "READY" {
        let _ = holder.kill();
        let mut err = String::new();
        let _ = holder.stderr.take().unwrap().read_to_string(&mut err);
        panic!("the holder failed: {ready}{err}");
    }
    assert_eq!(running.handle.stats().active, N as u64);
    // The serving thread, the idle reaper and the workers; nothing per connection.
    let server_threads = util::thread_count() - threads_before;
    assert!(
        server_threads <= WORKERS + 2,
        "{server_threads} threads for {N} parked connections"
    );
    // Shutdown latency, five times over: serve_forever can run again, the parked connections
    // stay parked in between.
    let mut running = running;
    let mut stops = Vec::new();
    let server = loop {
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        running.handle.shutdown();
        let server = running.stop();
        stops.push(t.elapsed());
        if stops.len() == 5 {
            break server;
        }
        running = serve(server);
    };
    stops.sort();
    let stopped = stops[2];
    let t = Instant::now();
    drop(server);
    let closed = t.elapsed();
    let mut done = String::new();
    out.read_line(&mut done).unwrap();
    assert_eq!(
        done.trim(),
        format!("CLOSED {N}"),
        "every connection closed"
    );
    assert!(holder.wait().unwrap().success());
    println!(
        "{N} parked connections on {server_threads} threads; serve_forever returned {stopped:?} \
         after shutdown() (median of 5, worst {:?}); closing them all took {closed:?}",
        stops[4]
    );
    assert!(
        stopped < Duration::from_millis(10) && stops[4] < Duration::from_millis(100),
        "shutdown took {stops:?}"
    );
}

#[test]
fn a_thousand_silent_connections_do_not_delay_an_honest_client() {
    let _serial = util::serial();
    // Pool mode's weakness: 1,000 silent sockets would hold every worker until their idle
    // timeout. Parked, they hold none.
    util::init_logs();
    let server = TcpServer::builder(util::byte_echo)
        .mode(EVENT)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let silent: Vec<TcpStream> = (0..1000).map(|_| connect(&addr)).collect();
    assert!(eventually(Duration::from_secs(10), || running
        .handle
        .stats()
        .active
        == 1000));
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let mut c = connect(&addr);
        c.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        c.read_exact(&mut b).unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "honest client beside 1000 silent ones: median {:?}, worst {:?}",
        times[10], times[19]
    );
    assert!(
        times[10] < Duration::from_millis(10),
        "median {:?}",
        times[10]
    );
    drop(silent);
    drop(running);
}

#[test]
fn handshakes_park_while_the_client_answers_and_time_out_without_a_worker() {
    let _serial = util::serial();
    const KEY: &[u8] = b"event key";
    util::init_logs();
    let timeout = Duration::from_millis(300);
    let server = TcpServer::builder(util::byte_echo)
        .mode(EVENT)
        .auth(Auth::hmac(KEY).digest(Digest::Md5))
        .handshake_timeout(timeout)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    // 200 silent handshakes and one trickling its answer, on a single worker.
    let silent: Vec<TcpStream> = (0..200).map(|_| connect(&addr)).collect();
    let mut trickle = connect(&addr);
    let mut challenge = [0u8; 32];
    trickle.read_exact(&mut challenge).unwrap();
    trickle.write_all(b"0123").unwrap();
    let t = Instant::now();
    let mut honest = connect_with_auth(&addr, KEY, Digest::Md5, Duration::from_secs(5)).unwrap();
    honest.write_all(b"ok").unwrap();
    let mut b = [0u8; 2];
    honest.read_exact(&mut b).unwrap();
    let took = t.elapsed();
    println!("honest handshake and echo beside 201 unfinished handshakes: {took:?}");
    assert!(took < Duration::from_millis(100), "took {took:?}");
    // The deadline holds for parked handshakes: all are cut within it and a tick.
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .handshake_timeouts
        == 201));
    let mut b = [0u8; 1];
    trickle
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(trickle.read(&mut b).unwrap_or(0), 0);
    assert_eq!(running.handle.stats().auth_failures, 0);
    drop((silent, honest));
    drop(running);
}

#[test]
fn the_multiprocessing_handshake_parks_too() {
    let _serial = util::serial();
    const KEY: &[u8] = b"mp key";
    util::init_logs();
    let server = TcpServer::builder(util::byte_echo)
        .mode(EVENT)
        .auth(Auth::multiprocessing(KEY))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    // A silent client does not hold the only worker from a real one.
    let _silent = connect(&addr);
    let mut c = mp_connect(&addr, KEY, Duration::from_secs(5)).unwrap();
    c.send_bytes(b"ping").unwrap();
    let mut b = [0u8; 8];
    c.get_mut().read_exact(&mut b).unwrap();
    assert_eq!(&b, &[0, 0, 0, 4, b'p', b'i', b'n', b'g']);
    drop(c);
    // And a wrong key fails as in the other modes.
    assert!(mp_connect(&addr, b"wrong", Duration::from_secs(5)).is_err());
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .auth_failures
        == 1));
    drop(running);
}

#[test]
fn idle_parked_connections_are_closed_by_the_idle_timeout() {
    let _serial = util::serial();
    util::init_logs();
    let server = TcpServer::builder(util::byte_echo)
        .mode(EVENT)
        .idle_timeout(Some(Duration::from_millis(200)))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut c = connect(&addr);
    c.write_all(b"a").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    let t = Instant::now();
    assert_eq!(c.read(&mut b).unwrap_or(0), 0);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(2),
        "closed after {took:?}"
    );
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .idle_closed
        == 1));
    drop(running);
}

#[test]
fn a_drain_closes_parked_connections_at_once_and_lets_a_message_in_flight_finish() {
    let _serial = util::serial();
    util::init_logs();
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let entered_tx = Arc::new(Mutex::new(entered_tx));
    let server = TcpServer::builder(move || {
        let (tx, rx) = (entered_tx.clone(), release_rx.clone());
        message_fn(move |s| {
            let mut b = [0u8; 1];
            s.rfile.read_exact(&mut b)?;
            if b[0] == b'w' {
                tx.lock().unwrap().send(()).unwrap();
                // Bounded, so that a failing test cannot leave its worker stuck.
                let _ = rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
            }
            s.wfile.write_all(&b)?;
            Ok(Next::Message)
        })
    })
    .event(2)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut parked = connect(&addr);
    parked.write_all(b"p").unwrap();
    parked.read_exact(&mut [0u8; 1]).unwrap();
    let mut busy = connect(&addr);
    busy.write_all(b"w").unwrap();
    entered.recv_timeout(Duration::from_secs(5)).unwrap();
    let h = running.handle.clone();
    let drain = std::thread::spawn(move || h.shutdown_graceful(Duration::from_secs(10)));
    let t = Instant::now();
    assert_eq!(parked.read(&mut [0u8; 1]).unwrap_or(0), 0);
    let parked_closed = t.elapsed();
    assert!(
        parked_closed < Duration::from_millis(500),
        "a parked connection waited {parked_closed:?} for the drain"
    );
    assert!(
        !drain.is_finished(),
        "the drain did not wait for the message"
    );
    release.send(()).unwrap();
    let mut b = [0u8; 1];
    busy.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"w", "the message in flight got its answer");
    assert_eq!(
        busy.read(&mut b).unwrap_or(0),
        0,
        "then the connection closed"
    );
    let report = drain.join().unwrap();
    assert_eq!((report.finished, report.cut), (2, 0));
    drop(running);
}

#[test]
fn a_message_short_of_input_is_taken_back_and_served_whole_when_the_rest_comes() {
    let _serial = util::serial();
    util::init_logs();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let server = TcpServer::builder(move || {
        let calls = c2.clone();
        message_fn(move |s| {
            calls.fetch_add(1, Ordering::SeqCst);
            // Wants four bytes, whatever arrived; writes before it has them all.
            s.wfile.write_all(b">")?;
            let mut b = [0u8; 4];
            s.rfile.read_exact(&mut b)?;
            s.wfile.write_all(&b)?;
            Ok(Next::Message)
        })
    })
    .mode(EVENT)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut c = connect(&addr);
    c.write_all(b"ab").unwrap();
    assert!(eventually(Duration::from_secs(5), || calls
        .load(Ordering::SeqCst)
        >= 1));
    // Its one worker is not held: another client is answered meanwhile.
    let mut other = connect(&addr);
    other.write_all(b"wxyz").unwrap();
    assert_eq!(util::read_n(&mut other, 5), b">wxyz");
    c.write_all(b"cd").unwrap();
    // The first call's output was dropped with it: one '>' only, and nothing lost.
    assert_eq!(util::read_n(&mut c, 5), b">abcd");
    assert_eq!(running.handle.stats().handler_errors, 0);
    assert_eq!(running.handle.stats().timeouts, 0);
    drop(running);
}

/// Clients that send and never read: each sends until its own socket blocks (no progress for
/// 100 ms), all of them side by side.
fn non_readers(addr: &Addr, n: usize) -> Vec<TcpStream> {
    let chunk = [b'x'; 16 * 1024];
    let clients: Vec<TcpStream> = (0..n)
        .map(|_| {
            let c = small_buffers(connect(addr));
            c.set_nonblocking(true).unwrap();
            c
        })
        .collect();
    let start = Instant::now();
    let mut progress = vec![start; n];
    while start.elapsed() < Duration::from_secs(10) {
        let mut open = 0;
        for (c, last) in clients.iter().zip(progress.iter_mut()) {
            if last.elapsed() > Duration::from_millis(100) {
                continue;
            }
            open += 1;
            loop {
                match (&*c).write(&chunk) {
                    Ok(_) => *last = Instant::now(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("non-reader: {e}"),
                }
            }
        }
        if open == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    clients
}

/// Small socket buffers, so that a few thousand clients that never read fill theirs with a
/// few tens of KiB each, not the megabytes loopback autotuning allows.
fn small_buffers(c: TcpStream) -> TcpStream {
    let s = socket2::SockRef::from(&c);
    s.set_recv_buffer_size(16 * 1024).unwrap();
    s.set_send_buffer_size(16 * 1024).unwrap();
    c
}

/// An honest client's round trips while the others misbehave: 20 of them, with a median under
/// 10 ms and none over 500 ms (a stalled worker shows as seconds).
fn assert_honest_client_unstalled(addr: &Addr, beside: &str) {
    let mut c = connect(addr);
    let mut times: Vec<Duration> = (0..20)
        .map(|i| {
            let t = Instant::now();
            let msg = format!("honest {i}\n");
            c.write_all(msg.as_bytes()).unwrap();
            assert_eq!(util::read_n(&mut c, msg.len()), msg.as_bytes());
            t.elapsed()
        })
        .collect();
    times.sort();
    let (median, worst) = (times[times.len() / 2], times[times.len() - 1]);
    assert!(
        median < Duration::from_millis(10) && worst < Duration::from_millis(500),
        "beside {beside}: honest round trips median {median:?}, worst {worst:?}"
    );
}

/// With the defaults (two workers, as `echo_server --mode event`), `count` clients that never
/// read their echoes stall nobody; the server holds at most its output bound for each.
fn never_reading(count: usize) {
    let _serial = util::serial();
    util::init_logs();
    let server = TcpServer::builder(util::byte_echo)
        .event(2)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let heap_before = util::heap_live_bytes();
    let stalled = non_readers(&addr, count);
    assert_honest_client_unstalled(&addr, &format!("{count} non-readers"));
    // The output bound (64 KiB), a reply past it and its allocation step (16 KiB), the read
    // buffer and the held reply (8 KiB each) for each, and slack for the honest client and
    // the set: not what they sent.
    let grown = util::heap_live_bytes() - heap_before;
    let bound = count as i64 * (64 + 16 + 8 + 8) * 1024 + 4 * 1024 * 1024;
    assert!(
        grown < bound,
        "{count} non-readers: heap grew {grown} B (bound {bound} B)"
    );
    // None of them was cut for it (the honest client may still be closing).
    assert!(running.handle.stats().active >= count as u64);
    assert_eq!(running.handle.stats().idle_closed, 0);
    drop(stalled);
    drop(running);
}

#[test]
fn two_clients_that_never_read_stall_nobody() {
    never_reading(2);
}

#[test]
fn two_hundred_clients_that_never_read_stall_nobody() {
    never_reading(200);
}

#[test]
fn two_thousand_clients_that_never_read_stall_nobody() {
    never_reading(2000);
}

/// The doc example of `MessageHandler` without its `message_ready`: each half-line client's
/// call runs out of input and is taken back, holding no worker.
fn half_a_line(count: usize) {
    let _serial = util::serial();
    util::init_logs();
    let server = TcpServer::builder(|| {
        message_fn(|s| {
            let mut line = String::new();
            if s.rfile.read_line(&mut line)? == 0 {
                return Ok(Next::Close);
            }
            s.wfile.write_all(line.as_bytes())?;
            Ok(Next::Message)
        })
    })
    .event(2)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let heap_before = util::heap_live_bytes();
    let mut halves: Vec<TcpStream> = (0..count)
        .map(|_| {
            let mut c = connect(&addr);
            c.write_all(b"half a li").unwrap();
            c
        })
        .collect();
    assert_honest_client_unstalled(&addr, &format!("{count} half-line clients"));
    let grown = util::heap_live_bytes() - heap_before;
    let bound = count as i64 * 12 * 1024 + 4 * 1024 * 1024;
    assert!(
        grown < bound,
        "{count} half-line clients: heap grew {grown} B (bound {bound} B)"
    );
    // And each is answered, whole, when its line ends.
    for c in halves.iter_mut().take(50) {
        c.write_all(b"ne\n").unwrap();
        assert_eq!(util::read_n(c, 12), b"half a line\n");
    }
    assert_eq!(running.handle.stats().handler_errors, 0);
    drop(halves);
    drop(running);
}

#[test]
fn fifty_clients_that_send_half_a_line_stall_nobody() {
    half_a_line(50);
}

#[test]
fn two_thousand_clients_that_send_half_a_line_stall_nobody() {
    half_a_line(2000);
}

#[test]
fn a_client_reading_a_large_reply_a_byte_at_a_time_holds_no_worker() {
    let _serial = util::serial();
    util::init_logs();
    // One worker: if the slow reader held it, nobody else would be served.
    let server = TcpServer::builder(|| {
        message_fn(|s| {
            let mut line = String::new();
            if s.rfile.read_line(&mut line)? == 0 {
                return Ok(Next::Close);
            }
            if line == "big\n" {
                s.wfile.write_all(&vec![b'b'; 4 << 20])?;
            } else {
                s.wfile.write_all(line.as_bytes())?;
            }
            Ok(Next::Message)
        })
    })
    .mode(EVENT)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut slow = small_buffers(connect(&addr));
    slow.write_all(b"big\n").unwrap();
    let mut got = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        assert_honest_client_unstalled(&addr, "a slow reader");
        got += slow.read(&mut [0u8; 1]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(got >= 5);
    // It still gets all of its reply, in order, once it reads.
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let rest = util::read_n(&mut slow, (4 << 20) - got);
    assert!(rest.iter().all(|&b| b == b'b'));
    slow.write_all(b"after\n").unwrap();
    assert_eq!(util::read_n(&mut slow, 6), b"after\n");
    drop(running);
}

#[test]
fn a_reply_larger_than_the_socket_takes_is_sent_whole_before_a_close() {
    let _serial = util::serial();
    util::init_logs();
    let server = TcpServer::builder(|| {
        message_fn(|s| {
            let mut line = String::new();
            s.rfile.read_line(&mut line)?;
            s.wfile.write_all(&vec![b'z'; 3 << 20])?;
            Ok(Next::Close)
        })
    })
    .mode(EVENT)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut c = small_buffers(connect(&addr));
    c.write_all(b"go\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let got = util::read_to_eof(&mut c).unwrap();
    assert_eq!(got.len(), 3 << 20);
    drop(running);
}

#[test]
fn clients_that_never_read_are_closed_by_the_idle_timeout() {
    let _serial = util::serial();
    util::init_logs();
    let server = TcpServer::builder(util::byte_echo)
        .event(2)
        .idle_timeout(Some(Duration::from_millis(500)))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let stalled = non_readers(&addr, 20);
    assert!(
        eventually(Duration::from_secs(5), || running.handle.stats().active
            == 0),
        "non-readers still open: {}",
        running.handle.stats().active
    );
    drop(stalled);
    drop(running);
}

#[test]
fn max_connections_caps_event_mode_too() {
    let _serial = util::serial();
    util::init_logs();
    let server = TcpServer::builder(util::byte_echo)
        .mode(EVENT)
        .max_connections(2)
        .bind("127.0.0.1:0")
        .unwrap();
    assert_eq!(server.max_connections(), Some(2));
    let addr = server.local_addr().clone();
    let running = serve(server);
    // Two busy clients, each in the middle of nothing idle: a message in flight.
    let mut a = connect(&addr);
    let mut b = connect(&addr);
    for c in [&mut a, &mut b] {
        c.write_all(b"m").unwrap();
        assert_eq!(util::read_n(c, 1), b"m");
    }
    let mut third = connect(&addr);
    third.write_all(b"x").unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // Not idle for a look of the reaper yet (a second): nobody is shed, the third waits.
    assert!(third.read(&mut [0u8; 1]).is_err(), "served past the cap");
    assert_eq!(running.handle.stats().evicted, 0);
    drop(a);
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = [0u8; 1];
    third.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"x");
    drop((b, third));
    drop(running);
}

/// The pressure policy, in every stream dispatch mode with a cap: a server full of idle
/// clients (idle for a few looks of the reaper) serves a newcomer within milliseconds, by
/// shedding the idlest connection, one per newcomer, not the set.
#[test]
fn a_full_server_of_idle_clients_sheds_the_idlest_for_each_newcomer() {
    let _serial = util::serial();
    util::init_logs();
    for mode in [Mode::Thread, Mode::Pool(4), Mode::Event(2)] {
        const CAP: usize = 20;
        let mut b = TcpServer::builder(util::byte_echo).mode(mode);
        if mode != (Mode::Pool(4)) {
            b = b.max_connections(CAP);
        }
        let server = b.bind("127.0.0.1:0").unwrap();
        let cap = server.max_connections().unwrap();
        let addr = server.local_addr().clone();
        let running = serve(server);
        // The oldest first, then the rest a second later: the oldest are the idlest.
        let mut idle: Vec<TcpStream> = Vec::new();
        for i in 0..cap {
            let mut c = connect(&addr);
            c.write_all(b"i").unwrap();
            assert_eq!(util::read_n(&mut c, 1), b"i");
            idle.push(c);
            if i == 1 {
                std::thread::sleep(Duration::from_millis(1500));
            }
        }
        std::thread::sleep(Duration::from_millis(1500));
        for n in 0..2 {
            let t = Instant::now();
            let mut newcomer = connect(&addr);
            newcomer.write_all(b"new").unwrap();
            assert_eq!(util::read_n(&mut newcomer, 3), b"new", "{mode:?}");
            let took = t.elapsed();
            assert!(
                took < Duration::from_millis(200),
                "{mode:?}: newcomer {n} served after {took:?}"
            );
            idle.push(newcomer);
        }
        let stats = running.handle.stats();
        assert_eq!(stats.evicted, 2, "{mode:?}: {stats:?}");
        // The two shed were the two oldest.
        for (i, c) in idle.iter_mut().enumerate().take(cap) {
            c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let closed = matches!(c.read(&mut [0u8; 1]), Ok(0));
            assert_eq!(closed, i < 2, "{mode:?}: client {i} closed: {closed}");
        }
        drop(idle);
        drop(running);
    }
}

#[test]
fn unix_stream_servers_park_too() {
    let _serial = util::serial();
    util::init_logs();
    let path = util::sock_path("event");
    let server = UnixStreamServer::builder(line_echo)
        .mode(EVENT)
        .bind(&path)
        .unwrap();
    let running = serve(server);
    let conns: Vec<_> = (0..50)
        .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
        .collect();
    for c in &conns {
        util::three_round_trips(c);
    }
    drop(conns);
    drop(running);
}

/// Whole-connection handlers and datagram servers have no `event` (compile-fail doctests on
/// `Builder::event` show it); what is left to refuse at run time is no worker.
#[test]
fn event_mode_refuses_zero_workers() {
    let _serial = util::serial();
    let e = TcpServer::builder(util::byte_echo)
        .event(0)
        .bind("127.0.0.1:0")
        .unwrap_err();
    assert!(e.to_string().contains("at least 1"), "{e}");
}

#[test]
fn rapid_round_trips_on_many_workers_never_lose_a_wake_up() {
    // Each reply lets its client send the next message at once, often before the worker that
    // wrote it has parked the connection: the event then reaches another worker, which must
    // hand it back rather than drop it (a dropped one stalls the client for good).
    let _serial = util::serial();
    util::init_logs();
    const CLIENTS: usize = 32;
    const ROUNDS: usize = 400;
    let server = TcpServer::builder(line_echo)
        .event(4)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let c = connect(&addr);
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                c.set_nodelay(true).unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut w = c;
                for n in 0..ROUNDS {
                    let msg = format!("{i} {n}\n");
                    w.write_all(msg.as_bytes()).unwrap();
                    let mut got = String::new();
                    r.read_line(&mut got)
                        .unwrap_or_else(|e| panic!("client {i} stalled at round {n}: {e}"));
                    assert_eq!(got, msg);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    drop(running);
}

/// In event mode the workers accept: the thread that runs `serve_forever` is not on a
/// connection's path, so connections are served while it is busy in a `service_actions` hook.
/// (In the other modes that thread accepts, and a hook that blocks holds new clients back.)
#[test]
fn event_workers_accept_while_the_serving_thread_is_busy() {
    util::init_logs();
    let in_hook = Arc::new(AtomicUsize::new(0));
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let h = in_hook.clone();
    let server = TcpServer::builder(util::line_echo)
        .mode(EVENT)
        .poll_interval(Duration::from_millis(10))
        .service_actions(move || {
            // The second call blocks until the test lets it go.
            if h.fetch_add(1, Ordering::SeqCst) == 1 {
                let _ = lock_recv(&release_rx);
            }
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    assert!(eventually(Duration::from_secs(5), || in_hook
        .load(Ordering::SeqCst)
        >= 2));
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut s = BufReader::new(connect(&addr));
        s.get_mut()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        writeln!(s.get_mut(), "hello {i}").unwrap();
        let got = read_line(&mut s);
        assert_eq!(
            got,
            format!("hello {i}\n"),
            "client {i} while the serving thread is busy"
        );
        clients.push(s);
    }
    assert_eq!(in_hook.load(Ordering::SeqCst), 2, "the hook returned early");
    release_tx.send(()).unwrap();
    drop(clients);
    drop(running);
}

/// A `verify_request` hook that blocks holds the worker that accepts, and no other: the
/// listener is one worker's at a time, so a second arrival does not capture a second worker,
/// and a parked client is answered at once.
#[test]
fn a_slow_verify_request_holds_one_worker_not_all() {
    util::init_logs();
    let slow = Arc::new(AtomicBool::new(false));
    let s = slow.clone();
    let server = TcpServer::builder(util::line_echo)
        .event(2)
        .verify_request(move |_| {
            if s.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1500));
            }
            true
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut a = BufReader::new(connect(&addr));
    writeln!(a.get_mut(), "one").unwrap();
    assert_eq!(read_line(&mut a), "one\n");
    slow.store(true, Ordering::SeqCst);
    let b = connect(&addr); // a worker sits in the hook
    std::thread::sleep(Duration::from_millis(100));
    let c = connect(&addr); // must not take the other worker
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    writeln!(a.get_mut(), "two").unwrap();
    assert_eq!(read_line(&mut a), "two\n");
    let took = t.elapsed();
    slow.store(false, Ordering::SeqCst);
    drop((a, b, c));
    drop(running);
    assert!(
        took < Duration::from_millis(500),
        "a parked client's message waited {took:?} behind a slow verify_request"
    );
}

/// `shutdown_and_wait` from a `verify_request` hook, which an event worker runs while the
/// serve loop waits for it to finish accepting: it must not wait for the loop in turn.
#[test]
fn shutdown_and_wait_from_verify_request_returns_in_event_mode() {
    util::init_logs();
    let handle: Arc<OnceLock<socketserver::ServerHandle>> = Arc::new(OnceLock::new());
    let waited = Arc::new(Mutex::new(None));
    let (h, w) = (handle.clone(), waited.clone());
    let server = TcpServer::builder(util::line_echo)
        .mode(EVENT)
        .verify_request(move |_| {
            if let Some(h) = h.get() {
                *w.lock().unwrap() = Some(h.shutdown_and_wait());
            }
            false
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let _ = handle.set(server.handle());
    let addr = server.local_addr().clone();
    let serving = std::thread::spawn(move || {
        server.serve_forever();
        server
    });
    let _c = connect(&addr);
    assert!(
        eventually(Duration::from_secs(5), || serving.is_finished()),
        "serve_forever still runs 5 s after shutdown_and_wait from verify_request"
    );
    drop(serving.join().unwrap());
    assert_eq!(*waited.lock().unwrap(), Some(false), "it waited for itself");
}

fn lock_recv(rx: &Mutex<mpsc::Receiver<()>>) -> Result<(), mpsc::RecvError> {
    rx.lock().unwrap().recv()
}

// Accepting driven by permits: the workers accept while a permit is free under
// `max_connections`; at the cap the listener leaves their set and the newcomer waits in the
// backlog, until a freed permit (a connection closing, or one the pressure policy shed for it)
// re-arms the listener.

/// Echoes lines, but `holdN` (N 0 or 1) holds its worker until `release[N]` is set: a
/// connection busy with a message, which the pressure policy cannot shed.
struct Holding {
    release: Arc<[AtomicBool; 2]>,
    holding: Arc<AtomicUsize>,
}

impl MessageHandler for Holding {
    fn handle_message(&mut self, s: &mut Request) -> Result<Next, HandlerError> {
        let mut line = String::new();
        if s.rfile.read_line(&mut line)? == 0 {
            return Ok(Next::Close);
        }
        if let Some(n) = line.trim_end().strip_prefix("hold") {
            let n: usize = n.parse().unwrap();
            self.holding.fetch_add(1, Ordering::SeqCst);
            while !self.release[n].load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        s.wfile.write_all(line.as_bytes())?;
        Ok(Next::Message)
    }

    fn message_ready(&self, buffered: &[u8]) -> bool {
        buffered.contains(&b'\n')
    }
}

fn read_line_within(c: &mut BufReader<TcpStream>, limit: Duration) -> std::io::Result<String> {
    c.get_mut().set_read_timeout(Some(limit))?;
    let mut got = String::new();
    c.read_line(&mut got)?;
    Ok(got)
}

/// At `max_connections` with every connection busy (a message in flight), the pressure policy
/// has nobody to shed: the newcomer waits in the backlog, not accepted, and is served as soon
/// as one of them closes (its permit re-arms the listener), with no poll in between.
#[test]
fn at_the_cap_of_busy_clients_a_newcomer_waits_in_the_backlog_until_one_closes() {
    let _serial = util::serial();
    util::init_logs();
    let release: Arc<[AtomicBool; 2]> = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
    let holding = Arc::new(AtomicUsize::new(0));
    let (r, h) = (release.clone(), holding.clone());
    let server = TcpServer::builder(move || Holding {
        release: r.clone(),
        holding: h.clone(),
    })
    .mode(Mode::Event(4))
    .max_connections(2)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    // One after the other: a worker serves the rest of its batch of ready connections only
    // after the one it holds.
    let mut busy: Vec<BufReader<TcpStream>> = Vec::new();
    for i in 0..2 {
        let mut c = BufReader::new(connect(&addr));
        writeln!(c.get_mut(), "hold{i}").unwrap();
        busy.push(c);
        assert!(eventually(Duration::from_secs(5), || holding
            .load(Ordering::SeqCst)
            == i + 1));
    }
    let mut newcomer = BufReader::new(connect(&addr));
    writeln!(newcomer.get_mut(), "new").unwrap();
    // Over a look of the reaper: nobody idle to shed, and the newcomer stays in the backlog.
    assert!(
        read_line_within(&mut newcomer, Duration::from_millis(1500)).is_err(),
        "served past the cap"
    );
    let stats = running.handle.stats();
    assert_eq!((stats.accepted, stats.evicted), (2, 0), "{stats:?}");
    // One finishes its message and hangs up: its permit lets the newcomer in.
    release[0].store(true, Ordering::SeqCst);
    assert_eq!(
        read_line_within(&mut busy[0], Duration::from_secs(5)).unwrap(),
        "hold0\n"
    );
    let t = Instant::now();
    drop(busy.remove(0));
    let got = read_line_within(&mut newcomer, Duration::from_secs(5));
    let took = t.elapsed();
    assert_eq!(
        got.ok().as_deref(),
        Some("new\n"),
        "the newcomer was not served"
    );
    assert!(
        took < Duration::from_millis(200),
        "served {took:?} after a slot freed"
    );
    release[1].store(true, Ordering::SeqCst);
    drop((busy, newcomer));
    drop(running);
}

/// A drain in event mode deregisters the listener from the workers' set, then the serve loop
/// takes what is queued in the backlog and serves it before it closes the listener: those
/// connections get their echo rather than a reset. (They queue here behind a `verify_request`
/// that holds the one worker with the listener; the drain starts meanwhile.)
#[test]
fn a_drain_in_event_mode_serves_the_connections_queued_in_the_backlog() {
    let _serial = util::serial();
    util::init_logs();
    let slow = Arc::new(AtomicBool::new(true));
    let go = Arc::new(AtomicBool::new(false));
    let (s, g) = (slow.clone(), go.clone());
    let server = TcpServer::builder(line_echo)
        .mode(Mode::Event(2))
        .verify_request(move |_| {
            if s.swap(false, Ordering::SeqCst) {
                while !g.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            true
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut first = BufReader::new(connect(&addr));
    writeln!(first.get_mut(), "first").unwrap();
    assert!(eventually(Duration::from_secs(5), || !slow.load(Ordering::SeqCst)));
    // Queued in the backlog: the listener is the held worker's (one-shot).
    let mut queued: Vec<BufReader<TcpStream>> = (0..3)
        .map(|i| {
            let mut c = BufReader::new(connect(&addr));
            writeln!(c.get_mut(), "queued {i}").unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(running.handle.stats().accepted, 1);
    let h = running.handle.clone();
    let drain = std::thread::spawn(move || h.shutdown_graceful(Duration::from_secs(10)));
    // The drain has asked the loop to stop; the held worker lets go within its hand-off bound.
    std::thread::sleep(Duration::from_millis(60));
    go.store(true, Ordering::SeqCst);
    assert_eq!(
        read_line_within(&mut first, Duration::from_secs(5)).unwrap(),
        "first\n"
    );
    for (i, c) in queued.iter_mut().enumerate() {
        let got = read_line_within(c, Duration::from_secs(5));
        assert_eq!(
            got.as_ref().ok().map(String::as_str),
            Some(format!("queued {i}\n").as_str()),
            "a connection queued at the drain was not served: {got:?}"
        );
    }
    // Each is closed once served (the drain closes parked connections), and the drain ends.
    let report = drain.join().unwrap();
    assert_eq!(report.cut, 0, "{report:?}");
    drop((first, queued));
    // The listener is closed: new clients are refused.
    assert!(
        TcpStream::connect(addr.inet().unwrap()).is_err(),
        "a newcomer was let in after the drain"
    );
    assert_eq!(running.handle.stats().accepted, 4);
    drop(running);
}
