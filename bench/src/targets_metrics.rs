//! The target of the observability issue (issue 17): metrics on cost at most 3 %. "On" is
//! `echo_server --mode thread` built with `--features metrics,tracing` and serving
//! `--metrics-addr` (no recorder or subscriber installed: what a user pays before choosing an
//! exporter); "off" is the plain thread-mode contender. The counters of `Stats` are in both.

use crate::contender::{Contender, Kind};
use crate::load::Sample;
use crate::report::{Check, Point, Results, rounds};

/// The targets, for the echo and connect points that were measured.
pub fn targets(res: &Results) -> Vec<Check> {
    let thread = Contender::plain(Kind::Thread);
    let metrics = Contender::plain(Kind::Metrics);
    let rate: fn(&Sample) -> f64 = |s| s.rate;
    res.iter()
        .map(|(point, _)| *point)
        .filter(|p| matches!(p, Point::Echo(_) | Point::Connect(_)))
        .map(|point| {
            let what = match point {
                Point::Echo(n) => format!("echo {n} conns"),
                Point::Connect(n) => format!("connect {n} clients"),
                Point::Idle(n) => format!("idle {n}"),
            };
            Check::new(
                format!("{what}: {} ≥ 0.97 × {}", metrics.label(), thread.label()),
                rounds(res, point, metrics),
                rounds(res, point, thread),
                rate,
                0.97,
                true,
            )
        })
        .collect()
}
