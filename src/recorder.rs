//! Where every count of a server changes: one [`Recorder::record`] entry point, fed an
//! [`Event`] by the accept loop, admission, the lifecycle, the reaper and the datagram paths.
//! Each event bumps the counters that [`Stats`] snapshots and, where the feature is on, mirrors
//! itself through the `metrics` facade and `tracing`; nothing else touches the counters, so a
//! connection is counted once, under one reason, in every one of them. What a prefork worker
//! counted travels to its supervisor as [`Stats::words`], every field in one fixed order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::Addr;
use crate::observe::{AdmissionFailure, DurationHistogram, Histogram};

/// Why the accept loop (or the PROXY stage, for the client its header named) refused a
/// connection before admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `verify_request` returned false.
    Verify,
    /// The connection limit was reached (`reject_when_full`).
    Limit,
    /// The client address already had `max_per_source` connections open.
    PerSource,
}

impl Refusal {
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Refusal::Verify => "verify",
            Refusal::Limit => "limit",
            Refusal::PerSource => "per_source",
        }
    }
}

/// What went wrong with a PROXY header: the detail behind an
/// [`AdmissionFailure::Proxy`], counted on its own as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "proxy-protocol"), allow(dead_code))]
pub(crate) enum ProxyFault {
    /// The peer is not a trusted proxy.
    Untrusted,
    /// A trusted proxy sent no header.
    Missing,
    /// A header that started right and went wrong.
    Malformed,
    /// A header over the size limit.
    Oversized,
    /// A header not complete by the handshake deadline.
    Timeout,
}

/// How the admission of a connection ended, as its own thread saw it: what the connection's
/// `tracing` span records as `auth`, and for [`Failed`](Outcome::Failed) its one count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// No admission stages.
    NoStages,
    /// Every stage passed; `tls`: a TLS stage among them.
    Admitted { tls: bool },
    /// The PROXY stage's client was refused by `verify_request` or `max_per_source`: counted
    /// by the stage's [`Event::Refused`], not here.
    #[cfg_attr(not(feature = "proxy-protocol"), allow(dead_code))]
    Refused,
    /// A stage failed, or the deadline passed: counted here.
    Failed(AdmissionFailure),
    /// Another thread cut the admission (the cap, or event mode's deadline sweep) and counted
    /// it with [`Event::AdmissionCut`]: only the span records it here.
    Cut(AdmissionFailure),
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::NoStages => "none",
            Outcome::Admitted { .. } => "ok",
            Outcome::Refused => "refused",
            Outcome::Failed(r) | Outcome::Cut(r) => r.label(),
        }
    }
}

/// Something a server counts. Every change to the counters of [`Stats`] is one of these,
/// passed to [`Recorder::record`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event<'a> {
    /// A connection (or datagram) accepted; `peer` for the `tracing` accept event (none for
    /// what is not traced, a datagram).
    Accepted { peer: Option<&'a Addr> },
    /// Refused before admission.
    Refused(Refusal),
    /// An admission ended on its connection's thread.
    Admission(Outcome),
    /// An admission cut by another thread (the cap's eviction, event mode's deadline sweep):
    /// counted before the client can see the close.
    AdmissionCut(AdmissionFailure),
    /// A PROXY header's fault (the admission failure itself is [`Outcome::Failed`]).
    #[cfg_attr(not(feature = "proxy-protocol"), allow(dead_code))]
    Proxy(ProxyFault),
    /// A request registered as in flight (the facade's `active` gauge).
    Opened,
    /// A request in flight ended.
    Closed,
    /// One request served, `setup` to the end of `finish`.
    Request { took: Duration },
    /// The bytes a stream connection moved, once when it closes.
    Bytes { read: u64, written: u64 },
    /// A handler returned an error (not a timeout, not the peer leaving).
    HandlerError,
    /// A handler ended on a read or write timeout.
    Timeout,
    /// A handler panicked.
    Panic,
    /// A failed `accept` (or datagram receive).
    AcceptError,
    /// A datagram over the maximum packet size, dropped.
    OversizedDatagram,
    /// A datagram reply dropped by the amplification guard.
    AmplificationDropped,
    /// A connection closed by the idle timeout.
    IdleClosed,
    /// A connection closed for sending slower than the minimum data rate.
    SlowClosed,
    /// An idle connection closed by the pressure policy to make room.
    Evicted,
}

