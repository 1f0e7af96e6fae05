//! What a server reports about itself beyond log lines: the admission failures by reason, the
//! request-duration histogram (fixed buckets of atomics), the per-connection `tracing` span
//! (feature `tracing`) and the mirror of the counters through the `metrics` facade (feature
//! `metrics`).
//!
//! Only the recorder (`recorder.rs`, whose one `record(Event)` every count goes through) and
//! [`ConnSpan`] call into it; with both features off, a span is a zero-sized value and every
//! call here compiles to nothing but the counters `Stats` already kept.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::Addr;

/// Why admission refused a connection: the stage that failed, or the limit that cut it. One
/// counter per reason ([`Stats::admission_failures`](crate::Stats::admission_failures)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AdmissionFailure {
    /// A bad, missing or untrusted PROXY-protocol header.
    Proxy,
    /// A failed TLS handshake.
    Tls,
    /// A wrong, malformed or truncated answer to the HMAC (or `multiprocessing`) handshake.
    Hmac,
    /// The admission deadline passed before every stage finished.
    Timeout,
    /// Cut to make room under the cap on unfinished admissions.
    Cap,
}

impl AdmissionFailure {
    /// Every reason, in the order of their counters.
    pub const ALL: [AdmissionFailure; 5] = [
        AdmissionFailure::Proxy,
        AdmissionFailure::Tls,
        AdmissionFailure::Hmac,
        AdmissionFailure::Timeout,
        AdmissionFailure::Cap,
    ];

    /// The reason's name, as the `reason` label of the metrics: `proxy`, `tls`, `hmac`,
    /// `timeout`, `cap`.
    pub const fn label(self) -> &'static str {
        match self {
            AdmissionFailure::Proxy => "proxy",
            AdmissionFailure::Tls => "tls",
            AdmissionFailure::Hmac => "hmac",
            AdmissionFailure::Timeout => "timeout",
            AdmissionFailure::Cap => "cap",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for AdmissionFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Upper bounds of the request-duration buckets, in nanoseconds: 100 µs to 5 minutes, so that
/// both a message of an event-mode connection (sub-millisecond) and a whole long-lived
/// connection (minutes) land in a bucket that tells them apart. The last bucket, `+Inf`, is
/// implicit.
pub(crate) const BUCKET_BOUNDS_NS: [u64; 19] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    300_000_000_000,
];

/// Buckets, the `+Inf` one included.
pub(crate) const BUCKETS: usize = BUCKET_BOUNDS_NS.len() + 1;

/// A histogram of durations: one relaxed atomic per bucket (not cumulative) and the sum. No
/// lock, no allocation: recording is a short scan and two atomic additions.
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub(crate) fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let at = BUCKET_BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> DurationHistogram {
        DurationHistogram {
            counts: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of the request-duration histogram
/// ([`Stats::request_duration`](crate::Stats::request_duration)): how long requests took,
/// from `setup` to the end of `finish` (a connection in thread and pool mode, a datagram for a
/// datagram server).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DurationHistogram {
    counts: [u64; BUCKETS],
    sum_ns: u64,
}

impl DurationHistogram {
    /// Its counts, then the sum in nanoseconds: what a prefork worker reports of it.
    // Used by prefork (feature `signals`, Linux) alone.
    #[cfg_attr(
        not(all(feature = "signals", target_os = "linux", not(socketserver_portable))),
        allow(dead_code)
    )]
    pub(crate) fn words(&self) -> impl Iterator<Item = u64> + '_ {
        self.counts
            .iter()
            .copied()
            .chain(std::iter::once(self.sum_ns))
    }

    /// Fills it from [`words`](Self::words)' order (a missing word is 0).
    // Used by prefork (feature `signals`, Linux) alone.
    #[cfg_attr(
        not(all(feature = "signals", target_os = "linux", not(socketserver_portable))),
        allow(dead_code)
    )]
    pub(crate) fn fill(&mut self, words: &mut impl Iterator<Item = u64>) {
        for c in &mut self.counts {
            *c = words.next().unwrap_or(0);
        }
        self.sum_ns = words.next().unwrap_or(0);
    }

    /// Adds `other`'s requests to these.
    // Used by prefork (feature `signals`, Linux) alone.
    #[cfg_attr(
        not(all(feature = "signals", target_os = "linux", not(socketserver_portable))),
        allow(dead_code)
    )]
    pub(crate) fn add(&mut self, other: &DurationHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum_ns += other.sum_ns;
    }

    /// The buckets' upper bounds (inclusive), the last one infinite (`Duration::MAX`).
    pub fn bounds() -> impl Iterator<Item = Duration> {
        BUCKET_BOUNDS_NS
            .iter()
            .map(|&ns| Duration::from_nanos(ns))
            .chain(std::iter::once(Duration::MAX))
    }

    /// For each bucket, with its upper bound: how many requests took at most that long
    /// (cumulative, as Prometheus's `_bucket{le=...}`; the last is [`count`](Self::count)).
    pub fn cumulative(&self) -> impl Iterator<Item = (Duration, u64)> + '_ {
        Self::bounds().zip(self.counts.iter().scan(0u64, |acc, &c| {
            *acc += c;
            Some(*acc)
        }))
    }

    /// Requests recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Their total duration.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns)
    }
}

