//! The reliability suite: what production throws at a server, each scenario printing its figure
//! and asserting it. Run with `cargo test --release --test reliability -- --nocapture` to see
//! the figures. (Descriptor exhaustion runs in a child process: tests/fd_exhaustion.rs.)

mod util;

use util::{InMode, Mode};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use socketserver::{
    Addr, Auth, CHALLENGE_LEN, Digest, Dispatch, Handler, HandlerResult, Request, ServerHandle,
    TcpServer, connect_with_auth, handler_fn,
};
use util::{connect, eventually, line_echo, send_split, serve};

const KEY: &[u8] = b"reliability-key";

/// Counts live heap bytes, for the churn test's leak check.
#[global_allocator]
static HEAP: util::CountingAlloc = util::CountingAlloc;

/// These tests measure the whole process (threads, descriptors, memory, CPU): they run one at
/// a time, each holding this lock.
fn honest_request(addr: &Addr) -> Result<Duration, socketserver::Error> {
    let t = Instant::now();
    let mut s = connect_with_auth(addr, KEY, Digest::Sha256, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"honest request")?;
    let mut got = [0u8; 14];
    s.read_exact(&mut got)?;
    assert_eq!(&got, b"honest request");
    Ok(t.elapsed())
}

/// The slowest an honest request may be under slowloris: a connection, a handshake and an echo
/// take about 1 ms (tens of ms on a loaded machine). Starved, a client would wait for silent
/// handshakes to time out, 2 s here.
const SLOWLORIS_WORST: Duration = Duration::from_millis(250);

