//! Metrics: known traffic through two servers, then their Prometheus exposition parsed by the
//! reference parser (Python's `prometheus_client`), every family and value checked; and the
//! `/metrics` endpoint of the examples fetched by a real HTTP client (`curl`).

mod util;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socketserver::{
    AdmissionFailure, Auth, Digest, Dispatch, Handler, HandlerResult, Request, Stats, TcpServer,
    render_prometheus,
};
use util::{PromSample, eventually, serve};

const KEY: &[u8] = b"metrics-key";
/// How long each handler of server A takes at least, so its durations land above 50 ms.
const HOLD: Duration = Duration::from_millis(60);

/// Echoes after holding the connection for [`HOLD`].
struct SlowEcho;

impl Handler for SlowEcho {
    fn setup(&mut self, _: &mut Request) -> HandlerResult {
        std::thread::sleep(HOLD);
        Ok(())
    }

    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        let mut buf = [0u8; 4096];
        loop {
            let n = req.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            req.write_all(&buf[..n])?;
        }
    }
}

/// A TCP connection from the loopback address `from` (127.0.0.x) to `to`.
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&local.into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// Whether the server closed `s` (end of file or reset) within its read timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Server A's traffic: 3 authenticated echo connections of 100 bytes each, 2 wrong answers,
/// 1 handshake cut under the cap, 1 handshake timed out, 1 refused by verify_request.
fn traffic_a() -> Stats {
    let refuse = Arc::new(AtomicBool::new(false));
    let r = refuse.clone();
    let server = TcpServer::builder(|| SlowEcho)
        .dispatch(Dispatch::Pool { workers: 4 })
        .auth(Auth::hmac(KEY.to_vec()).digest(Digest::Sha256))
        .handshake_timeout(Duration::from_millis(400))
        .max_pending_handshakes(1)
        .verify_request(move |_| !r.load(Ordering::SeqCst))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let h = running.handle.clone();

    for i in 0..3u8 {
        let mut s =
            socketserver::connect_with_auth(addr, KEY, Digest::Sha256, Duration::from_secs(10))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        round_trip(&mut s, &[b'a' + i; 100]);
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(closed_by_server(&mut s));
    }
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.1", addr);
        let mut challenge = [0u8; socketserver::CHALLENGE_LEN];
        s.read_exact(&mut challenge).unwrap();
        s.write_all(&[b'0'; 64]).unwrap();
        assert!(closed_by_server(&mut s), "a wrong answer was let through");
    }
    // Two silent clients under a cap of one unfinished handshake: the second cuts the first,
    // then times out itself.
    let mut first = connect_from("127.0.0.1", addr);
    let mut c = [0u8; socketserver::CHALLENGE_LEN];
    first.read_exact(&mut c).unwrap();
    let mut second = connect_from("127.0.0.1", addr);
    assert!(
        closed_by_server(&mut first),
        "the older handshake was not cut"
    );
    assert!(
        closed_by_server(&mut second),
        "the silent handshake did not time out"
    );
    refuse.store(true, Ordering::SeqCst);
    let mut refused = connect_from("127.0.0.1", addr);
    assert!(closed_by_server(&mut refused));
    assert!(
        eventually(Duration::from_secs(10), || {
            let s = h.stats();
            s.active == 0 && s.accepted == 8 && s.request_duration.count() == 3
        }),
        "server A's traffic did not settle: {:?}",
        h.stats()
    );
    drop(running);
    h.stats()
}

/// Server B's traffic (no activity limits): at most 2 connections (excess refused) and 1 per
/// address; one
/// connection from 127.0.0.1 and one from 127.0.0.2 held with a 10-byte round trip each, a
/// second from 127.0.0.1 refused by the per-source cap, one from 127.0.0.3 by the limit.
fn traffic_b() -> Stats {
    // No idle timeout or minimum rate: the Stream counts bytes without the reaper's activity
    // counters (server A counts them there).
    let server = TcpServer::builder(util::byte_echo)
        .idle_timeout(None)
        .min_data_rate(None)
        .max_connections(2)
        .reject_when_full(true)
        .max_per_source(1)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let h = running.handle.clone();
    let mut one = connect_from("127.0.0.1", addr);
    round_trip(&mut one, b"0123456789");
    let mut again = connect_from("127.0.0.1", addr);
    assert!(closed_by_server(&mut again), "per-source cap not applied");
    let mut two = connect_from("127.0.0.2", addr);
    round_trip(&mut two, b"abcdefghij");
    let mut three = connect_from("127.0.0.3", addr);
    assert!(closed_by_server(&mut three), "connection limit not applied");
    let during = h.stats();
    assert_eq!(during.active, 2);
    drop((one, two));
    assert!(
        eventually(Duration::from_secs(10), || h.stats().active == 0),
        "connections never closed"
    );
    drop(running);
    h.stats()
}