/// The counters, updated with relaxed atomics: each is exact, the snapshot is not one instant.
/// Private to this module: only [`Recorder::record`] changes them.
#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    rejected: AtomicU64,
    limit_rejected: AtomicU64,
    per_source_rejected: AtomicU64,
    /// By [`AdmissionFailure`].
    admission_failures: [AtomicU64; AdmissionFailure::ALL.len()],
    handler_errors: AtomicU64,
    panics: AtomicU64,
    accept_errors: AtomicU64,
    oversized: AtomicU64,
    idle_closed: AtomicU64,
    amplification_dropped: AtomicU64,
    slow_closed: AtomicU64,
    evicted: AtomicU64,
    timeouts: AtomicU64,
    /// Bytes moved on stream connections, added when each one closes.
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    request_duration: Histogram,
    proxy_untrusted: AtomicU64,
    proxy_missing: AtomicU64,
    proxy_malformed: AtomicU64,
    proxy_oversized: AtomicU64,
    proxy_timeouts: AtomicU64,
}

fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed) + 1
}

/// A server's counters and their mirrors. Every call is a few relaxed atomic additions; none
/// locks or allocates (the facade's recorder may).
pub(crate) struct Recorder {
    counters: Counters,
    /// After this many accepted connections the serve loop is asked to return (a prefork
    /// worker's `max_requests_per_worker`); `u64::MAX`: no limit.
    accept_limit: AtomicU64,
    /// The server's address: the `server` label of the facade, the accept event's `server`.
    #[cfg_attr(not(any(feature = "metrics", feature = "tracing")), allow(dead_code))]
    server: Addr,
    /// The `server` label of the `metrics` facade mirror.
    #[cfg(feature = "metrics")]
    label: metrics::SharedString,
}

/// What recording an event asks of the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub(crate) enum Recorded {
    /// Nothing more.
    Done,
    /// That acceptance reached the accept limit: the serve loop is to return.
    AcceptLimitReached,
}

impl Recorder {
    /// Counters at zero; `server` names them in the `metrics` facade mirror.
    pub(crate) fn new(server: &Addr) -> Recorder {
        #[cfg(feature = "metrics")]
        crate::observe::facade::describe();
        Recorder {
            counters: Counters::default(),
            accept_limit: AtomicU64::new(u64::MAX),
            server: server.clone(),
            #[cfg(feature = "metrics")]
            label: crate::observe::facade::label(server),
        }
    }

    /// Asks for [`Recorded::AcceptLimitReached`] once `n` connections have been accepted.
    #[cfg_attr(not(feature = "signals"), allow(dead_code))]
    pub(crate) fn set_accept_limit(&self, n: u64) {
        self.accept_limit.store(n, Ordering::Release);
    }