#[test]
fn slowloris_silent_connections_do_not_starve_honest_clients() {
    let _serial = util::serial();
    util::init_logs();
    const SILENT: usize = 200;
    const CAP: usize = 8;
    let timeout = Duration::from_secs(2);
    let modes = vec![Mode::Thread, Mode::Pool(16)];
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    let modes = [modes, vec![Mode::Event(2)]].concat();
    for mode in modes {
        let server = TcpServer::builder(util::byte_echo)
            .mode(mode)
            .auth(Auth::hmac(KEY))
            .handshake_timeout(timeout)
            .max_pending_handshakes(CAP)
            .bind("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr().clone();
        let running = serve(server);
        let mut silent: Vec<TcpStream> = (0..SILENT)
            .map(|_| TcpStream::connect(&addr).unwrap())
            .collect();
        let mut worst = Duration::ZERO;
        for i in 0..20 {
            // Keep the pressure on: ten more silent connections before each honest request, each
            // taking a handshake slot from an older silent one. (A burst racing the honest
            // handshake within its round trip could cut it too: see Builder::max_pending_handshakes.)
            let accepted = running.handle.stats().accepted;
            silent.extend((0..10).map(|_| TcpStream::connect(&addr).unwrap()));
            assert!(eventually(Duration::from_secs(10), || {
                running.handle.stats().accepted >= accepted + 10
            }));
            std::thread::sleep(Duration::from_millis(50)); // their handshakes begin
            let took = honest_request(&addr)
                .unwrap_or_else(|e| panic!("{mode:?}: honest request {i} failed: {e}"));
            worst = worst.max(took);
        }
        let stats = running.handle.stats();
        println!(
            "slowloris {mode:?}: {SILENT}+200 silent connections, handshake cap {CAP}: 20/20 honest \
             requests served, worst {worst:?} (handshake timeout {timeout:?}); {} handshakes cut, {} timed out",
            stats.handshake_evictions, stats.handshake_timeouts
        );
        assert!(
            worst < SLOWLORIS_WORST,
            "{mode:?}: an honest request took {worst:?}"
        );
        drop(silent);
    }
}

#[test]
fn panic_storm_leaves_the_server_standing() {
    let _serial = util::serial();
    util::init_logs();
    util::quiet_panics("storm");
    const PANICS: usize = 10_000;
    const CLIENTS: usize = 4;
    for mode in [Dispatch::Pool { workers: 4 }, Dispatch::Thread] {
        let server = TcpServer::builder(|| {
            handler_fn(|req: &mut Request| {
                let mut b = [0u8; 1];
                req.read_exact(&mut b)?;
                if b[0] == b'p' {
                    panic!("storm");
                }
                req.write_all(b"answered")?;
                Ok(())
            })
        })
        .dispatch(mode)
        .handle_error(|_, _| {}) // counted, not logged: 10,000 log lines would be the test
        .bind("127.0.0.1:0")
        .unwrap();
        let addr = server.local_addr().clone();
        let running = serve(server);
        let answered = Arc::new(AtomicUsize::new(0));
        let t = Instant::now();
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (addr, answered) = (addr.clone(), answered.clone());
                std::thread::spawn(move || {
                    for i in 0..PANICS / CLIENTS {
                        let mut s = connect(&addr);
                        s.write_all(b"p").unwrap();
                        assert!(util::read_to_eof(&mut s).unwrap_or_default().is_empty());
                        if i % 10 == 0 {
                            let mut h = connect(&addr);
                            h.write_all(b"h").unwrap();
                            assert_eq!(util::read_to_eof(&mut h).unwrap(), b"answered");
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().expect("a client saw a wrong answer");
        }
        let elapsed = t.elapsed();
        assert!(eventually(Duration::from_secs(10), || running
            .handle
            .stats()
            .active
            == 0));
        let stats = running.handle.stats();
        let honest = answered.load(Ordering::Relaxed);
        println!(
            "panic storm {mode:?}: {} panics, {honest}/{honest} honest requests answered, in {elapsed:?}; \
             server still serving: {}",
            stats.panics,
            !running.is_finished()
        );
        assert_eq!(stats.panics, PANICS as u64, "{mode:?}: panic counter");
        assert_eq!(honest, PANICS / 10);
        assert!(!running.is_finished(), "serve_forever died");
        assert_eq!(
            util::read_to_eof({
                let mut s = connect(&addr);
                s.write_all(b"h").unwrap();
                s
            })
            .unwrap(),
            b"answered"
        );
    }
}

/// A keep-alive protocol: 8-byte request ids, each answered with 32 KiB written in four pieces
/// (so a drain overlaps replies in progress). Between requests the handler checks whether the
/// server is draining and, if so, hangs up rather than start a request it might not finish.
struct SlowReplies {
    requests_read: Arc<AtomicU64>,
}

const REPLY_LEN: usize = 32 * 1024;

fn reply_for(id: u64) -> Vec<u8> {
    (0..REPLY_LEN)
        .map(|i| (id as usize).wrapping_mul(31).wrapping_add(i) as u8)
        .collect()
}

impl Handler for SlowReplies {
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        let mut id = [0u8; 8];
        while !req.server().is_draining() {
            match req.read_exact(&mut id) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            self.requests_read.fetch_add(1, Ordering::SeqCst);
            let reply = reply_for(u64::from_be_bytes(id));
            for piece in reply.chunks(REPLY_LEN / 4) {
                req.write_all(piece)?;
                std::thread::sleep(Duration::from_millis(3));
            }
        }
        Ok(())
    }
}

#[test]
fn graceful_drain_under_load_never_half_answers() {
    let _serial = util::serial();
    util::init_logs();
    const CLIENTS: usize = 8;
    let requests_read = Arc::new(AtomicU64::new(0));
    let r = requests_read.clone();
    let server = TcpServer::builder(move || SlowReplies {
        requests_read: r.clone(),
    })
    .dispatch(Dispatch::Pool { workers: CLIENTS })
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let handle = server.handle();
    let running = serve(server);
    let full = Arc::new(AtomicU64::new(0));
    let half = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (addr, full, half, stop) = (addr.clone(), full.clone(), half.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut id = (c as u64) << 32;
                // Reconnect until the server stops accepting.
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(&addr) else {
                        return;
                    };
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    loop {
                        id += 1;
                        if s.write_all(&id.to_be_bytes()).is_err() {
                            break;
                        }
                        let mut got = Vec::with_capacity(REPLY_LEN);
                        let _ = (&mut s).take(REPLY_LEN as u64).read_to_end(&mut got);
                        if got.is_empty() {
                            break; // not read by the server: unanswered, cleanly
                        }
                        if got != reply_for(id) {
                            half.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        full.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || full
        .load(Ordering::SeqCst)
        >= 50));
    let report = handle.shutdown_graceful(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let (full, half, read) = (
        full.load(Ordering::SeqCst),
        half.load(Ordering::SeqCst),
        requests_read.load(Ordering::SeqCst),
    );
    println!(
        "graceful drain under load: {read} requests read by the server, {full} fully answered, \
         {half} half-answered; drain: {} connections finished, {} cut",
        report.finished, report.cut
    );
    assert_eq!(half, 0, "a reply was cut short");
    assert_eq!(
        full, read,
        "a request the server read was not fully answered"
    );
    assert_eq!(report.cut, 0);
    assert!(report.finished >= 1);
    drop(running);
}

/// How long a cut may take past the grace period: shutting a socket down and the handler's
/// read returning (well under 1 ms; tens of ms on a loaded machine). The drain waits up to 1 s
/// more for handlers that ignore their socket, which a cut one must not need.
const DRAIN_CUT_SLACK: Duration = Duration::from_millis(500);

#[test]
fn drain_cuts_what_overstays_the_deadline() {
    let _serial = util::serial();
    let server = TcpServer::builder(util::byte_echo)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let handle = server.handle();
    let running = serve(server);
    let mut idle = connect(&addr);
    idle.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    idle.read_exact(&mut b).unwrap();
    let grace = Duration::from_millis(200);
    let t = Instant::now();
    let report = handle.shutdown_graceful(grace);
    let took = t.elapsed();
    println!("drain of an idle keep-alive connection: {report:?} in {took:?}");
    assert_eq!(
        (report.finished, report.cut, report.still_running),
        (0, 1, 0)
    );
    // The whole grace period, then the cut: the handler returns as soon as its socket is shut
    // down, long before the drain's extra second for handlers that ignore their socket.
    assert!(
        took >= grace,
        "cut after {took:?}, before the {grace:?} grace period"
    );
    assert!(
        took < grace + DRAIN_CUT_SLACK,
        "the cut took {:?} after the grace period",
        took - grace
    );
    assert_eq!(util::read_to_eof(&mut idle).unwrap_or_default(), b"");
    drop(running);
}

/// What 100,000 connections may add to the heap: nothing they leave behind (allocator
/// bookkeeping aside), under 1 byte a connection; a leak of 50 bytes each is 5 MB.
const CHURN_HEAP_GROWTH: i64 = 64 * 1024;
/// And to resident memory, which also counts thread stacks and allocator slack: measured at
/// +20 to +100 KiB per 100,000 connections after the warm-up; a 50-byte leak adds 6 MiB.
const CHURN_RSS_GROWTH_KIB: u64 = 1024;

#[test]
fn churn_of_100k_connections_keeps_threads_and_memory_flat() {
    let _serial = util::serial();
    util::init_logs();
    const WARM_UP: usize = 20_000;
    const TOTAL: usize = 100_000;
    const CLIENTS: usize = 4;
    let server = TcpServer::builder(|| {
        handler_fn(|req: &mut Request| {
            let mut b = [0u8; 2];
            req.read_exact(&mut b)?;
            req.write_all(&b)?;
            Ok(()) // the server closes first, so client ports are free at once
        })
    })
    .dispatch(Dispatch::Thread)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let run = |n: usize| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    for _ in 0..n / CLIENTS {
                        let mut s = TcpStream::connect(&addr).unwrap();
                        s.write_all(b"x\n").unwrap();
                        let mut line = String::new();
                        BufReader::new(&mut s).read_line(&mut line).unwrap();
                        assert_eq!(line, "x\n");
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        // Every request over, and its thread gone.
        assert!(eventually(Duration::from_secs(10), || running
            .handle
            .stats()
            .active
            == 0));
        std::thread::sleep(Duration::from_millis(50));
    };
    // Warm up: thread stacks cached, malloc arenas made, lazily allocated state in place.
    run(WARM_UP);
    let baseline_threads = util::thread_count();
    let (start_rss, start_heap) = (util::rss_kib("self"), util::heap_live_bytes());
    assert!(start_heap > 0, "the counting allocator is not installed");
    let t = Instant::now();
    run(TOTAL);
    let elapsed = t.elapsed();
    assert!(
        eventually(Duration::from_secs(10), || util::thread_count()
            <= baseline_threads),
        "threads: {baseline_threads} before, {} after",
        util::thread_count()
    );
    let (end_rss, end_heap) = (util::rss_kib("self"), util::heap_live_bytes());
    let accepted = running.handle.stats().accepted;
    println!(
        "churn: {TOTAL} connections in {elapsed:?} ({:.0}/s) after {WARM_UP} to warm up; threads \
         {baseline_threads} -> {}; heap {start_heap} B -> {end_heap} B; RSS {start_rss} KiB -> \
         {end_rss} KiB",
        TOTAL as f64 / elapsed.as_secs_f64(),
        util::thread_count()
    );
    assert_eq!(accepted as usize, WARM_UP + TOTAL);
    assert!(
        end_heap - start_heap < CHURN_HEAP_GROWTH,
        "the heap grew by {} B over {TOTAL} connections",
        end_heap - start_heap
    );
    assert!(
        end_rss < start_rss + CHURN_RSS_GROWTH_KIB,
        "resident memory grew: {start_rss} KiB -> {end_rss} KiB"
    );
}

/// One long-lived server per auth mode for the fuzz cases, counting handlers that ran.
struct Fuzzed {
    addr: Addr,
    handle: ServerHandle,
    handled: Arc<AtomicUsize>,
}

/// Its handler counts the connections it gets and echoes until the client hangs up (a message
/// handler, so that it runs in event mode too).
fn fuzz_target(auth: fn() -> Auth, mode: Mode) -> Fuzzed {
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let server = TcpServer::builder(move || util::counting_echo(&h))
        .mode(mode)
        .auth(auth())
        .handshake_timeout(Duration::from_millis(500))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let handle = server.handle();
    // Runs for the rest of the test process.
    std::thread::spawn(move || server.serve_forever());
    Fuzzed {
        addr,
        handle,
        handled,
    }
}

fn hmac_target() -> &'static Fuzzed {
    static T: OnceLock<Fuzzed> = OnceLock::new();
    T.get_or_init(|| fuzz_target(|| Auth::hmac(KEY).digest(Digest::Md5), Mode::Thread))
}

/// [`hmac_target`] in event mode, where the answer is waited for parked.
fn hmac_event_target() -> &'static Fuzzed {
    static T: OnceLock<Fuzzed> = OnceLock::new();
    let event = util::EVENT_MODE;
    T.get_or_init(|| fuzz_target(|| Auth::hmac(KEY).digest(Digest::Md5), event))
}

/// Sends 3.12+ challenges: `{sha256}` and 40 random bytes.
fn mp_target() -> &'static Fuzzed {
    static T: OnceLock<Fuzzed> = OnceLock::new();
    T.get_or_init(|| fuzz_target(|| Auth::multiprocessing(KEY), Mode::Thread))
}

/// [`mp_target`] in event mode.
fn mp_event_target() -> &'static Fuzzed {
    static T: OnceLock<Fuzzed> = OnceLock::new();
    let event = util::EVENT_MODE;
    T.get_or_init(|| fuzz_target(|| Auth::multiprocessing(KEY), event))
}

/// Sends `bytes` split at `splits`, then half-closes and waits for the server to hang up.
fn feed(addr: &Addr, bytes: &[u8], splits: &[usize]) {
    let mut s = connect(addr);
    if send_split(&mut s, bytes, splits) {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let _ = util::read_to_eof(&mut s);
}

/// An answer to a challenge: the right MAC, or a well-formed wrong one, of the right length and
/// form, that only the MAC check can tell from the right one.
#[derive(Clone, Debug)]
enum Answer {
    Right,
    /// The right MAC with this bit (modulo its length) flipped.
    FlipBit(usize),
    /// The MAC under another key.
    OtherKey(Vec<u8>),
    /// Random bytes of the MAC's length.
    Random(Vec<u8>),
}

impl Answer {
    fn mac(&self, digest: Digest, message: &[u8]) -> Vec<u8> {
        let mut mac = util::hmac(digest, KEY, message);
        match self {
            Answer::Right => {}
            Answer::FlipBit(bit) => {
                let bit = bit % (mac.len() * 8);
                mac[bit / 8] ^= 1 << (bit % 8);
            }
            Answer::OtherKey(key) => {
                assert_ne!(key.as_slice(), KEY);
                mac = util::hmac(digest, key, message);
            }
            Answer::Random(bytes) => mac = bytes[..mac.len()].to_vec(),
        }
        mac
    }
}

fn wrong_answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        any::<usize>().prop_map(Answer::FlipBit),
        proptest::collection::vec(any::<u8>(), 0..40)
            .prop_filter("another key", |k| k.as_slice() != KEY)
            .prop_map(Answer::OtherKey),
        proptest::collection::vec(any::<u8>(), 48).prop_map(Answer::Random),
    ]
}