/// Every sample the exposition of one server must hold, with its value (durations: only the
/// buckets and count; `_sum` is checked apart).
fn expected(
    server: &str,
    s: &Stats,
    exact: &[(&str, &str, f64)],
) -> BTreeMap<(String, String), f64> {
    let mut m = BTreeMap::new();
    for (name, extra, v) in exact {
        let labels = if extra.is_empty() {
            format!("server={server}")
        } else {
            // Sorted by key: `reason` < `server`.
            format!("{extra},server={server}")
        };
        m.insert((name.to_string(), labels), *v);
    }
    let h = &s.request_duration;
    for (bound, n) in h.cumulative() {
        let le = if bound == Duration::MAX {
            "+Inf".to_owned()
        } else {
            bound.as_secs_f64().to_string()
        };
        m.insert(
            (
                "socketserver_request_duration_seconds_bucket".into(),
                format!("le={le},server={server}"),
            ),
            n as f64,
        );
    }
    m.insert(
        (
            "socketserver_request_duration_seconds_count".into(),
            format!("server={server}"),
        ),
        h.count() as f64,
    );
    m
}

fn counters(
    accepted: f64,
    rejected: [f64; 8],
    auth: f64,
    bytes: f64,
) -> Vec<(&'static str, &'static str, f64)> {
    let reasons = [
        "reason=verify",
        "reason=limit",
        "reason=per_source",
        "reason=proxy",
        "reason=tls",
        "reason=hmac",
        "reason=timeout",
        "reason=cap",
    ];
    let mut v = vec![
        ("socketserver_connections_accepted_total", "", accepted),
        ("socketserver_connections_active", "", 0.0),
        ("socketserver_auth_failures_total", "", auth),
        ("socketserver_bytes_read_total", "", bytes),
        ("socketserver_bytes_written_total", "", bytes),
        ("socketserver_connections_closed_total", "reason=idle", 0.0),
        ("socketserver_connections_closed_total", "reason=slow", 0.0),
        (
            "socketserver_connections_closed_total",
            "reason=pressure",
            0.0,
        ),
        ("socketserver_handler_errors_total", "", 0.0),
        ("socketserver_handler_panics_total", "", 0.0),
        ("socketserver_handler_timeouts_total", "", 0.0),
        ("socketserver_accept_errors_total", "", 0.0),
        (
            "socketserver_datagrams_dropped_total",
            "reason=oversized",
            0.0,
        ),
        (
            "socketserver_datagrams_dropped_total",
            "reason=amplification",
            0.0,
        ),
    ];
    for (r, n) in reasons.iter().zip(rejected) {
        v.push(("socketserver_connections_rejected_total", r, n));
    }
    v
}