    /// Counts `event` in [`Stats`] and mirrors it to the `metrics` facade and `tracing`.
    pub(crate) fn record(&self, event: Event<'_>) -> Recorded {
        let c = &self.counters;
        match event {
            Event::Accepted { peer } => {
                let n = bump(&c.accepted);
                #[cfg(feature = "metrics")]
                metrics::counter!(crate::observe::facade::ACCEPTED, "server" => self.label.clone())
                    .increment(1);
                if let Some(peer) = peer {
                    crate::observe::accept_event(&self.server, peer);
                }
                // A prefork worker's `max_requests`: its last connection ends the serve loop.
                if n == self.accept_limit.load(Ordering::Acquire) {
                    return Recorded::AcceptLimitReached;
                }
            }
            Event::Refused(why) => {
                bump(match why {
                    Refusal::Verify => &c.rejected,
                    Refusal::Limit => &c.limit_rejected,
                    Refusal::PerSource => &c.per_source_rejected,
                });
                #[cfg(feature = "metrics")]
                metrics::counter!(crate::observe::facade::REJECTED,
                    "server" => self.label.clone(), "reason" => why.label())
                .increment(1);
            }
            Event::Admission(outcome) => {
                if let Outcome::Failed(reason) = outcome {
                    self.admission_failed(reason);
                }
                let tls = matches!(outcome, Outcome::Admitted { tls: true });
                crate::observe::record_admission(outcome.label(), tls);
            }
            Event::AdmissionCut(reason) => self.admission_failed(reason),
            Event::Proxy(fault) => {
                bump(match fault {
                    ProxyFault::Untrusted => &c.proxy_untrusted,
                    ProxyFault::Missing => &c.proxy_missing,
                    ProxyFault::Malformed => &c.proxy_malformed,
                    ProxyFault::Oversized => &c.proxy_oversized,
                    ProxyFault::Timeout => &c.proxy_timeouts,
                });
            }
            Event::Opened => self.mirror_active(1.0),
            Event::Closed => self.mirror_active(-1.0),
            Event::Request { took } => {
                c.request_duration.record(took);
                #[cfg(feature = "metrics")]
                metrics::histogram!(crate::observe::facade::DURATION, "server" => self.label.clone())
                    .record(took.as_secs_f64());
            }
            Event::Bytes { read, written } => {
                c.bytes_read.fetch_add(read, Ordering::Relaxed);
                c.bytes_written.fetch_add(written, Ordering::Relaxed);
                #[cfg(feature = "metrics")]
                {
                    metrics::counter!(crate::observe::facade::BYTES_READ, "server" => self.label.clone())
                        .increment(read);
                    metrics::counter!(crate::observe::facade::BYTES_WRITTEN, "server" => self.label.clone())
                        .increment(written);
                }
            }
            Event::HandlerError => _ = bump(&c.handler_errors),
            Event::Timeout => _ = bump(&c.timeouts),
            Event::Panic => _ = bump(&c.panics),
            Event::AcceptError => _ = bump(&c.accept_errors),
            Event::OversizedDatagram => _ = bump(&c.oversized),
            Event::AmplificationDropped => _ = bump(&c.amplification_dropped),
            Event::IdleClosed => _ = bump(&c.idle_closed),
            Event::SlowClosed => _ = bump(&c.slow_closed),
            Event::Evicted => _ = bump(&c.evicted),
        }
        Recorded::Done
    }

    /// A connection that admission refused, by reason: every stage (PROXY, TLS, HMAC) and
    /// every limit (deadline, cap) reports here, once per refused connection.
    fn admission_failed(&self, reason: AdmissionFailure) {
        bump(&self.counters.admission_failures[reason.index()]);
        #[cfg(feature = "metrics")]
        {
            metrics::counter!(crate::observe::facade::REJECTED,
                "server" => self.label.clone(), "reason" => reason.label())
            .increment(1);
            if reason == AdmissionFailure::Hmac {
                metrics::counter!(crate::observe::facade::AUTH_FAILURES, "server" => self.label.clone())
                    .increment(1);
            }
        }
    }

    /// The `active` gauge of the facade follows the registry of in-flight requests.
    #[inline]
    fn mirror_active(&self, delta: f64) {
        #[cfg(feature = "metrics")]
        metrics::gauge!(crate::observe::facade::ACTIVE, "server" => self.label.clone())
            .increment(delta);
        #[cfg(not(feature = "metrics"))]
        let _ = delta;
    }

    /// The counters now; `active`: the requests in flight, which the registry knows.
    pub(crate) fn snapshot(&self, active: u64) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            accepted: get(&c.accepted),
            active,
            rejected: get(&c.rejected),
            limit_rejected: get(&c.limit_rejected),
            per_source_rejected: get(&c.per_source_rejected),
            auth_failures: get(&c.admission_failures[AdmissionFailure::Hmac.index()]),
            handshake_timeouts: get(&c.admission_failures[AdmissionFailure::Timeout.index()]),
            handshake_evictions: get(&c.admission_failures[AdmissionFailure::Cap.index()]),
            handler_errors: get(&c.handler_errors),
            panics: get(&c.panics),
            accept_errors: get(&c.accept_errors),
            oversized_datagrams: get(&c.oversized),
            idle_closed: get(&c.idle_closed),
            amplification_dropped: get(&c.amplification_dropped),
            slow_closed: get(&c.slow_closed),
            evicted: get(&c.evicted),
            timeouts: get(&c.timeouts),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            request_duration: c.request_duration.snapshot(),
            admission: std::array::from_fn(|i| get(&c.admission_failures[i])),
            tls_failures: get(&c.admission_failures[AdmissionFailure::Tls.index()]),
            proxy_untrusted: get(&c.proxy_untrusted),
            proxy_missing: get(&c.proxy_missing),
            proxy_malformed: get(&c.proxy_malformed),
            proxy_oversized: get(&c.proxy_oversized),
            proxy_timeouts: get(&c.proxy_timeouts),
        }
    }
}