/// The forms of answer a 3.12+ listener accepts: raw HMAC-MD5 (what 3.11 sends) or `{name}`
/// and the MAC with that digest, over the whole challenge message.
const MP_FORMS: [Option<Digest>; 6] = [
    None,
    Some(Digest::Md5),
    Some(Digest::Sha256),
    Some(Digest::Sha384),
    Some(Digest::Sha3_256),
    Some(Digest::Sha3_384),
];

/// Waits until the server has either run the handler or counted an authentication failure
/// for the connection just made; true if the handler ran.
fn verdict(t: &Fuzzed, handled: usize, failures: u64) -> bool {
    let moved = || {
        (
            t.handled.load(Ordering::SeqCst) - handled,
            t.handle.stats().auth_failures - failures,
        )
    };
    assert!(
        eventually(Duration::from_secs(10), || moved() != (0, 0)),
        "neither handled nor counted as a failure"
    );
    let (reached, failed) = moved();
    assert_eq!(reached + failed as usize, 1, "one connection, one verdict");
    reached == 1
}

/// Answers the classic handshake's challenge from `t` with `answer` (hex, upper or lower
/// case), sent split at `splits`, then hangs up; true if the handler ran.
fn hmac_attempt(t: &Fuzzed, answer: &Answer, upper: bool, splits: &[usize]) -> bool {
    let (handled, failures) = (
        t.handled.load(Ordering::SeqCst),
        t.handle.stats().auth_failures,
    );
    let mut s = connect(&t.addr);
    let challenge = util::read_n(&mut s, CHALLENGE_LEN);
    let mut hex = hex::encode(answer.mac(Digest::Md5, &challenge));
    if upper {
        hex.make_ascii_uppercase();
    }
    if send_split(&mut s, hex.as_bytes(), splits) {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let _ = util::read_to_eof(&mut s);
    verdict(t, handled, failures)
}

/// Answers the multiprocessing listener's challenge with `answer` in `form`, sent split at
/// `splits`; a wrong answer must get `#FAILURE#`, a right one `#WELCOME#`, after which we
/// finish the mutual handshake and hang up. True if the handler ran.
fn mp_attempt(t: &Fuzzed, answer: &Answer, form: Option<Digest>, splits: &[usize]) -> bool {
    const WELCOME: &[u8] = b"\x00\x00\x00\x09#WELCOME#";
    let (handled, failures) = (
        t.handled.load(Ordering::SeqCst),
        t.handle.stats().auth_failures,
    );
    let mut s = connect(&t.addr);
    let frame = util::read_n(&mut s, 4 + 11 + 8 + 40);
    assert_eq!(frame[..4 + 19], *b"\x00\x00\x00\x3b#CHALLENGE#{sha256}");
    let message = &frame[4 + 11..];
    let reply = match form {
        None => answer.mac(Digest::Md5, message),
        Some(d) => [format!("{{{d}}}").as_bytes(), &answer.mac(d, message)].concat(),
    };
    send_split(&mut s, &util::framed(&reply), splits);
    let said = util::read_n(&mut s, 13);
    if said == WELCOME {
        let ours = [&b"{sha256}"[..], &[7; 40]].concat();
        s.write_all(&util::framed(&[&b"#CHALLENGE#"[..], &ours].concat()))
            .unwrap();
        let theirs = util::read_n(&mut s, 4 + 8 + 32);
        assert_eq!(theirs[4 + 8..], util::hmac(Digest::Sha256, KEY, &ours));
        s.write_all(WELCOME).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    } else {
        assert_eq!(said, b"\x00\x00\x00\x09#FAILURE#");
    }
    assert_eq!(util::read_to_eof(&mut s).unwrap_or_default(), b"");
    verdict(t, handled, failures)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// What the parser rejects: random bytes are never a well-formed answer.
    #[test]
    fn arbitrary_handshake_bytes_never_reach_the_handler(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        splits in proptest::collection::vec(1usize..64, 0..6),
    ) {
        let _serial = util::serial();
        for target in [hmac_target(), mp_target()] {
            let before = target.handled.load(Ordering::SeqCst);
            feed(&target.addr, &bytes, &splits);
            prop_assert_eq!(target.handled.load(Ordering::SeqCst), before);
        }
    }

    /// What only the MAC check rejects: answers of the right length and form, in either case of
    /// hex or any digest a listener accepts, with one bit flipped, under another key, or random.
    /// The same answer made right, split the same way, does get through.
    #[test]
    fn well_formed_wrong_answers_never_reach_the_handler(
        wrong in wrong_answer(),
        upper in any::<bool>(),
        form in proptest::sample::select(MP_FORMS.to_vec()),
        splits in proptest::collection::vec(1usize..24, 0..4),
    ) {
        let _serial = util::serial();
        let (hmac, mp) = (hmac_target(), mp_target());
        prop_assert!(hmac_attempt(hmac, &Answer::Right, upper, &splits), "the right answer was refused");
        prop_assert!(!hmac_attempt(hmac, &wrong, upper, &splits), "a wrong answer got through");
        prop_assert!(mp_attempt(mp, &Answer::Right, form, &splits), "the right answer was refused");
        prop_assert!(!mp_attempt(mp, &wrong, form, &splits), "a wrong answer got through");
    }
}

/// Answers split across two reads at every byte, in thread and event mode: the right one
/// always gets through, a wrong one never. Cut at every byte (the client hanging up there):
/// refused at once and counted once as an authentication failure, in both modes.
#[test]
fn handshake_answers_split_or_cut_at_every_byte() {
    let _serial = util::serial();
    // HMAC-MD5 in hex; `{sha256}` and HMAC-SHA-256, framed.
    let (hex_len, frame_len) = (32, 4 + 8 + 32);
    for (hmac, mp) in [
        (hmac_target(), mp_target()),
        (hmac_event_target(), mp_event_target()),
    ] {
        let form = Some(Digest::Sha256);
        for at in 1..hex_len {
            assert!(
                hmac_attempt(hmac, &Answer::Right, false, &[at]),
                "split at {at}"
            );
            let wrong = Answer::FlipBit(at * 5);
            assert!(!hmac_attempt(hmac, &wrong, false, &[at]), "split at {at}");
        }
        for at in 1..frame_len {
            assert!(mp_attempt(mp, &Answer::Right, form, &[at]), "split at {at}");
            assert!(
                !mp_attempt(mp, &Answer::FlipBit(at * 3), form, &[at]),
                "split at {at}"
            );
        }
        for at in 0..hex_len {
            assert!(!cut_attempt(hmac, CHALLENGE_LEN, &|c| {
                hex::encode(Answer::Right.mac(Digest::Md5, c)).as_bytes()[..at].to_vec()
            }));
        }
        for at in 0..frame_len {
            assert!(!cut_attempt(mp, 4 + 11 + 8 + 40, &|frame| {
                let mac = Answer::Right.mac(Digest::Sha256, &frame[4 + 11..]);
                util::framed(&[&b"{sha256}"[..], &mac].concat())[..at].to_vec()
            }));
        }
    }
}

/// Reads the `challenge_len` bytes of `t`'s challenge, sends what `answer` makes of them and
/// hangs up; true if the handler ran. (A handshake left to time out would count as a timeout,
/// not a failure, and `verdict` would not see it: the end of the connection must be enough.)
fn cut_attempt(t: &Fuzzed, challenge_len: usize, answer: &dyn Fn(&[u8]) -> Vec<u8>) -> bool {
    let (handled, failures) = (
        t.handled.load(Ordering::SeqCst),
        t.handle.stats().auth_failures,
    );
    let mut s = connect(&t.addr);
    let challenge = util::read_n(&mut s, challenge_len);
    let _ = s.write_all(&answer(&challenge));
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = util::read_to_eof(&mut s);
    verdict(t, handled, failures)
}

#[test]
fn handshake_fuzz_figure() {
    let _serial = util::serial();
    // A summary line for the README figures: the property tests above assert; this reports.
    // Garbage exercises the parser; the well-formed wrong answers, the MAC check.
    let t = hmac_target();
    let before = t.handled.load(Ordering::SeqCst);
    let mut rng_bytes = 0u64;
    for i in 0..200u64 {
        let bytes: Vec<u8> = (0..(i % 97)).map(|j| (i * 7 + j * 13) as u8).collect();
        rng_bytes += bytes.len() as u64;
        feed(&t.addr, &bytes, &[(i % 5 + 1) as usize, 3]);
    }
    let garbage_reached = t.handled.load(Ordering::SeqCst) - before;
    // Every bit of the HMAC-MD5 flipped in turn, and another key.
    let mut hmac_wrong = 0;
    let mut wrong_reached = 0;
    for answer in (0..128)
        .map(Answer::FlipBit)
        .chain([Answer::OtherKey(b"another key".to_vec())])
    {
        hmac_wrong += 1;
        wrong_reached += usize::from(hmac_attempt(t, &answer, false, &[]));
    }
    // Every form a listener accepts: the first, a middle and the last bit flipped, another key.
    let mut mp_wrong = 0;
    for form in MP_FORMS {
        let bits = form.map_or(16, |d| d.output_len()) * 8;
        for answer in [0, bits / 2, bits - 1]
            .map(Answer::FlipBit)
            .into_iter()
            .chain([Answer::OtherKey(b"another key".to_vec())])
        {
            mp_wrong += 1;
            wrong_reached += usize::from(mp_attempt(mp_target(), &answer, form, &[]));
        }
    }
    println!(
        "handshake fuzz (deterministic sweep): 200 garbage handshakes, {rng_bytes} bytes, handler \
         reached {garbage_reached} times; {hmac_wrong} well-formed wrong HMAC answers and \
         {mp_wrong} wrong multiprocessing answers (bit flips, another key), handler reached \
         {wrong_reached} times"
    );
    assert_eq!(garbage_reached, 0);
    assert_eq!(wrong_reached, 0);
}

// CPython test_socketserver ports that count process-wide descriptors and threads.

#[test]
fn failing_binds_leak_no_descriptor() {
    let _serial = util::serial();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    // Warm up anything lazily opened (the logger, /proc), then count.
    let _ = TcpServer::builder(line_echo)
        .reuse_address(false)
        .bind(addr);
    let before = util::open_fds();
    for _ in 0..1024 {
        let e = TcpServer::builder(line_echo)
            .reuse_address(false)
            .bind(addr)
            .unwrap_err();
        assert!(e.is_bind(), "{e}");
        assert_eq!(e.addr().and_then(|a| a.inet()), Some(addr), "{e}");
    }
    assert!(
        util::open_fds() <= before,
        "descriptors leaked: {before} -> {}",
        util::open_fds()
    );
}

#[test]
fn finished_threads_are_reaped() {
    let _serial = util::serial();
    util::init_logs();
    let server = TcpServer::builder(line_echo)
        .dispatch(Dispatch::Thread)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let baseline = util::thread_count();
    for _ in 0..500 {
        let mut c = connect(&addr);
        c.write_all(b"x\n").unwrap();
        let mut l = String::new();
        BufReader::new(&c).read_line(&mut l).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || util::thread_count() <= baseline),
        "threads not reaped: {baseline} before, {} after",
        util::thread_count()
    );
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .stats()
        .active
        == 0));
}