#[test]
fn the_exposition_of_two_servers_parses_and_counts_the_traffic() {
    util::init_logs();
    let a = traffic_a();
    let b = traffic_b();

    // The Stats themselves first.
    assert_eq!((a.accepted, a.rejected, a.auth_failures), (8, 1, 2));
    assert_eq!(a.admission_failures(AdmissionFailure::Hmac), 2);
    assert_eq!(a.admission_failures(AdmissionFailure::Cap), 1);
    assert_eq!(a.admission_failures(AdmissionFailure::Timeout), 1);
    assert_eq!((a.handshake_evictions, a.handshake_timeouts), (1, 1));
    assert_eq!((a.bytes_read, a.bytes_written), (300, 300));
    assert_eq!(a.request_duration.count(), 3);
    let under_hold: Vec<u64> = a
        .request_duration
        .cumulative()
        .filter(|(b, _)| *b < HOLD)
        .map(|(_, n)| n)
        .collect();
    assert!(
        under_hold.iter().all(|&n| n == 0),
        "a request that took {HOLD:?} counted under it: {:?}",
        a.request_duration
    );
    assert!(a.request_duration.sum() >= HOLD * 3);
    assert_eq!(
        (b.accepted, b.limit_rejected, b.per_source_rejected),
        (4, 1, 1)
    );
    assert_eq!((b.bytes_read, b.bytes_written), (20, 20));
    assert_eq!(b.request_duration.count(), 2);

    let page = render_prometheus(&[("a", &a), ("b \"quoted\"", &b)]);
    let Some(python) = util::python_with_prometheus_client() else {
        return;
    };
    let samples = util::parse_prometheus(&python, &page);

    // Families: each once, of the right type.
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    for s in &samples {
        if let Some(kind) = families.insert(s.family.clone(), s.kind.clone()) {
            assert_eq!(kind, s.kind, "family {} changed type", s.family);
        }
    }
    let want: BTreeMap<String, String> = [
        ("socketserver_connections_accepted", "counter"),
        ("socketserver_connections_active", "gauge"),
        ("socketserver_connections_rejected", "counter"),
        ("socketserver_auth_failures", "counter"),
        ("socketserver_bytes_read", "counter"),
        ("socketserver_bytes_written", "counter"),
        ("socketserver_connections_closed", "counter"),
        ("socketserver_handler_errors", "counter"),
        ("socketserver_handler_panics", "counter"),
        ("socketserver_handler_timeouts", "counter"),
        ("socketserver_accept_errors", "counter"),
        ("socketserver_datagrams_dropped", "counter"),
        ("socketserver_request_duration_seconds", "histogram"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(families, want);

    // Every sample, with its value.
    let mut want = expected(
        "a",
        &a,
        &counters(8.0, [1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 1.0, 1.0], 2.0, 300.0),
    );
    want.extend(expected(
        "b \"quoted\"",
        &b,
        &counters(4.0, [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], 0.0, 20.0),
    ));
    let sums: Vec<&PromSample> = samples
        .iter()
        .filter(|s| s.name.ends_with("_sum"))
        .collect();
    let got: BTreeMap<(String, String), f64> = samples
        .iter()
        .filter(|s| !s.name.ends_with("_sum"))
        .map(|s| ((s.name.clone(), s.labels.clone()), s.value))
        .collect();
    assert_eq!(got, want);
    // Independently of how Stats computes them: buckets are cumulative (never decreasing in
    // `le`), the `+Inf` one is the count, and every request of A took at most 5 minutes.
    for (server, count) in [("server=a", 3.0), ("server=b \"quoted\"", 2.0)] {
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| {
                s.name == "socketserver_request_duration_seconds_bucket"
                    && s.labels.ends_with(server)
            })
            .map(|s| {
                let le = s
                    .labels
                    .trim_start_matches("le=")
                    .split(',')
                    .next()
                    .unwrap();
                (le.parse::<f64>().unwrap(), s.value)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(buckets.len(), 20, "{server}");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{server}: {buckets:?}"
        );
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count), "{server}");
        let count_sample = samples
            .iter()
            .find(|s| s.name == "socketserver_request_duration_seconds_count" && s.labels == server)
            .unwrap();
        assert_eq!(count_sample.value, count);
    }
    assert_eq!(
        got[&(
            "socketserver_request_duration_seconds_bucket".to_owned(),
            "le=300,server=a".to_owned()
        )],
        3.0
    );
    // The +Inf bucket of a histogram is its count (checked above through the cumulative
    // buckets); its sum is the durations' total, in seconds.
    assert_eq!(sums.len(), 2);
    for (s, stats) in sums.iter().zip([&a, &b]) {
        let want = stats.request_duration.sum().as_secs_f64();
        assert!((s.value - want).abs() < 1e-6, "{s:?}, want {want}");
    }
    assert!(sums[0].value >= (HOLD * 3).as_secs_f64());
}

#[test]
fn server_handle_prometheus_labels_the_server_by_its_address() {
    let server = TcpServer::bind("127.0.0.1:0", util::byte_echo).unwrap();
    let addr = server.local_addr().clone();
    let running = serve(server);
    let mut s = util::connect(&addr);
    round_trip(&mut s, b"ping");
    drop(s);
    let h = running.handle.clone();
    assert!(eventually(Duration::from_secs(10), || h.stats().active == 0));
    let page = h.prometheus();
    assert!(
        page.contains(&format!(
            "socketserver_connections_accepted_total{{server=\"{addr}\"}} 1\n"
        )),
        "{page}"
    );
    assert!(page.contains(&format!(
        "socketserver_bytes_read_total{{server=\"{addr}\"}} 4\n"
    )));
}

