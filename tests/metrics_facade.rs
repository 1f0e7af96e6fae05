//! Feature `metrics`: the counters mirrored through the `metrics` facade, read back through a
//! recorder of the test's own, and compared with the server's `Stats` after known traffic.

mod util;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use socketserver::{Auth, Digest, Dispatch, TcpServer};
use util::{eventually, serve};

/// Values by metric name and labels (`k=v,k=v`, sorted).
#[derive(Default)]
struct Values {
    counters: BTreeMap<(String, String), u64>,
    gauges: BTreeMap<(String, String), f64>,
    histograms: BTreeMap<(String, String), Vec<f64>>,
    described: Vec<String>,
}

type Shared = Arc<Mutex<Values>>;

fn id(key: &Key) -> (String, String) {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    (key.name().to_owned(), labels.join(","))
}

struct Handle(Shared, (String, String));

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        *self
            .0
            .lock()
            .unwrap()
            .counters
            .entry(self.1.clone())
            .or_default() += value;
    }
    fn absolute(&self, value: u64) {
        self.0
            .lock()
            .unwrap()
            .counters
            .insert(self.1.clone(), value);
    }
}

impl GaugeFn for Handle {
    fn increment(&self, value: f64) {
        *self
            .0
            .lock()
            .unwrap()
            .gauges
            .entry(self.1.clone())
            .or_default() += value;
    }
    fn decrement(&self, value: f64) {
        *self
            .0
            .lock()
            .unwrap()
            .gauges
            .entry(self.1.clone())
            .or_default() -= value;
    }
    fn set(&self, value: f64) {
        self.0.lock().unwrap().gauges.insert(self.1.clone(), value);
    }
}

impl HistogramFn for Handle {
    fn record(&self, value: f64) {
        self.0
            .lock()
            .unwrap()
            .histograms
            .entry(self.1.clone())
            .or_default()
            .push(value);
    }
}

struct TestRecorder(Shared);

impl Recorder for TestRecorder {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.0
            .lock()
            .unwrap()
            .described
            .push(key.as_str().to_owned());
    }
    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.0
            .lock()
            .unwrap()
            .described
            .push(key.as_str().to_owned());
    }
    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.0
            .lock()
            .unwrap()
            .described
            .push(key.as_str().to_owned());
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(Handle(self.0.clone(), id(key))))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::new(Handle(self.0.clone(), id(key))))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Arc::new(Handle(self.0.clone(), id(key))))
    }
}

fn recorder() -> Shared {
    static VALUES: OnceLock<Shared> = OnceLock::new();
    VALUES
        .get_or_init(|| {
            let v = Shared::default();
            metrics::set_global_recorder(TestRecorder(v.clone())).ok();
            v
        })
        .clone()
}

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