/// Lines each call site of the library may log per second (`BURST` in `src/log_limit.rs`).
const LOG_LINES_PER_SITE_PER_SECOND: usize = 10;

#[test]
fn udp_log_flood_is_bounded_by_the_rate_limiter() {
    use socketserver::{DatagramHandler, DatagramRequest, UdpServer};
    // Three kinds of bad datagram, each logged by a call site of its own: too large for
    // max_packet_size (65,000 bytes, no key needed, source forgeable), asking for a reply over
    // the amplification guard, and failing the handler.
    struct Victim;
    impl DatagramHandler for Victim {
        fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult {
            match req.packet() {
                b"fail" => Err("handler failed on purpose".into()),
                p => {
                    req.wfile = p.repeat(4);
                    Ok(())
                }
            }
        }
    }
    const SITES: usize = 3;
    let _serial = util::serial();
    util::in_own_process("udp_log_flood_is_bounded_by_the_rate_limiter", || {
        let server = UdpServer::bind("127.0.0.1:0", || Victim).unwrap();
        let addr = server.local_addr().inet().unwrap();
        let running = serve(server);
        let blaster = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        blaster.connect(addr).unwrap();
        let big = vec![b'x'; 65_000];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(2) {
            for p in [&big[..], b"amplify", b"fail"] {
                // A full send buffer drops the datagram, like a network would.
                if blaster.send(p).is_ok() {
                    sent += 1;
                }
            }
        }
        let stats = running.stop().stats();
        let took = start.elapsed();
        let lines = util::captured_logs();
        let seconds = took.as_secs_f64();
        let summaries = lines
            .iter()
            .filter(|l| l.message.contains("more like this in the last second"))
            .count();
        println!(
            "UDP log flood: {sent} bad datagrams sent in {seconds:.1} s ({} oversized, {} replies \
             over the guard, {} handler errors served): {} log lines, {:.0} lines/s ({summaries} \
             of them summarising the lines held back); limit {} per call site per second",
            stats.oversized_datagrams,
            stats.amplification_dropped,
            stats.handler_errors,
            lines.len(),
            lines.len() as f64 / seconds,
            LOG_LINES_PER_SITE_PER_SECOND
        );
        assert!(
            stats.oversized_datagrams + stats.amplification_dropped > 1000,
            "{stats:?}"
        );
        // Every call site lets its burst through in each calendar second the flood touched.
        let bound = SITES * LOG_LINES_PER_SITE_PER_SECOND * (seconds.ceil() as usize + 1);
        assert!(
            lines.len() <= bound,
            "{} lines logged, bound {bound}",
            lines.len()
        );
        assert!(summaries > 0, "no line said how many were held back");
    });
}

