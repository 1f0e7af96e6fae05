//! Prometheus text exposition (format 0.0.4) of [`Stats`], written by hand: no dependency.
//!
//! Every family has its `# HELP` and `# TYPE` lines once, then one sample per server (label
//! `server="NAME"`), so that several servers of one process can be scraped together from one
//! page ([`render_prometheus`]). Counters end in `_total`; the duration histogram has
//! cumulative `_bucket{le="..."}` samples ending at `+Inf`, then `_sum` and `_count`.

use std::fmt::Write;

use crate::observe::AdmissionFailure;
use crate::recorder::Refusal;
use crate::{ServerHandle, Stats};

/// The `Content-Type` of the exposition, for an HTTP response.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One sample's value from a server's stats.
type Value = fn(&Stats) -> u64;

/// A family with one sample per server: name, type, help, and for each `reason` label value
/// (none: no label) how to read it.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: &'static [(Option<&'static str>, Value)],
}

const fn reason(label: &'static str, v: Value) -> (Option<&'static str>, Value) {
    (Some(label), v)
}

fn admission(s: &Stats, r: AdmissionFailure) -> u64 {
    s.admission_failures(r)
}

const FAMILIES: &[Family] = &[
    Family {
        name: "socketserver_connections_accepted_total",
        kind: "counter",
        help: "Connections accepted (datagrams received, for datagram servers).",
        samples: &[(None, |s| s.accepted)],
    },
    Family {
        name: "socketserver_connections_active",
        kind: "gauge",
        help: "Requests being handled right now.",
        samples: &[(None, |s| s.active)],
    },
    Family {
        name: "socketserver_connections_rejected_total",
        kind: "counter",
        help: "Connections refused, by reason: verify_request, the connection limit, the \
               per-source cap, or a failed admission (proxy, tls, hmac, timeout, cap).",
        samples: &[
            reason(Refusal::Verify.label(), |s| s.rejected),
            reason(Refusal::Limit.label(), |s| s.limit_rejected),
            reason(Refusal::PerSource.label(), |s| s.per_source_rejected),
            reason(AdmissionFailure::Proxy.label(), |s| {
                admission(s, AdmissionFailure::Proxy)
            }),
            reason(AdmissionFailure::Tls.label(), |s| {
                admission(s, AdmissionFailure::Tls)
            }),
            reason(AdmissionFailure::Hmac.label(), |s| {
                admission(s, AdmissionFailure::Hmac)
            }),
            reason(AdmissionFailure::Timeout.label(), |s| {
                admission(s, AdmissionFailure::Timeout)
            }),
            reason(AdmissionFailure::Cap.label(), |s| {
                admission(s, AdmissionFailure::Cap)
            }),
        ],
    },
    Family {
        name: "socketserver_auth_failures_total",
        kind: "counter",
        help: "Clients that failed the HMAC or multiprocessing handshake.",
        samples: &[(None, |s| s.auth_failures)],
    },
    Family {
        name: "socketserver_bytes_read_total",
        kind: "counter",
        help: "Bytes read from stream connections, counted when each closes.",
        samples: &[(None, |s| s.bytes_read)],
    },
    Family {
        name: "socketserver_bytes_written_total",
        kind: "counter",
        help: "Bytes written to stream connections, counted when each closes.",
        samples: &[(None, |s| s.bytes_written)],
    },
    Family {
        name: "socketserver_connections_closed_total",
        kind: "counter",
        help: "Connections the server cut, by reason: idle timeout, or under the minimum data \
               rate.",
        samples: &[
            reason("idle", |s| s.idle_closed),
            reason("slow", |s| s.slow_closed),
            reason("pressure", |s| s.evicted),
        ],
    },
    Family {
        name: "socketserver_handler_errors_total",
        kind: "counter",
        help: "Handlers (setup, handle or finish) that returned an error.",
        samples: &[(None, |s| s.handler_errors)],
    },
    Family {
        name: "socketserver_handler_panics_total",
        kind: "counter",
        help: "Handlers that panicked.",
        samples: &[(None, |s| s.panics)],
    },
    Family {
        name: "socketserver_handler_timeouts_total",
        kind: "counter",
        help: "Handlers that ended on a read or write timeout.",
        samples: &[(None, |s| s.timeouts)],
    },
    Family {
        name: "socketserver_accept_errors_total",
        kind: "counter",
        help: "Failed accept (or datagram receive) calls, all recovered from.",
        samples: &[(None, |s| s.accept_errors)],
    },
    Family {
        name: "socketserver_datagrams_dropped_total",
        kind: "counter",
        help: "Datagrams dropped, by reason: over max_packet_size, or a reply over the \
               amplification guard.",
        samples: &[
            reason("oversized", |s| s.oversized_datagrams),
            reason("amplification", |s| s.amplification_dropped),
        ],
    },
];