#[test]
fn the_facade_mirrors_the_stats_under_the_documented_names() {
    let values = recorder();
    let key = b"facade-key";
    let refuse = Arc::new(AtomicBool::new(false));
    let r = refuse.clone();
    let server = TcpServer::builder(util::byte_echo)
        .dispatch(Dispatch::Pool { workers: 2 })
        .auth(Auth::hmac(key.to_vec()).digest(Digest::Sha256))
        .verify_request(move |_| !r.load(Ordering::SeqCst))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let h = running.handle.clone();

    for _ in 0..2 {
        let mut s =
            socketserver::connect_with_auth(addr, key, Digest::Sha256, Duration::from_secs(10))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"0123456789").unwrap();
        s.read_exact(&mut [0u8; 10]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(closed_by_server(&mut s));
    }
    let mut bad = TcpStream::connect(addr).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.read_exact(&mut [0u8; socketserver::CHALLENGE_LEN])
        .unwrap();
    bad.write_all(&[b'0'; 64]).unwrap();
    assert!(closed_by_server(&mut bad));
    refuse.store(true, Ordering::SeqCst);
    let mut refused = TcpStream::connect(addr).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(closed_by_server(&mut refused));
    assert!(eventually(Duration::from_secs(10), || {
        let s = h.stats();
        s.active == 0 && s.accepted == 4 && s.auth_failures == 1 && s.rejected == 1
    }));
    drop(running);
    let stats = h.stats();

    let v = values.lock().unwrap();
    let server = format!("server={addr}");
    let c = |name: &str, labels: &str| {
        v.counters
            .get(&(name.to_owned(), labels.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(
        c("socketserver_connections_accepted_total", &server),
        stats.accepted
    );
    assert_eq!(c("socketserver_connections_accepted_total", &server), 4);
    assert_eq!(
        c(
            "socketserver_connections_rejected_total",
            &format!("reason=hmac,{server}")
        ),
        1
    );
    assert_eq!(
        c(
            "socketserver_connections_rejected_total",
            &format!("reason=verify,{server}")
        ),
        1
    );
    assert_eq!(c("socketserver_auth_failures_total", &server), 1);
    assert_eq!(
        c("socketserver_bytes_read_total", &server),
        stats.bytes_read
    );
    assert_eq!(c("socketserver_bytes_read_total", &server), 20);
    assert_eq!(c("socketserver_bytes_written_total", &server), 20);
    let active = v
        .gauges
        .get(&("socketserver_connections_active".to_owned(), server.clone()))
        .copied();
    assert_eq!(active, Some(0.0), "the active gauge went up and back down");
    let durations = &v.histograms[&(
        "socketserver_request_duration_seconds".to_owned(),
        server.clone(),
    )];
    assert_eq!(durations.len() as u64, stats.request_duration.count());
    assert_eq!(durations.len(), 2);
    let sum: f64 = durations.iter().sum();
    assert!((sum - stats.request_duration.sum().as_secs_f64()).abs() < 1e-6);
    for name in [
        "socketserver_connections_accepted_total",
        "socketserver_connections_active",
        "socketserver_connections_rejected_total",
        "socketserver_auth_failures_total",
        "socketserver_request_duration_seconds",
        "socketserver_bytes_read_total",
        "socketserver_bytes_written_total",
    ] {
        assert!(
            v.described.iter().any(|d| d == name),
            "{name} not described"
        );
    }
}

/// Connections still queued in the backlog when a drain begins are taken by the serve loop
/// (here refused: the one slot is taken), and counted as the accept loop counts, in the facade
/// as in `Stats`: accepted, then refused by the limit.
#[test]
fn connections_taken_from_the_backlog_at_a_drain_reach_the_facade() {
    let values = recorder();
    let server = TcpServer::builder(util::line_echo)
        .dispatch(Dispatch::Thread)
        .max_connections(1)
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr().inet().unwrap();
    let running = serve(server);
    let h = running.handle.clone();
    // The one slot is taken; the others wait in the backlog.
    let mut first = TcpStream::connect(addr).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    first.write_all(b"one\n").unwrap();
    first.read_exact(&mut [0u8; 4]).unwrap();
    let queued: Vec<TcpStream> = (0..3)
        .map(|_| {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let drain = {
        let h = h.clone();
        std::thread::spawn(move || h.shutdown_graceful(Duration::from_secs(10)))
    };
    for mut s in queued {
        // Closed, one way or another.
        let _ = s.read_to_end(&mut Vec::new());
    }
    drop(first);
    drain.join().unwrap();
    drop(running);
    let stats = h.stats();
    assert_eq!((stats.accepted, stats.limit_rejected), (4, 3), "{stats:?}");
    let v = values.lock().unwrap();
    let c = |name: &str, labels: String| {
        v.counters
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(
        c(
            "socketserver_connections_accepted_total",
            format!("server={addr}")
        ),
        stats.accepted,
        "the facade missed the backlog's connections"
    );
    assert_eq!(
        c(
            "socketserver_connections_rejected_total",
            format!("reason=limit,server={addr}")
        ),
        stats.limit_rejected
    );
}