#[test]
fn a_burst_of_closures_is_accounted_for_in_the_log_once_it_ends() {
    // 300 idle connections cut at once: ten lines get through, and a line of the call site's
    // own, within a second of the burst's end, says how many more there were.
    const CLIENTS: usize = 300;
    let _serial = util::serial();
    util::in_own_process(
        "a_burst_of_closures_is_accounted_for_in_the_log_once_it_ends",
        || {
            let server = TcpServer::builder(util::byte_echo)
                .idle_timeout(Some(Duration::from_millis(300)))
                .bind("127.0.0.1:0")
                .unwrap();
            let addr = server.local_addr().clone();
            let running = serve(server);
            let idle: Vec<TcpStream> = (0..CLIENTS).map(|_| util::connect(&addr)).collect();
            assert!(eventually(Duration::from_secs(10), || running
                .handle
                .stats()
                .idle_closed
                == CLIENTS as u64));
            let cut_at = Instant::now();
            let closures = |lines: &[util::LogLine]| -> (usize, u64, Option<Instant>) {
                let mut shown = 0;
                let mut more = 0;
                let mut summary_at = None;
                for l in lines
                    .iter()
                    .filter(|l| l.message.contains("(idle timeout)"))
                {
                    if let Some(i) = l.message.find(" more like this") {
                        let head = &l.message[..i];
                        let n: u64 = head[head.rfind('(').unwrap() + 1..].parse().unwrap();
                        more += n;
                        if l.message.starts_with('(') {
                            summary_at = Some(l.at);
                            continue; // a summary only
                        }
                    }
                    shown += 1;
                }
                (shown, more, summary_at)
            };
            assert!(
                eventually(Duration::from_secs(3), || {
                    let (shown, more, _) = closures(&util::captured_logs());
                    shown as u64 + more == CLIENTS as u64
                }),
                "the log does not account for every closure: {:?}",
                closures(&util::captured_logs())
            );
            let (shown, more, summary_at) = closures(&util::captured_logs());
            println!("{CLIENTS} idle closures: {shown} lines, and summaries of {more} more");
            assert!(shown <= 2 * LOG_LINES_PER_SITE_PER_SECOND, "{shown} lines");
            let summary_at = summary_at.expect("no summary line after the burst");
            assert!(
                summary_at.saturating_duration_since(cut_at) < Duration::from_secs(1),
                "the summary came {:?} after the burst",
                summary_at.saturating_duration_since(cut_at)
            );
            drop(idle);
            drop(running);
        },
    );
}