/// A snapshot of a server's counters, from [`ServerHandle::stats`](crate::ServerHandle::stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Connections accepted (datagrams received, for datagram servers).
    pub accepted: u64,
    /// Requests being handled right now.
    pub active: u64,
    /// Requests closed because `verify_request` returned false.
    pub rejected: u64,
    /// Connections closed at once because the connection limit was reached
    /// ([`Builder::reject_when_full`](crate::Builder::reject_when_full)).
    pub limit_rejected: u64,
    /// Connections closed at once because their client address already had
    /// [`Builder::max_per_source`](crate::Builder::max_per_source) connections open.
    pub per_source_rejected: u64,
    /// Clients that failed authentication (wrong, malformed or truncated answer): the
    /// [`Hmac`](AdmissionFailure::Hmac) count of
    /// [`admission_failures`](Self::admission_failures).
    pub auth_failures: u64,
    /// Clients that did not finish the handshake within the handshake timeout: the
    /// [`Timeout`](AdmissionFailure::Timeout) count of
    /// [`admission_failures`](Self::admission_failures).
    pub handshake_timeouts: u64,
    /// Unfinished handshakes cut to make room under the handshake cap: the
    /// [`Cap`](AdmissionFailure::Cap) count of
    /// [`admission_failures`](Self::admission_failures).
    pub handshake_evictions: u64,
    /// Handlers (`setup`, `handle` or `finish`) that returned an error, other than a timeout
    /// (`timeouts`) or the client resetting or leaving mid-request
    /// ([`HandlerFailure::is_disconnect`](crate::HandlerFailure::is_disconnect): logged at
    /// debug, not counted).
    pub handler_errors: u64,
    /// Handlers that panicked.
    pub panics: u64,
    /// Failed `accept` (or datagram receive) calls, all recovered from.
    pub accept_errors: u64,
    /// Datagrams longer than the maximum packet size, dropped and logged.
    pub oversized_datagrams: u64,
    /// Connections closed by the idle timeout
    /// ([`Builder::idle_timeout`](crate::Builder::idle_timeout)).
    pub idle_closed: u64,
    /// Datagram replies dropped by the amplification guard
    /// ([`Builder::max_reply_ratio`](crate::Builder::max_reply_ratio)).
    pub amplification_dropped: u64,
    /// Connections closed for sending a request slower than the minimum data rate
    /// ([`Builder::min_data_rate`](crate::Builder::min_data_rate)).
    pub slow_closed: u64,
    /// Idle connections closed to make room for a newcomer while the server was at
    /// [`Builder::max_connections`](crate::Builder::max_connections) (the pressure policy),
    /// idlest first.
    pub evicted: u64,
    /// Handlers that ended on a read or write timeout
    /// ([`Builder::read_timeout`](crate::Builder::read_timeout), `write_timeout`): logged at
    /// info, and not counted in `handler_errors`.
    pub timeouts: u64,
    /// Connections refused by the PROXY stage because their peer is not a trusted proxy
    /// (`ProxyProtocol`, cargo feature `proxy-protocol`).
    pub proxy_untrusted: u64,
    /// Connections from a trusted proxy that did not start with a PROXY header (or ended
    /// before sending a byte).
    pub proxy_missing: u64,
    /// PROXY headers that started right and went wrong: a bad signature, version, command,
    /// address or TLV, or a connection that ended inside the header.
    pub proxy_malformed: u64,
    /// PROXY headers longer than allowed (107 bytes for v1, 16 + 1536 for v2), refused before
    /// the excess is read.
    pub proxy_oversized: u64,
    /// PROXY headers not complete within the handshake deadline (not counted in
    /// `handshake_timeouts`).
    pub proxy_timeouts: u64,
    /// Clients whose TLS handshake failed (feature `tls`): plaintext on a TLS port, an unknown
    /// CA, a bad or missing client certificate, a truncated or malformed ClientHello.
    pub tls_failures: u64,
    /// Bytes read from stream connections (through the [`Stream`](crate::Stream)), counted when each
    /// connection closes (the admission handshakes, which read the socket directly, are not
    /// counted).
    pub bytes_read: u64,
    /// Bytes written to stream connections, counted when each connection closes.
    pub bytes_written: u64,
    /// How long requests took, `setup` to the end of `finish`.
    pub request_duration: DurationHistogram,
    /// Admission failures, indexed by [`AdmissionFailure::index`].
    admission: [u64; AdmissionFailure::ALL.len()],
}

