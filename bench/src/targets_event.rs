//! The targets of the event-dispatch issue (issue 13): `echo_server --mode event` against
//! tokio and std, the MD5 handshake against tokio doing the same handshake, thread mode's
//! connection churn against the pool, and the idle capacity of event mode in absolute terms
//! (threads, memory per connection, every held connection still answering).
//!
//! Judged with the same rule as every other target ([`Check`]): PASS only when every round
//! clears the bound. The absolute targets compare each round's figure with a fixed limit, so
//! their "ratio" is figure / limit against a bound of 1.

use socketserver::Digest;

use crate::contender::{Contender, EVENT_WORKERS, Kind};
use crate::load::Sample;
use crate::report::{Check, Point, Results, range, rounds, summary};

/// Most threads the event server may run while holding the idle connections: its workers plus
/// this many (main, accept loop, and the like).
pub const EVENT_EXTRA_THREADS: usize = 4;

/// Most resident memory an idle connection may cost the event server, bytes.
pub const EVENT_RSS_PER_CONN: f64 = 4096.0;

/// A target on one contender's figure against a fixed `limit`: the ratio is figure / limit,
/// judged against 1 (at least or at most) over every round.
pub fn absolute(
    what: String,
    a: &[Sample],
    f: fn(&Sample) -> f64,
    limit: f64,
    at_least: bool,
) -> Check {
    let median = summary(a).map(|s| f(&s));
    let band = range(a, f).map(|(lo, hi)| (lo / limit, hi / limit));
    Check {
        what,
        ratio: median.map(|m| m / limit),
        band,
        rounds: a.len(),
        bound: 1.0,
        at_least,
    }
}

/// The targets, for the points that were measured.
pub fn targets(res: &Results) -> Vec<Check> {
    let std = Contender::plain(Kind::Std);
    let tokio = Contender::plain(Kind::Tokio);
    let thread = Contender::plain(Kind::Thread);
    let pool = Contender::plain(Kind::Pool);
    let event = Contender::plain(Kind::Event);
    let rate: fn(&Sample) -> f64 = |s| s.rate;
    let mut out = Vec::new();
    for (point, _) in res {
        let point = *point;
        let ratio = |what: String, a: Contender, b: Contender, bound: f64| {
            Check::new(
                what,
                rounds(res, point, a),
                rounds(res, point, b),
                rate,
                bound,
                true,
            )
        };
        match point {
            Point::Echo(1) => out.push(ratio(
                format!("echo 1 conns: {} round trips/s ≥ 0.95 × std", event.label()),
                event,
                std,
                0.95,
            )),
            Point::Echo(n) => out.push(ratio(
                format!("echo {n} conns: {} round trips/s ≥ tokio", event.label()),
                event,
                tokio,
                1.0,
            )),
            Point::Connect(n) => {
                out.push(ratio(
                    format!("connect {n} clients: {} ≥ tokio", event.label()),
                    event,
                    tokio,
                    1.0,
                ));
                let (event_md5, tokio_md5) = (
                    Contender::with_auth(Kind::Event, Digest::Md5),
                    Contender::with_auth(Kind::Tokio, Digest::Md5),
                );
                out.push(ratio(
                    format!(
                        "connect {n} clients: {} ≥ {}",
                        event_md5.label(),
                        tokio_md5.label()
                    ),
                    event_md5,
                    tokio_md5,
                    1.0,
                ));
                out.push(ratio(
                    format!(
                        "connect {n} clients: {} ≥ 0.95 × {} (issue: unpinned)",
                        thread.label(),
                        pool.label()
                    ),
                    thread,
                    pool,
                    0.95,
                ));
            }
            Point::Idle(n) => {
                let a = rounds(res, point, event);
                let most = EVENT_WORKERS + EVENT_EXTRA_THREADS;
                out.push(absolute(
                    format!(
                        "idle {n}: {} holds all {n}, each answering its check echo (held / {n})",
                        event.label()
                    ),
                    a,
                    |s| s.rate,
                    n as f64,
                    true,
                ));
                out.push(absolute(
                    format!(
                        "idle {n}: {} server threads ≤ workers + {EVENT_EXTRA_THREADS} = \
                         {most} (threads / {most})",
                        event.label()
                    ),
                    a,
                    |s| s.threads,
                    most as f64,
                    false,
                ));
                out.push(absolute(
                    format!(
                        "idle {n}: {} RSS per connection ≤ 4 KiB (RSS per connection / 4 KiB)",
                        event.label()
                    ),
                    a,
                    |s| s.rss_per_conn,
                    EVENT_RSS_PER_CONN,
                    false,
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Entry, Verdict};

    fn entry(c: Contender, figures: &[(f64, f64, f64)]) -> Entry {
        Entry {
            contender: c,
            samples: figures
                .iter()
                .map(|&(rate, threads, rss_per_conn)| Sample {
                    rate,
                    threads,
                    rss_per_conn,
                    ..Sample::default()
                })
                .collect(),
            failures: Vec::new(),
        }
    }

    #[test]
    fn idle_targets_are_absolute() {
        let event = Contender::plain(Kind::Event);
        let res: Results = vec![(
            Point::Idle(100),
            vec![entry(
                event,
                &[
                    (100.0, 5.0, 3000.0),
                    (100.0, 6.0, 3500.0),
                    (99.0, 5.0, 3200.0),
                ],
            )],
        )];
        let checks = targets(&res);
        let verdict = |what: &str| {
            checks
                .iter()
                .find(|c| c.what.contains(what))
                .unwrap_or_else(|| panic!("no target {what:?}"))
                .verdict()
        };
        // One round lost a connection: not every round holds all of them.
        assert_eq!(verdict("holds all 100"), Verdict::Noise);
        // 5 or 6 threads against 2 workers + 4: every round within.
        assert_eq!(verdict("threads ≤ workers + 4 = 6"), Verdict::Pass);
        assert_eq!(verdict("RSS per connection ≤ 4 KiB"), Verdict::Pass);
        let rss = checks.iter().find(|c| c.what.contains("RSS")).unwrap();
        assert_eq!(rss.band, Some((3000.0 / 4096.0, 3500.0 / 4096.0)));
    }

    #[test]
    fn event_is_set_against_tokio_and_std() {
        let plain = Contender::plain;
        let res: Results = vec![
            (
                Point::Echo(1),
                vec![
                    entry(plain(Kind::Std), &[(100.0, 0.0, 0.0), (100.0, 0.0, 0.0)]),
                    entry(plain(Kind::Event), &[(96.0, 0.0, 0.0), (97.0, 0.0, 0.0)]),
                ],
            ),
            (
                Point::Echo(16),
                vec![
                    entry(plain(Kind::Tokio), &[(100.0, 0.0, 0.0), (100.0, 0.0, 0.0)]),
                    entry(plain(Kind::Event), &[(96.0, 0.0, 0.0), (97.0, 0.0, 0.0)]),
                ],
            ),
        ];
        let checks = targets(&res);
        assert_eq!(checks.len(), 2);
        assert_eq!(checks[0].verdict(), Verdict::Pass, "{}", checks[0].what);
        assert_eq!(checks[1].verdict(), Verdict::Miss, "{}", checks[1].what);
    }
}