#[test]
fn mp_messages_held_half_sent_stay_within_the_in_flight_budget() {
    use socketserver::{MpBudget, MpConnection, mp_connect};
    // The figure, scaled down 8x with its ratios kept: 32 logged-in clients each send
    // 60 of a declared 64 MiB message (here 7.5 of 8 MiB) and stop, against a budget that
    // holds four such messages (256 MiB there, 32 MiB here).
    const MIB: usize = 1024 * 1024;
    const CLIENTS: usize = 32;
    const DECLARED: usize = 8 * MIB;
    const SENT: usize = DECLARED - DECLARED / 16;
    const BUDGET: usize = 32 * MIB;
    let _serial = util::serial();
    util::init_logs();
    let budget = MpBudget::new(BUDGET);
    let b = budget.clone();
    let server = TcpServer::builder(move || {
        let b = b.clone();
        handler_fn(move |req: &mut Request| {
            let mut conn = MpConnection::new(req.stream()).with_budget(b.clone());
            loop {
                let m = conn.recv_bytes()?;
                conn.send_bytes(&m)?;
            }
        })
    })
    .auth(Auth::multiprocessing(KEY))
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let mut wire = (DECLARED as u32).to_be_bytes().to_vec();
    wire.resize(4 + SENT, 0x5a);
    let wire = Arc::new(wire);
    let baseline = util::rss_kib("self");
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(util::rss_kib("self"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let wire = wire.clone();
            std::thread::spawn(move || {
                let conn = mp_connect(addr, KEY, Duration::from_secs(20)).unwrap();
                let mut s = conn.into_inner();
                // A refused client sees its connection closed mid-write.
                let _ = s.write_all(&wire);
                s
            })
        })
        .collect();
    let held: Vec<TcpStream> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    // The server has read what it will read: every connection is either refused or parked
    // mid-message with its part of the budget.
    assert!(eventually(Duration::from_secs(20), || {
        let refused = running.handle.stats().handler_errors as usize;
        budget.in_use() >= (CLIENTS - refused) * SENT
    }));
    std::thread::sleep(Duration::from_millis(200));
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let grew_mib = (peak.load(Ordering::Relaxed).saturating_sub(baseline)) as f64 / 1024.0;
    let refused = running.handle.stats().handler_errors;
    println!(
        "mp memory: {CLIENTS} connections each sending {:.1} of a declared {} MiB message: peak \
         RSS grew {grew_mib:.0} MiB (budget {} MiB, {:.0} MiB held at the end); {refused} \
         refused with is_too_large",
        SENT as f64 / MIB as f64,
        DECLARED / MIB,
        BUDGET / MIB,
        budget.in_use() as f64 / MIB as f64
    );
    // The budget, plus a margin for the thread stacks, allocator slack (the refused messages'
    // buffers, freed but kept by malloc) and the copy a Vec makes when it grows: 39 to 52 MiB
    // measured, against 250 MiB without the budget.
    assert!(
        grew_mib < (BUDGET / MIB) as f64 + 48.0,
        "peak RSS grew {grew_mib:.0} MiB with a {} MiB budget",
        BUDGET / MIB
    );
    assert!(budget.in_use() <= BUDGET);
    drop(held);
    assert!(eventually(Duration::from_secs(10), || budget.in_use() == 0));
}