impl Stats {
    /// Connections that admission refused for `reason`.
    pub fn admission_failures(&self, reason: AdmissionFailure) -> u64 {
        self.admission[reason.index()]
    }
}

/// Every counter of [`Stats`] in a fixed order, for the one place that moves a whole `Stats`
/// between processes (a prefork worker's report) and sums them: a field added to `Stats`
/// and not here is what prefork's `stats_survive_the_line_a_worker_reports` catches.
macro_rules! stats_counters {
    ($m:ident) => {
        $m!(
            accepted,
            active,
            rejected,
            limit_rejected,
            per_source_rejected,
            auth_failures,
            handshake_timeouts,
            handshake_evictions,
            handler_errors,
            panics,
            accept_errors,
            oversized_datagrams,
            idle_closed,
            amplification_dropped,
            slow_closed,
            evicted,
            timeouts,
            proxy_untrusted,
            proxy_missing,
            proxy_malformed,
            proxy_oversized,
            proxy_timeouts,
            tls_failures,
            bytes_read,
            bytes_written
        )
    };
}

impl Stats {
    /// All of it as numbers: the counters, the admission failures by reason, the duration
    /// histogram.
    // Used by prefork (feature `signals`, Linux) alone.
    #[cfg_attr(
        not(all(feature = "signals", target_os = "linux", not(socketserver_portable))),
        allow(dead_code)
    )]
    pub(crate) fn words(&self) -> Vec<u64> {
        macro_rules! list {
            ($($f:ident),*) => { vec![$(self.$f),*] };
        }
        let mut w: Vec<u64> = stats_counters!(list);
        w.extend(self.admission);
        w.extend(self.request_duration.words());
        w
    }

    /// The inverse of [`words`](Self::words); missing words are 0, extra ones ignored.
    // Used by prefork (feature `signals`, Linux) alone.
    #[cfg_attr(
        not(all(feature = "signals", target_os = "linux", not(socketserver_portable))),
        allow(dead_code)
    )]
    pub(crate) fn from_words(words: impl IntoIterator<Item = u64>) -> Stats {
        let mut it = words.into_iter();
        let mut s = Stats::default();
        macro_rules! fill {
            ($($f:ident),*) => { $(s.$f = it.next().unwrap_or(0);)* };
        }
        stats_counters!(fill);
        for a in &mut s.admission {
            *a = it.next().unwrap_or(0);
        }
        s.request_duration.fill(&mut it);
        s
    }

    /// Adds `other`'s counts to these, histogram included.
    // Used by prefork (feature `signals`, Linux) alone.
    #[cfg_attr(
        not(all(feature = "signals", target_os = "linux", not(socketserver_portable))),
        allow(dead_code)
    )]
    pub(crate) fn add(&mut self, other: &Stats) {
        macro_rules! add {
            ($($f:ident),*) => { $(self.$f += other.$f;)* };
        }
        stats_counters!(add);
        for (a, b) in self.admission.iter_mut().zip(other.admission) {
            *a += b;
        }
        self.request_duration.add(&other.request_duration);
    }
}