const DURATION: &str = "socketserver_request_duration_seconds";

/// A label value, escaped as the exposition format requires (`\`, `"`, newline).
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The text exposition of several servers' stats on one page, each sample labelled
/// `server="NAME"` with its server's name: every family once, with one sample per server.
///
/// ```
/// use socketserver::{Stats, render_prometheus};
///
/// let (echo, kv) = (Stats::default(), Stats::default());
/// let page = render_prometheus(&[("echo", &echo), ("kv", &kv)]);
/// assert!(page.contains("socketserver_connections_accepted_total{server=\"kv\"} 0\n"));
/// ```
pub fn render_prometheus(servers: &[(&str, &Stats)]) -> String {
    let servers: Vec<(String, &Stats)> = servers.iter().map(|(n, s)| (escape(n), *s)).collect();
    let mut out = String::with_capacity(4096 * servers.len().max(1));
    for f in FAMILIES {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (server, stats) in &servers {
            for (reason, value) in f.samples {
                match reason {
                    Some(r) => {
                        let _ = writeln!(
                            out,
                            "{}{{server=\"{server}\",reason=\"{r}\"}} {}",
                            f.name,
                            value(stats)
                        );
                    }
                    None => {
                        let _ = writeln!(out, "{}{{server=\"{server}\"}} {}", f.name, value(stats));
                    }
                }
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP {DURATION} How long requests took, setup to the end of finish (a connection, \
         a datagram, or a message in event mode)."
    );
    let _ = writeln!(out, "# TYPE {DURATION} histogram");
    for (server, stats) in &servers {
        let h = &stats.request_duration;
        for (bound, n) in h.cumulative() {
            let le = if bound == std::time::Duration::MAX {
                "+Inf".to_owned()
            } else {
                bound.as_secs_f64().to_string()
            };
            let _ = writeln!(
                out,
                "{DURATION}_bucket{{server=\"{server}\",le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "{DURATION}_sum{{server=\"{server}\"}} {}",
            h.sum().as_secs_f64()
        );
        let _ = writeln!(out, "{DURATION}_count{{server=\"{server}\"}} {}", h.count());
    }
    out
}

impl Stats {
    /// The Prometheus text exposition of these stats, each sample labelled `server="NAME"`
    /// with `server` (for several servers on one page, [`render_prometheus`]). Serve it with
    /// the `Content-Type` [`PROMETHEUS_CONTENT_TYPE`], as
    /// [`metrics_http`](crate::metrics_http) does.
    pub fn render_prometheus(&self, server: &str) -> String {
        render_prometheus(&[(server, self)])
    }
}

impl ServerHandle {
    /// The Prometheus text exposition of this server's counters right now, labelled with its
    /// local address (`server="127.0.0.1:9000"`); see [`Stats::render_prometheus`].
    pub fn prometheus(&self) -> String {
        self.stats()
            .render_prometheus(&self.local_addr().to_string())
    }
}