/// An example server started with `--metrics-addr`; killed and reaped when dropped.
struct Example(Child);

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `curl` against `url`: the status line and headers (`-i`) and the body.
fn curl(url: &str, extra: &[&str]) -> Option<String> {
    let out = match Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) if util::is_ci() => panic!("curl is required when CI is set: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: cannot run curl ({e})");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `examples/NAME` with `--metrics-addr`, and waits
/// until it serves.
fn start_example(name: &str) -> (Example, SocketAddr, SocketAddr) {
    let exe = util::example_exe(name);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(exe)
        .args([
            "--addr",
            &addr.to_string(),
            "--metrics-addr",
            &metrics.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let child = Example(child);
    // The endpoint starts once the server is bound; probing the server itself would count a
    // connection.
    assert!(
        eventually(Duration::from_secs(20), || TcpStream::connect(metrics)
            .is_ok()),
        "{name} did not start"
    );
    (child, addr, metrics)
}

#[test]
fn curl_fetches_metrics_from_the_examples() {
    for name in ["echo_server", "kv_server"] {
        let (_child, addr, metrics) = start_example(name);
        // Known traffic: one connection, one round trip.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (msg, reply): (&[u8], &[u8]) = if name == "kv_server" {
            (b"SET k v\n", b"OK\n")
        } else {
            (b"hello\n", b"hello\n")
        };
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; reply.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, reply);
        drop(s);

        let url = format!("http://{metrics}/metrics");
        let want = format!(
            "socketserver_bytes_read_total{{server=\"{addr}\"}} {}",
            msg.len()
        );
        let mut last = String::new();
        let found = eventually(Duration::from_secs(10), || {
            last = curl(&url, &[]).unwrap_or_default();
            last.is_empty() || last.contains(&want)
        });
        if last.is_empty() {
            return; // curl missing, outside CI
        }
        assert!(found, "{name}: {want:?} not in\n{last}");
        let (head, body) = last.split_once("\r\n\r\n").expect("a header block");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        let head_lc = head.to_ascii_lowercase();
        assert!(
            head_lc.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{head}"
        );
        assert!(
            head_lc.contains(&format!("content-length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(head_lc.contains("connection: close"), "{head}");
        assert!(body.contains(&format!(
            "socketserver_connections_accepted_total{{server=\"{addr}\"}} 1\n"
        )));
        if let Some(python) = util::python_with_prometheus_client() {
            let samples = util::parse_prometheus(&python, body);
            assert!(
                samples
                    .iter()
                    .any(|s| s.name == "socketserver_bytes_written_total"
                        && s.value == reply.len() as f64)
            );
        }

        let other = curl(&format!("http://{metrics}/"), &[]).unwrap();
        assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
        let post = curl(&url, &["-X", "POST"]).unwrap();
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    }
}

#[test]
fn the_endpoint_refuses_an_oversized_request_head() {
    let endpoint = socketserver::metrics_http::bind("127.0.0.1:0", || "x 1\n".into()).unwrap();
    let addr = endpoint.local_addr().clone();
    let _running = serve(endpoint);
    let mut s = util::connect(&addr);
    let mut head = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    head.resize(socketserver::metrics_http::MAX_REQUEST + 100, b'a');
    // The server may answer and close before reading it all.
    let _ = s.write_all(&head);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
}

#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[test]
fn event_mode_records_a_duration_per_message_and_thread_mode_per_connection() {
    use util::{InMode, Mode};
    for (mode, requests) in [(Mode::Event(2), 3), (Mode::Thread, 1)] {
        let server = TcpServer::builder(util::line_echo)
            .mode(mode)
            .bind("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr().clone();
        let running = serve(server);
        let mut s = util::connect(&addr);
        for line in [&b"one\n"[..], b"two\n", b"three\n"] {
            round_trip(&mut s, line);
        }
        drop(s);
        let h = running.handle.clone();
        assert!(
            eventually(Duration::from_secs(10), || h.stats().active == 0),
            "{mode:?}: the connection never closed"
        );
        drop(running);
        let stats = h.stats();
        assert_eq!(stats.request_duration.count(), requests, "{mode:?}");
        assert_eq!(
            (stats.bytes_read, stats.bytes_written),
            (14, 14),
            "{mode:?}"
        );
    }
}

/// An echo server behind a trusted proxy on 127.0.0.1, with one connection per client the
/// header names, and `verify_request` refusing the client 192.0.2.99:4000.
#[cfg(feature = "proxy-protocol")]
fn behind_a_proxy() -> socketserver::Builder<socketserver::transport::Tcp<util::ByteEcho>> {
    TcpServer::builder(util::byte_echo)
        .proxy_protocol(
            socketserver::ProxyProtocol::new()
                .trust(socketserver::Cidr::new("127.0.0.1".parse().unwrap(), 32).unwrap()),
        )
        .max_per_source(1)
        .verify_request(|client| client.to_string() != "192.0.2.99:4000")
}

/// Behind PROXY headers, a client the header names is refused by `max_per_source` or
/// `verify_request` after admission has begun: it is counted once, under that reason, in
/// `Stats` and on the page, and not a second time as a PROXY failure.
#[cfg(feature = "proxy-protocol")]
#[test]
fn a_client_refused_behind_a_proxy_header_is_counted_once_under_its_reason() {
    util::init_logs();
    let server = behind_a_proxy().bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let h = running.handle.clone();
    let header = |src: &str| format!("PROXY TCP4 {src} 127.0.0.1 4000 80\r\n");
    let mut held = connect_from("127.0.0.1", addr);
    held.write_all(header("192.0.2.7").as_bytes()).unwrap();
    round_trip(&mut held, b"held");
    let mut again = connect_from("127.0.0.1", addr);
    again.write_all(header("192.0.2.7").as_bytes()).unwrap();
    assert!(closed_by_server(&mut again), "per-source cap not applied");
    let mut unwanted = connect_from("127.0.0.1", addr);
    unwanted.write_all(header("192.0.2.99").as_bytes()).unwrap();
    assert!(
        closed_by_server(&mut unwanted),
        "verify_request not applied"
    );
    assert!(eventually(Duration::from_secs(5), || h.stats().active == 1));
    let s = h.stats();
    assert_eq!(
        (
            s.per_source_rejected,
            s.rejected,
            s.admission_failures(AdmissionFailure::Proxy)
        ),
        (1, 1, 0),
        "{s:?}"
    );
    let page = h.prometheus();
    for (reason, n) in [("per_source", 1), ("verify", 1), ("proxy", 0)] {
        let line = "socketserver_connections_rejected_total{server=";
        let found = page
            .lines()
            .find(|l| l.starts_with(line) && l.contains(&format!("reason=\"{reason}\"")))
            .unwrap_or_else(|| panic!("no {reason} line in:\n{page}"));
        assert!(found.ends_with(&format!(" {n}")), "{found}");
    }
    drop(held);
    drop(running);
}

/// The value of the sample of `family` whose labels include `reason="{reason}"` (any reason
/// when `None`) on one server's page.
#[cfg(feature = "proxy-protocol")]
fn sample(page: &str, family: &str, reason: Option<&str>) -> u64 {
    let line = page
        .lines()
        .find(|l| {
            l.starts_with(&format!("{family}{{"))
                && reason.is_none_or(|r| l.contains(&format!("reason=\"{r}\"")))
        })
        .unwrap_or_else(|| panic!("no {family} {reason:?} line in:\n{page}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A scripted mix of connections against one server with every kind of refusal it has before
/// the handler (PROXY header, `verify_request` and `max_per_source` on the client it names,
/// HMAC, the handshake deadline), in thread and event mode: each connection is counted once,
/// under one reason, and `Stats` and the Prometheus page agree on every count.
#[cfg(feature = "proxy-protocol")]
#[test]
fn each_connection_is_counted_once_under_one_reason_in_stats_and_on_the_page() {
    use util::{InMode, Mode};
    util::init_logs();
    let modes: &[Mode] = if cfg!(all(target_os = "linux", not(socketserver_portable))) {
        &[Mode::Thread, Mode::Event(2)]
    } else {
        &[Mode::Thread]
    };
    for &mode in modes {
        let server = behind_a_proxy()
            .mode(mode)
            .auth(Auth::hmac(KEY.to_vec()).digest(Digest::Sha256))
            .handshake_timeout(Duration::from_millis(500))
            .bind("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr().inet().unwrap();
        let running = serve(server);
        let h = running.handle.clone();
        let header = |src: &str| format!("PROXY TCP4 {src} 127.0.0.1 4000 80\r\n");
        // A client behind the proxy: its header, then the challenge; `answer` it right or not.
        let through = |src: &str| {
            let mut s = connect_from("127.0.0.1", addr);
            s.write_all(header(src).as_bytes()).unwrap();
            s
        };
        let challenge = |s: &mut TcpStream| {
            let mut c = [0u8; socketserver::CHALLENGE_LEN];
            s.read_exact(&mut c).unwrap();
            c
        };

        // 1. Admitted, and held open: its client is at `max_per_source`.
        let mut held = through("192.0.2.7");
        let c = challenge(&mut held);
        held.write_all(hex::encode(util::hmac(Digest::Sha256, KEY, &c)).as_bytes())
            .unwrap();
        round_trip(&mut held, b"held");
        // 2. The same client again: refused by the per-source cap.
        let mut again = through("192.0.2.7");
        assert!(closed_by_server(&mut again), "{mode:?}: per-source cap");
        // 3. A client `verify_request` refuses.
        let mut unwanted = through("192.0.2.99");
        assert!(closed_by_server(&mut unwanted), "{mode:?}: verify_request");
        // 4. A wrong HMAC answer.
        let mut wrong = through("192.0.2.8");
        challenge(&mut wrong);
        wrong.write_all(&[b'0'; 64]).unwrap();
        assert!(closed_by_server(&mut wrong), "{mode:?}: a wrong answer");
        // 5. No answer at all: the handshake deadline.
        let mut silent = through("192.0.2.9");
        challenge(&mut silent);
        assert!(closed_by_server(&mut silent), "{mode:?}: the deadline");
        // 6. A malformed PROXY header, and 7. a peer that is no trusted proxy.
        let mut garbled = connect_from("127.0.0.1", addr);
        garbled.write_all(b"PROXY GARBAGE\r\n").unwrap();
        assert!(closed_by_server(&mut garbled), "{mode:?}: a bad header");
        let mut stranger = connect_from("127.0.0.2", addr);
        stranger.write_all(header("192.0.2.10").as_bytes()).unwrap();
        assert!(closed_by_server(&mut stranger), "{mode:?}: untrusted");

        assert!(
            eventually(Duration::from_secs(10), || {
                let s = h.stats();
                s.accepted == 7 && s.active == 1
            }),
            "{mode:?}: {:?}",
            h.stats()
        );
        let s = h.stats();
        let by_reason = [
            ("verify", s.rejected),
            ("limit", s.limit_rejected),
            ("per_source", s.per_source_rejected),
            ("proxy", s.admission_failures(AdmissionFailure::Proxy)),
            ("tls", s.admission_failures(AdmissionFailure::Tls)),
            ("hmac", s.admission_failures(AdmissionFailure::Hmac)),
            ("timeout", s.admission_failures(AdmissionFailure::Timeout)),
            ("cap", s.admission_failures(AdmissionFailure::Cap)),
        ];
        assert_eq!(
            by_reason,
            [
                ("verify", 1),
                ("limit", 0),
                ("per_source", 1),
                ("proxy", 2),
                ("tls", 0),
                ("hmac", 1),
                ("timeout", 1),
                ("cap", 0),
            ],
            "{mode:?}: {s:?}"
        );
        // Once each: the one admitted and the six refused are the seven accepted.
        let refused: u64 = by_reason.iter().map(|(_, n)| n).sum();
        assert_eq!(s.accepted, refused + s.active, "{mode:?}: {s:?}");
        // The named totals are those reasons' counts, and the PROXY details add up to its.
        assert_eq!(
            (s.auth_failures, s.handshake_timeouts, s.handshake_evictions),
            (1, 1, 0),
            "{mode:?}: {s:?}"
        );
        assert_eq!(
            [
                s.proxy_untrusted,
                s.proxy_missing,
                s.proxy_malformed,
                s.proxy_oversized,
                s.proxy_timeouts
            ],
            [1, 0, 1, 0, 0],
            "{mode:?}: {s:?}"
        );
        // The page says the same, sample by sample.
        let page = h.prometheus();
        const REJECTED: &str = "socketserver_connections_rejected_total";
        for (reason, n) in by_reason {
            assert_eq!(
                sample(&page, REJECTED, Some(reason)),
                n,
                "{mode:?} {reason}"
            );
        }
        assert_eq!(
            sample(&page, "socketserver_connections_accepted_total", None),
            s.accepted
        );
        assert_eq!(
            sample(&page, "socketserver_auth_failures_total", None),
            s.auth_failures
        );
        assert_eq!(sample(&page, "socketserver_connections_active", None), 1);
        drop(held);
        assert!(
            eventually(Duration::from_secs(10), || h.stats().active == 0),
            "{mode:?}: the held connection never closed"
        );
        assert_eq!(h.stats().accepted, 7, "{mode:?}: counted again on close");
        drop(running);
    }
}