/// Issue 11: with 8 pool workers, 8 connections that send nothing used to hold every worker for
/// as long as they stayed open. With the defaults (no idle timeout) the pressure policy frees
/// one for an honest client waiting in the backlog, once they have been idle a look of the
/// reaper (a second), and only one.
#[test]
fn silent_sockets_cannot_hold_the_pool() {
    let _serial = util::serial();
    util::init_logs();
    const WORKERS: usize = 8;
    let server = TcpServer::builder(util::byte_echo)
        .dispatch(Dispatch::Pool { workers: WORKERS })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let silent: Vec<TcpStream> = (0..WORKERS).map(|_| connect(&addr)).collect();
    assert!(eventually(Duration::from_secs(10), || {
        running.handle.stats().active == WORKERS as u64
    }));
    let t = Instant::now();
    let mut honest = connect(&addr);
    honest.write_all(b"honest").unwrap();
    let mut got = [0u8; 6];
    honest
        .read_exact(&mut got)
        .expect("honest client not served");
    let waited = t.elapsed();
    assert_eq!(&got, b"honest");
    let stats = running.handle.stats();
    println!(
        "{WORKERS} silent sockets against a pool of {WORKERS}: honest client served after \
         {waited:?}; {} idle connection(s) shed",
        stats.evicted
    );
    assert!(
        waited < Duration::from_millis(2500),
        "honest client waited {waited:?}"
    );
    assert_eq!((stats.evicted, stats.idle_closed), (1, 0));
    drop((silent, honest));
}