/// Per-connection `tracing` span: `conn` with `id`, `peer`, `transport`, `tls` and `auth`
/// (the admission outcome: `none` without stages, `ok`, or the failure's reason). Entered on
/// the worker around admission and the handler's lifecycle (per message in event mode); a
/// zero-sized no-op without the `tracing` feature.
#[derive(Clone)]
pub(crate) struct ConnSpan {
    #[cfg(feature = "tracing")]
    span: tracing::Span,
    #[cfg(feature = "tracing")]
    opened: std::time::Instant,
}

/// Connection ids of the spans, process-wide, so that two servers' spans never share one.
#[cfg(feature = "tracing")]
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

impl ConnSpan {
    /// Opens the span of a connection from `peer`.
    #[inline]
    pub(crate) fn open(peer: &Addr) -> ConnSpan {
        #[cfg(feature = "tracing")]
        {
            let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
            let transport = match peer {
                Addr::Inet(_) => "tcp",
                _ => "unix",
            };
            let span = tracing::info_span!(
                target: "socketserver",
                "conn",
                id,
                peer = %peer,
                transport,
                tls = false,
                auth = tracing::field::Empty,
            );
            ConnSpan {
                span,
                opened: std::time::Instant::now(),
            }
        }
        #[cfg(not(feature = "tracing"))]
        {
            let _ = peer;
            ConnSpan {}
        }
    }

    /// Runs `f` inside the span.
    #[inline]
    pub(crate) fn in_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        #[cfg(feature = "tracing")]
        {
            self.span.in_scope(f)
        }
        #[cfg(not(feature = "tracing"))]
        {
            f()
        }
    }

    /// The connection's end: an event with its duration and bytes.
    #[inline]
    pub(crate) fn close(&self, read: u64, written: u64) {
        #[cfg(feature = "tracing")]
        self.span.in_scope(|| {
            tracing::debug!(
                target: "socketserver",
                duration_us = self.opened.elapsed().as_micros() as u64,
                bytes_read = read,
                bytes_written = written,
                "close"
            )
        });
        #[cfg(not(feature = "tracing"))]
        let _ = (read, written);
    }
}

/// Records the admission outcome on the current connection span (`auth`), and `tls` when a
/// TLS stage admitted it.
#[inline]
pub(crate) fn record_admission(outcome: &'static str, tls: bool) {
    #[cfg(feature = "tracing")]
    {
        let span = tracing::Span::current();
        span.record("auth", outcome);
        if tls {
            span.record("tls", true);
        }
    }
    #[cfg(not(feature = "tracing"))]
    let _ = (outcome, tls);
}

/// An event for one admission stage: its name, whether it passed, how long it took.
#[inline]
pub(crate) fn stage_event(stage: &'static str, ok: bool, took: Duration) {
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "socketserver",
        stage,
        ok,
        took_us = took.as_micros() as u64,
        "admission stage"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = (stage, ok, took);
}

/// The accept loop's event for a new connection (or datagram).
#[inline]
pub(crate) fn accept_event(server: &Addr, peer: &Addr) {
    #[cfg(feature = "tracing")]
    tracing::debug!(target: "socketserver", server = %server, peer = %peer, "accept");
    #[cfg(not(feature = "tracing"))]
    let _ = (server, peer);
}

/// The `metrics` facade mirror: the same names as the Prometheus exposition, each with a
/// `server` label (the server's local address).
#[cfg(feature = "metrics")]
pub(crate) mod facade {
    use std::sync::Once;

    use metrics::SharedString;

    pub(crate) const ACCEPTED: &str = "socketserver_connections_accepted_total";
    pub(crate) const ACTIVE: &str = "socketserver_connections_active";
    pub(crate) const REJECTED: &str = "socketserver_connections_rejected_total";
    pub(crate) const AUTH_FAILURES: &str = "socketserver_auth_failures_total";
    pub(crate) const DURATION: &str = "socketserver_request_duration_seconds";
    pub(crate) const BYTES_READ: &str = "socketserver_bytes_read_total";
    pub(crate) const BYTES_WRITTEN: &str = "socketserver_bytes_written_total";

    /// Describes the metrics to the recorder installed when the first server is made.
    pub(crate) fn describe() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
            describe_counter!(ACCEPTED, "Connections accepted (datagrams received).");
            describe_gauge!(ACTIVE, "Requests being handled right now.");
            describe_counter!(REJECTED, "Connections refused, by reason.");
            describe_counter!(AUTH_FAILURES, "Clients that failed the HMAC handshake.");
            describe_histogram!(
                DURATION,
                Unit::Seconds,
                "Request duration, setup to finish."
            );
            describe_counter!(BYTES_READ, Unit::Bytes, "Bytes read from connections.");
            describe_counter!(BYTES_WRITTEN, Unit::Bytes, "Bytes written to connections.");
        });
    }

    pub(crate) fn label(server: &crate::Addr) -> SharedString {
        SharedString::from(server.to_string())
    }
}