/// Issue 11: the README's line echo, fed one endless line, grew ~550 MB/s. Lines are now bounded
/// by `StreamOptions::max_line` (64 KiB): the server answers the endless line by closing the
/// connection, and its memory does not grow.
#[test]
fn an_endless_line_costs_no_memory() {
    let _serial = util::serial();
    util::init_logs();
    const LIMIT_KIB: u64 = 64 * 1024;
    let server = TcpServer::builder(line_echo)
        .handle_error(|_, _| {}) // the "line too long" error is the point, not news
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let start_rss = util::rss_kib("self");
    let mut c = connect(&addr);
    let chunk = vec![b'x'; 64 * 1024];
    let t = Instant::now();
    let mut sent = 0u64;
    let mut peak_growth = 0;
    // Never a newline: send until the server hangs up, memory grows past the limit, or 10 s.
    while t.elapsed() < Duration::from_secs(10) && peak_growth < LIMIT_KIB {
        match c.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(_) => break,
        }
        peak_growth = peak_growth.max(util::rss_kib("self").saturating_sub(start_rss));
    }
    let took = t.elapsed();
    let cut = c.write(&chunk).is_err() || util::read_to_eof(&mut c).is_ok_and(|r| r.is_empty());
    println!(
        "endless line: {} KiB sent in {took:?}, then the connection was closed: {cut}; RSS grew \
         {peak_growth} KiB at most (limit {LIMIT_KIB} KiB)",
        sent / 1024
    );
    assert!(peak_growth < LIMIT_KIB, "RSS grew {peak_growth} KiB");
    assert!(cut, "the connection is still open after {took:?}");
    assert!(took < Duration::from_secs(5), "cut only after {took:?}");
    drop(running);
}

#[test]
fn the_listener_refuses_new_clients_during_a_drain() {
    let _serial = util::serial();
    const TRIES: usize = 200;
    let server = TcpServer::builder(util::byte_echo)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    // One keep-alive client in flight keeps the drain open for as long as it stays.
    let mut held = connect(&Addr::Inet(addr));
    held.write_all(b"x").unwrap();
    held.read_exact(&mut [0u8; 1]).unwrap();
    let h = running.handle.clone();
    let drain = std::thread::spawn(move || h.shutdown_graceful(Duration::from_secs(30)));
    assert!(eventually(Duration::from_secs(5), || running
        .handle
        .is_draining()));
    let mut refused = 0;
    let mut worst = Duration::ZERO;
    for _ in 0..TRIES {
        let t = Instant::now();
        let r = TcpStream::connect_timeout(&addr, Duration::from_secs(5));
        worst = worst.max(t.elapsed());
        if r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            refused += 1;
        }
    }
    drop(held);
    let report = drain.join().unwrap();
    println!(
        "listener during a drain: {refused}/{TRIES} new connects refused (ECONNREFUSED), worst \
         {worst:?}; the client in flight finished ({report:?})"
    );
    assert_eq!(refused, TRIES, "a connect during a drain was not refused");
    // Loopback refuses within microseconds; the bound only keeps a margin for a loaded machine.
    assert!(
        worst < Duration::from_millis(500),
        "worst refusal {worst:?}"
    );
    assert_eq!((report.finished, report.cut), (1, 0));
    drop(running);
}

/// An authenticated echo like [`honest_request`], from a client that takes `rtt` to answer
/// the challenge, as one across a network would.
fn slow_honest_request(addr: &Addr, rtt: Duration) -> Result<(), socketserver::Error> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    std::thread::sleep(rtt);
    socketserver::answer_challenge(&mut s, KEY, Digest::Sha256)?;
    s.write_all(b"honest request")?;
    let mut got = [0u8; 14];
    s.read_exact(&mut got)?;
    assert_eq!(&got, b"honest request");
    Ok(())
}

/// Silent connection attempts from `threads` threads as fast as they go, each kept open (silent)
/// until `held` newer ones have been made; counts the attempts until `stop`.
fn flood(
    addr: std::net::SocketAddr,
    threads: usize,
    held: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..threads)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut ring = std::collections::VecDeque::with_capacity(held);
                let mut attempts = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(s) = TcpStream::connect(addr) {
                        if ring.len() == held {
                            ring.pop_front();
                        }
                        ring.push_back(s);
                    }
                    attempts += 1;
                }
                attempts
            })
        })
        .collect()
}

#[test]
fn honest_clients_get_through_a_connection_flood_in_pool_mode() {
    let _serial = util::serial();
    util::init_logs();
    const TRIES: usize = 40;
    // The examples' default pool, and a larger one; the default handshake cap and timeout. Four
    // threads connect as fast as they can and keep 2000 connections each open and silent.
    for workers in [8, 16] {
        let server = TcpServer::builder(util::byte_echo)
            .dispatch(Dispatch::Pool { workers })
            .auth(Auth::hmac(KEY))
            .bind("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr().clone();
        let running = serve(server);
        let stop = Arc::new(AtomicBool::new(false));
        let t = Instant::now();
        let flooders = flood(addr.inet().unwrap(), 4, 2000, &stop);
        std::thread::sleep(Duration::from_millis(200)); // the flood is at full rate
        let mut through = 0;
        let mut failures = Vec::new();
        for _ in 0..TRIES {
            // A client 1 ms away, as across a city; on loopback the server's own scheduling
            // under the flood is the round trip.
            match slow_honest_request(&addr, Duration::from_millis(1)) {
                Ok(_) => through += 1,
                Err(e) => failures.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let attempts: u64 = flooders.into_iter().map(|f| f.join().unwrap()).sum();
        let rate = attempts as f64 / t.elapsed().as_secs_f64();
        let stats = running.handle.stats();
        println!(
            "connection flood, pool of {workers}, default handshake cap: {rate:.0} silent \
             connection attempts/s; honest clients through {through}/{TRIES}; {} handshakes cut",
            stats.handshake_evictions
        );
        drop(running);
        // Measured 40/40 in ten rounds out of ten (26-40/40 with the former fixed cap of half
        // the pool); the margin is for a loaded machine.
        assert!(
            through >= TRIES - 4,
            "pool of {workers}: only {through}/{TRIES} honest clients got through the flood: \
             {failures:?}"
        );
    }
}
