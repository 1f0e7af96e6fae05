//! Turning samples into the results: medians over rounds, the markdown tables (every figure
//! with its ratio to the std baseline), the target checks, and the SVG chart.

use std::fmt::Write as _;

use socketserver::Digest;

use crate::common::median;
use crate::contender::{Contender, Kind, tokio_runtime};
use crate::load::Sample;

/// A scenario at one size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Persistent connections doing round trips.
    Echo(usize),
    /// Client threads looping connect → echo → close.
    Connect(usize),
    /// Idle connections held.
    Idle(usize),
}

impl Point {
    /// The scenario's name: "echo", "connect" or "idle".
    pub fn scenario(&self) -> &'static str {
        match self {
            Point::Echo(_) => "echo",
            Point::Connect(_) => "connect",
            Point::Idle(_) => "idle",
        }
    }

    /// Connections (echo, idle) or client threads (connect).
    pub fn size(&self) -> usize {
        match *self {
            Point::Echo(n) | Point::Connect(n) | Point::Idle(n) => n,
        }
    }
}

/// Everything measured for one contender at one point.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The contender.
    pub contender: Contender,
    /// One sample per successful round.
    pub samples: Vec<Sample>,
    /// Why rounds failed, if any did.
    pub failures: Vec<String>,
}

/// All points, in the order they ran, each with its contenders.
pub type Results = Vec<(Point, Vec<Entry>)>;

/// One pass over every scenario, with the servers pinned to a core or free on all of them.
pub struct Sweep {
    /// True: each server on core 1, the load generator on core 0.
    pub pinned: bool,
    /// What was measured.
    pub results: Results,
    /// Runs measured again because other processes were busy.
    pub reruns: usize,
}

/// "pinned" or "unpinned".
pub fn sweep_name(pinned: bool) -> &'static str {
    if pinned { "pinned" } else { "unpinned" }
}

impl Sweep {
    /// How the servers ran in this sweep, and so which tokio runtime served.
    pub fn title(&self, cores: usize) -> String {
        let runtime = tokio_runtime(self.pinned);
        if self.pinned {
            format!(
                "Pinned: each server on core 1, the load generator on core 0; tokio on a \
                 {runtime} runtime"
            )
        } else {
            format!(
                "Unpinned: servers and load generator free on all {cores} cores; tokio on the \
                 {runtime} runtime"
            )
        }
    }
}

/// The median of each figure over the rounds; errors are summed.
pub fn summary(samples: &[Sample]) -> Option<Sample> {
    if samples.is_empty() {
        return None;
    }
    let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    Some(Sample {
        rate: m(|s| s.rate),
        p50_us: m(|s| s.p50_us),
        p99_us: m(|s| s.p99_us),
        max_us: m(|s| s.max_us),
        errors: samples.iter().map(|s| s.errors).sum(),
        rss_kib: m(|s| s.rss_kib),
        rss_per_conn: m(|s| s.rss_per_conn),
        kernel_slab_per_conn: m(|s| s.kernel_slab_per_conn),
        kernel_stack_per_conn: m(|s| s.kernel_stack_per_conn),
        foreign: m(|s| s.foreign),
        cpu_us_per_op: m(|s| s.cpu_us_per_op),
        nodelay: samples.iter().find_map(|s| s.nodelay),
        threads: m(|s| s.threads),
    })
}

/// The summary of `c` at `point`, if it has one.
pub fn find(res: &Results, point: Point, c: Contender) -> Option<Sample> {
    res.iter()
        .find(|(p, _)| *p == point)?
        .1
        .iter()
        .find(|e| e.contender == c)
        .and_then(|e| summary(&e.samples))
}

/// "143.2k"-style count.
pub fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if x >= 1e3 {
        format!("{:.2}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// A latency given in microseconds.
pub fn fmt_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2} ms", us / 1e3)
    } else if us >= 10.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}

fn fmt_kib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

fn fmt_bytes(b: f64) -> String {
    if b.is_nan() {
        return "n/a (needs root)".into();
    }
    format!("{:.1} KiB", b / 1024.0)
}

fn ratio(x: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!(" ({:.2}×)", x / b),
        _ => String::new(),
    }
}

fn cell(text: String, x: f64, base: Option<f64>) -> String {
    text + &ratio(x, base)
}

const STD: Contender = Contender::plain(Kind::Std);

/// The lowest and the highest value of a figure over the rounds.
pub fn range(samples: &[Sample], f: fn(&Sample) -> f64) -> Option<(f64, f64)> {
    let mut values = samples.iter().map(f);
    let first = values.next()?;
    Some(values.fold((first, first), |(lo, hi), x| (lo.min(x), hi.max(x))))
}

/// A figure's spread over the rounds: its lowest and highest value and the width of that range
/// relative to the median, e.g. "46.3k–58.9k (25%)".
fn fmt_spread(samples: &[Sample], f: fn(&Sample) -> f64, fmt: fn(f64) -> String) -> String {
    match range(samples, f) {
        Some(_) if samples.len() < 2 => "1 round".to_owned(),
        Some((lo, hi)) => {
            let mid = median(samples.iter().map(f).collect());
            let width = if mid > 0.0 { (hi - lo) / mid } else { 0.0 };
            format!("{}–{} ({:.0}%)", fmt(lo), fmt(hi), width * 100.0)
        }
        None => "—".to_owned(),
    }
}

/// One column of a scenario table: its header, and how to fill it from a contender's rounds.
struct Column {
    header: &'static str,
    cell: fn(&Cells) -> String,
}

/// What a table cell can draw on: the contender's median and rounds, the baseline's median.
struct Cells<'a> {
    n: usize,
    s: Sample,
    rounds: &'a [Sample],
    base: Option<Sample>,
}

impl Cells<'_> {
    /// A median with its ratio to the baseline's.
    fn vs_base(&self, f: fn(&Sample) -> f64, fmt: fn(f64) -> String) -> String {
        cell(fmt(f(&self.s)), f(&self.s), self.base.as_ref().map(f))
    }
}

/// The columns of the echo and connect tables: `size` names the connection or client count,
/// `rate` the operations per second.
fn rate_columns(size: &'static str, rate: &'static str) -> Vec<Column> {
    vec![
        Column {
            header: size,
            cell: |c| c.n.to_string(),
        },
        Column {
            header: rate,
            cell: |c| c.vs_base(|s| s.rate, fmt_rate),
        },
        Column {
            header: "spread over rounds",
            cell: |c| fmt_spread(c.rounds, |s| s.rate, fmt_rate),
        },
        Column {
            header: "p50",
            cell: |c| c.vs_base(|s| s.p50_us, fmt_us),
        },
        Column {
            header: "p99",
            cell: |c| c.vs_base(|s| s.p99_us, fmt_us),
        },
        Column {
            header: "max",
            cell: |c| c.vs_base(|s| s.max_us, fmt_us),
        },
        Column {
            header: "errors",
            cell: |c| c.s.errors.to_string(),
        },
        Column {
            header: "server RSS",
            cell: |c| c.vs_base(|s| s.rss_kib, fmt_kib),
        },
        Column {
            header: "server CPU / op",
            cell: |c| c.vs_base(|s| s.cpu_us_per_op, fmt_us),
        },
    ]
}

/// The columns of the idle table.
fn idle_columns() -> Vec<Column> {
    vec![
        Column {
            header: "held",
            cell: |c| format!("{:.0} of {}", c.s.rate, c.n),
        },
        Column {
            header: "errors",
            cell: |c| c.s.errors.to_string(),
        },
        Column {
            header: "server RSS",
            cell: |c| c.vs_base(|s| s.rss_kib, fmt_kib),
        },
        Column {
            header: "RSS per connection",
            cell: |c| c.vs_base(|s| s.rss_per_conn, fmt_bytes),
        },
        Column {
            header: "spread over rounds",
            cell: |c| fmt_spread(c.rounds, |s| s.rss_per_conn, fmt_bytes),
        },
        Column {
            header: "kernel slab per connection",
            cell: |c| c.vs_base(|s| s.kernel_slab_per_conn, fmt_bytes),
        },
        Column {
            header: "kernel stacks per connection",
            cell: |c| c.vs_base(|s| s.kernel_stack_per_conn, fmt_bytes),
        },
        Column {
            header: "server threads",
            cell: |c| format!("{:.0}", c.s.threads),
        },
        Column {
            header: "check p50",
            cell: |c| c.vs_base(|s| s.p50_us, fmt_us),
        },
        Column {
            header: "check p99",
            cell: |c| c.vs_base(|s| s.p99_us, fmt_us),
        },
        Column {
            header: "check max",
            cell: |c| c.vs_base(|s| s.max_us, fmt_us),
        },
    ]
}

/// A contender's name in a sweep's tables: tokio's says which runtime served.
fn row_label(c: &Contender, pinned: bool) -> String {
    match c.kind {
        Kind::Tokio => format!("{} ({})", c.label(), tokio_runtime(pinned)),
        _ => c.label(),
    }
}

/// A sweep's markdown tables, one per scenario, under `level` headings.
pub fn tables(sweep: &Sweep, level: &str) -> String {
    let res = &sweep.results;
    let mut out = String::new();
    for name in ["echo", "connect", "idle"] {
        let points: Vec<_> = res.iter().filter(|(p, _)| p.scenario() == name).collect();
        if points.is_empty() {
            continue;
        }
        let (title, columns) = match name {
            "echo" => (
                "Echo: 64-byte round trips on persistent connections",
                rate_columns("conns", "round trips/s"),
            ),
            "connect" => (
                "Connect: connect → [handshake] → 64-byte echo → close",
                rate_columns("clients", "connections/s"),
            ),
            _ => (
                "Idle capacity: connections held, then each checked to echo",
                idle_columns(),
            ),
        };
        let headers: Vec<&str> = columns.iter().map(|c| c.header).collect();
        let _ = writeln!(out, "{level} {title}\n");
        let _ = writeln!(out, "| contender | {} |", headers.join(" | "));
        let _ = writeln!(out, "|---|{}", "--:|".repeat(columns.len()));
        for (point, entries) in points {
            let base = find(res, *point, STD);
            for e in entries {
                let label = row_label(&e.contender, sweep.pinned);
                let Some(s) = summary(&e.samples) else {
                    let why = e.failures.first().map_or("no data", String::as_str);
                    let why = why.lines().next().unwrap_or("").replace('|', "/");
                    let _ = writeln!(
                        out,
                        "| {label} | failed: {why} |{}",
                        " |".repeat(columns.len() - 1)
                    );
                    continue;
                };
                let cells = Cells {
                    n: point.size(),
                    s,
                    rounds: &e.samples,
                    base: base.clone(),
                };
                let row: Vec<String> = columns.iter().map(|c| (c.cell)(&cells)).collect();
                let _ = writeln!(out, "| {label} | {} |", row.join(" | "));
            }
        }
        out.push('\n');
    }
    out
}

/// Each round's figures, the data behind every median, spread and target: round trips or
/// connections per second (and, for echo, the p99 latency), or RSS per idle connection.
pub fn raw_rounds(sweep: &Sweep) -> String {
    let mut out = String::new();
    for (point, entries) in &sweep.results {
        let (name, unit) = match point {
            Point::Echo(n) => (format!("echo {n} conns"), "round trips/s, p99 latency"),
            Point::Connect(n) => (format!("connect {n} clients"), "connections/s"),
            Point::Idle(n) => (format!("idle {n}"), "RSS per connection"),
        };
        let _ = writeln!(out, "- {name} ({unit}):");
        for e in entries {
            let vals: Vec<String> = e
                .samples
                .iter()
                .map(|s| {
                    let v = match point {
                        Point::Echo(_) => format!("{} ({})", fmt_rate(s.rate), fmt_us(s.p99_us)),
                        Point::Connect(_) => fmt_rate(s.rate),
                        Point::Idle(_) => fmt_bytes(s.rss_per_conn),
                    };
                    if s.foreign >= crate::BUSY {
                        format!("{v} (busy machine: {:.0}%)", s.foreign * 100.0)
                    } else {
                        v
                    }
                })
                .collect();
            let label = row_label(&e.contender, sweep.pinned);
            let _ = writeln!(out, "  - {label}: {}", vals.join(", "));
        }
    }
    out
}

/// Whether `c` had TCP_NODELAY on the connections it accepted, over every run of every sweep:
/// "yes", "no", "mixed", or "unknown" when the server's sockets could not be read.
pub fn nodelay(sweeps: &[Sweep], c: Contender) -> &'static str {
    let seen: Vec<bool> = sweeps
        .iter()
        .flat_map(|s| &s.results)
        .flat_map(|(_, entries)| entries)
        .filter(|e| e.contender == c)
        .flat_map(|e| e.samples.iter().filter_map(|s| s.nodelay))
        .collect();
    match (seen.contains(&true), seen.contains(&false)) {
        (true, false) => "yes",
        (false, true) => "no",
        (true, true) => "mixed",
        (false, false) => "unknown",
    }
}

/// The median and the largest share of the benchmark cores that other processes took during
/// a run.
pub fn interference(res: &Results) -> (f64, f64) {
    let all: Vec<f64> = res
        .iter()
        .flat_map(|(_, e)| e.iter().flat_map(|e| e.samples.iter().map(|s| s.foreign)))
        .collect();
    let max = all.iter().copied().fold(0.0, f64::max);
    (median(all), max)
}

/// What a target check concludes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every round clears the bound: the worst ratio the rounds allow still meets it.
    Pass,
    /// Every round misses the bound: the best ratio the rounds allow still falls short.
    Miss,
    /// The rounds' range straddles the bound: the margin is smaller than the spread.
    Noise,
    /// One round only: no spread was measured, so no verdict.
    OneRound,
    /// A figure is missing.
    Missing,
}

impl Verdict {
    /// How the verdict reads in the tables.
    pub fn text(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Miss => "MISS",
            Verdict::Noise => "within noise",
            Verdict::OneRound => "1 round: no spread",
            Verdict::Missing => "n/a",
        }
    }
}

/// One target: a ratio of two measured figures (A / B) against a bound.
pub struct Check {
    /// What is checked.
    pub what: String,
    /// The ratio of the medians, if both figures exist.
    pub ratio: Option<f64>,
    /// The range the rounds allow for the ratio: lowest A / highest B to highest A / lowest B.
    pub band: Option<(f64, f64)>,
    /// The fewer rounds of A's and B's.
    pub rounds: usize,
    /// The bound.
    pub bound: f64,
    /// True: the ratio must be at least the bound; false: at most.
    pub at_least: bool,
}

impl Check {
    /// Compares figure `f` of `a`'s rounds with `b`'s against `bound`.
    pub fn new(
        what: String,
        a: &[Sample],
        b: &[Sample],
        f: fn(&Sample) -> f64,
        bound: f64,
        at_least: bool,
    ) -> Check {
        let med = |v: &[Sample]| median(v.iter().map(f).collect());
        let ratio = (!a.is_empty() && !b.is_empty() && med(b) > 0.0).then(|| med(a) / med(b));
        let band = match (range(a, f), range(b, f)) {
            (Some((a_lo, a_hi)), Some((b_lo, b_hi))) if b_lo > 0.0 => {
                Some((a_lo / b_hi, a_hi / b_lo))
            }
            _ => None,
        };
        Check {
            what,
            ratio: ratio.filter(|_| band.is_some()),
            band,
            rounds: a.len().min(b.len()),
            bound,
            at_least,
        }
    }

    /// PASS only when the whole range the rounds allow clears the bound, MISS only when all of
    /// it misses; otherwise the margin is within the measured spread.
    pub fn verdict(&self) -> Verdict {
        let (Some(_), Some((lo, hi))) = (self.ratio, self.band) else {
            return Verdict::Missing;
        };
        if self.rounds < 2 {
            return Verdict::OneRound;
        }
        let (clears, misses) = if self.at_least {
            (lo >= self.bound, hi < self.bound)
        } else {
            (hi <= self.bound, lo > self.bound)
        };
        match (clears, misses) {
            (true, _) => Verdict::Pass,
            (_, true) => Verdict::Miss,
            _ => Verdict::Noise,
        }
    }

    /// How far the median ratio is past the bound: positive is room to spare.
    pub fn margin(&self) -> Option<f64> {
        let r = self.ratio?;
        Some(if self.at_least {
            r / self.bound - 1.0
        } else {
            self.bound / r - 1.0
        })
    }
}

/// The rounds of `c` at `point` (empty if it has none).
pub(crate) fn rounds(res: &Results, point: Point, c: Contender) -> &[Sample] {
    res.iter()
        .find(|(p, _)| *p == point)
        .and_then(|(_, e)| e.iter().find(|e| e.contender == c))
        .map_or(&[], |e| &e.samples)
}

/// Evaluates the project's targets on the rounds.
pub fn targets(res: &Results) -> Vec<Check> {
    let std_pool = Contender::plain(Kind::StdPool);
    let thread = Contender::plain(Kind::Thread);
    let pool = Contender::plain(Kind::Pool);
    let tokio = Contender::plain(Kind::Tokio);
    let rate: fn(&Sample) -> f64 = |s| s.rate;
    let mut out = Vec::new();
    let mut check = |what: String, point, a, b, f, bound, at_least| {
        let (a, b) = (rounds(res, point, a), rounds(res, point, b));
        out.push(Check::new(what, a, b, f, bound, at_least));
    };
    let points = |scenario: &str| -> Vec<Point> {
        res.iter()
            .map(|(p, _)| *p)
            .filter(|p| p.scenario() == scenario)
            .collect()
    };
    for point in points("echo") {
        let n = point.size();
        for c in [thread, pool] {
            let l = c.label();
            let what = format!("echo {n} conns: {l} round trips/s ≥ 0.95 × std");
            check(what, point, c, STD, rate, 0.95, true);
            let what = format!("echo {n} conns: {l} round trips/s ≥ tokio");
            check(what, point, c, tokio, rate, 1.0, true);
        }
    }
    for point in points("connect") {
        let n = point.size();
        // Against a thread spawned per connection, and against the fair peer: a std pool of
        // the same size, pre-spawned too.
        for base in [STD, std_pool] {
            let what = format!("connect {n} clients: {} ≥ {}", pool.label(), base.label());
            check(what, point, pool, base, rate, 1.0, true);
        }
        for base in [pool, thread] {
            for d in [Digest::Md5, Digest::Sha256] {
                let with = Contender::with_auth(base.kind, d);
                let what = format!(
                    "connect {n} clients: {} ≥ 0.9 × {}",
                    with.label(),
                    base.label()
                );
                check(what, point, with, base, rate, 0.9, true);
            }
        }
    }
    for point in points("connect") {
        // The PROXY stage (a v2 header read per connection) must not cost a measurable share.
        let n = point.size();
        let with = Contender::plain(Kind::ThreadProxy);
        let what = format!(
            "connect {n} clients: {} ≥ 0.95 × {}",
            with.label(),
            thread.label()
        );
        check(what, point, with, thread, rate, 0.95, true);
    }
    for point in points("idle") {
        let n = point.size();
        // The same design with the same buffer: the crate's bookkeeping should cost at most a
        // twentieth more per connection (the mirror of echo's 0.95 × std); and tokio, whose
        // task per connection a thread's stack pages cannot match.
        for (base, bound, times) in [(STD, 1.05, "1.05 × "), (tokio, 1.0, "")] {
            let what = format!(
                "idle {n}: {} RSS per connection ≤ {times}{}",
                thread.label(),
                base.label()
            );
            check(what, point, thread, base, |s| s.rss_per_conn, bound, false);
        }
    }
    for point in points("echo").into_iter().filter(|p| p.size() == 128) {
        for c in [thread, pool] {
            let what = format!("echo 128 conns: {} p99 latency ≤ std", c.label());
            check(what, point, c, STD, |s| s.p99_us, 1.0, false);
        }
    }
    // Issue 16: isolation in processes must not cost throughput (judged on the unpinned
    // sweep, where the two workers have the two cores).
    let prefork = Contender::plain(Kind::Prefork);
    let prefork_points = points("echo")
        .into_iter()
        .filter(|p| p.size() == 128)
        .chain(points("connect"));
    for point in prefork_points {
        let what = format!(
            "{} {}: {} ≥ 0.95 × {}",
            point.scenario(),
            point.size(),
            prefork.label(),
            thread.label()
        );
        check(what, point, prefork, thread, rate, 0.95, true);
    }
    out.extend(crate::targets_event::targets(res));
    out.extend(crate::targets_metrics::targets(res));
    out
}

/// The targets as a markdown table, with one group of columns per set of checks (pinned,
/// unpinned); every set holds the same targets in the same order.
pub fn targets_table(sets: &[(&str, &[Check])]) -> String {
    let mut out = String::from("| target |");
    let mut rule = String::from("|---|");
    for (name, _) in sets {
        let _ = write!(
            out,
            " {name}: ratio (margin) | {name}: range over rounds | {name} |"
        );
        rule.push_str("--:|--:|:-:|");
    }
    let _ = writeln!(out, "\n{rule}");
    let Some((_, first)) = sets.first() else {
        return out;
    };
    for (i, c) in first.iter().enumerate() {
        let _ = write!(out, "| {} |", c.what);
        for (_, checks) in sets {
            let Some(c) = checks.get(i) else { continue };
            let ratio = match (c.ratio, c.margin()) {
                (Some(r), Some(m)) => format!("{r:.2} ({:+.0}%)", m * 100.0),
                _ => "—".to_owned(),
            };
            let band = match c.band {
                Some((lo, hi)) if c.ratio.is_some() => format!("{lo:.2}–{hi:.2}"),
                _ => "—".to_owned(),
            };
            let _ = write!(out, " {ratio} | {band} | {} |", c.verdict().text());
        }
        out.push('\n');
    }
    out
}

fn color(c: &Contender) -> &'static str {
    match c.kind {
        Kind::Std => "#7f7f7f",
        Kind::StdPool => "#bdbdbd",
        Kind::Tokio => "#e6550d",
        Kind::Thread => "#1f77b4",
        Kind::Pool => "#6baed6",
        Kind::Python => "#2ca02c",
        Kind::ThreadProxy => "#c5b0d5",
        Kind::Event => "#08306b",
        Kind::NetIo => "#9467bd",
        Kind::Prefork => "#8c564b",
        Kind::Metrics => "#17becf",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A rounded-up axis maximum and its tick step.
fn axis(max: f64) -> (f64, f64) {
    if max <= 0.0 {
        return (1.0, 0.2);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

/// One panel of the chart: a sweep's echo results under its own subtitle.
pub struct Panel<'a> {
    /// What the panel shows (pinning, tokio runtime, rounds, quietness).
    pub subtitle: String,
    /// The sweep's results; only the echo points are drawn.
    pub results: &'a Results,
}

/// Grouped bar charts of echo round trips/s by connection count, one bar per contender (its
/// median) with a whisker over its rounds' range; one panel per sweep, on a common scale, under
/// the chart's title and `subtitle`.
pub fn svg(subtitle: &str, panels: &[Panel]) -> String {
    let echo_points = |res: &Results| -> Vec<usize> {
        res.iter()
            .filter_map(|(p, _)| match p {
                Point::Echo(n) => Some(*n),
                _ => None,
            })
            .collect()
    };
    let mut contenders: Vec<Contender> = Vec::new();
    for (p, entries) in panels.iter().flat_map(|p| p.results) {
        for e in entries.iter().filter(|_| matches!(p, Point::Echo(_))) {
            if !contenders.contains(&e.contender) {
                contenders.push(e.contender);
            }
        }
    }
    let max = panels
        .iter()
        .flat_map(|p| p.results.iter())
        .flat_map(|(_, entries)| entries.iter())
        .filter_map(|e| range(&e.samples, |s| s.rate))
        .fold(0.0, |m: f64, (_, hi)| m.max(hi));
    // Room above the highest whisker for its label.
    let (top, step) = axis(max * 1.08);
    let (w, ph) = (820.0, 290.0);
    let (left, right, head, legend, panel_head, panel_foot) = (80.0, 20.0, 52.0, 26.0, 26.0, 40.0);
    let pw = w - left - right;
    let panel_h = panel_head + ph + panel_foot;
    let h = head + legend + panel_h * panels.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="17" text-anchor="middle" font-weight="bold">Echo round trips per second (64 bytes, loopback) — higher is better</text>"#,
        w / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="44" font-size="12" text-anchor="middle" fill="#555">{}</text>"##,
        w / 2.0,
        esc(subtitle)
    );
    // Legend.
    let mut lx = left;
    let ly = head + 8.0;
    for c in &contenders {
        let label = esc(&c.label());
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{ly}" width="12" height="12" fill="{}"/><text x="{}" y="{}" font-size="12">{label}</text>"#,
            color(c),
            lx + 16.0,
            ly + 11.0
        );
        lx += 16.0 + 7.5 * c.label().chars().count() as f64 + 18.0;
    }
    for (pi, panel) in panels.iter().enumerate() {
        let upper = head + legend + pi as f64 * panel_h + panel_head;
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" font-size="12" text-anchor="middle" fill="#333">{}</text>"##,
            left + pw / 2.0,
            upper - 10.0,
            esc(&panel.subtitle)
        );
        // Axes and grid.
        let mut t = 0.0;
        while t <= top + step / 2.0 {
            let y = upper + ph - t / top * ph;
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
                left + pw,
                left - 6.0,
                y + 4.0,
                if t >= 1e3 {
                    format!("{}k", t / 1e3)
                } else {
                    format!("{t}")
                }
            );
            t += step;
        }
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{upper}" x2="{left}" y2="{}" stroke="#333"/><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#333"/>"##,
            upper + ph,
            upper + ph,
            left + pw,
            upper + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 18 {})">round trips / s</text>"#,
            upper + ph / 2.0,
            upper + ph / 2.0
        );
        // Bars and whiskers.
        let groups = echo_points(panel.results);
        let gw = pw / groups.len().max(1) as f64;
        let bw = (gw * 0.8) / contenders.len().max(1) as f64;
        let y_of = |v: f64| upper + ph - v / top * ph;
        for (gi, n) in groups.iter().enumerate() {
            let gx = left + gi as f64 * gw + gw * 0.1;
            for (ci, c) in contenders.iter().enumerate() {
                let samples = rounds(panel.results, Point::Echo(*n), *c);
                let (Some(v), Some((lo, hi))) =
                    (summary(samples).map(|m| m.rate), range(samples, |s| s.rate))
                else {
                    continue;
                };
                let x = gx + ci as f64 * bw;
                let mid = x + bw / 2.0;
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {:.0} round trips/s (rounds {:.0}–{:.0})</title></rect>"#,
                    x + 1.0,
                    y_of(v),
                    bw - 2.0,
                    v / top * ph,
                    color(c),
                    esc(&c.label()),
                    v,
                    lo,
                    hi
                );
                if samples.len() > 1 {
                    let cap = (bw / 4.0).min(5.0);
                    let _ = writeln!(
                        s,
                        r##"<path d="M{:.1} {:.1}H{:.1}M{mid:.1} {:.1}V{:.1}M{:.1} {:.1}H{:.1}" stroke="#222" fill="none"/>"##,
                        mid - cap,
                        y_of(lo),
                        mid + cap,
                        y_of(lo),
                        y_of(hi),
                        mid - cap,
                        y_of(hi),
                        mid + cap
                    );
                }
                let _ = writeln!(
                    s,
                    r#"<text x="{mid:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                    y_of(v.max(hi)) - 4.0,
                    fmt_rate(v)
                );
            }
            let label = if *n == 1 {
                "1 connection".to_owned()
            } else {
                format!("{n} connections")
            };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" font-size="13" text-anchor="middle">{label}</text>"#,
                left + gi as f64 * gw + gw / 2.0,
                upper + ph + 22.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rate: f64, errors: u64) -> Sample {
        Sample {
            rate,
            errors,
            ..Sample::default()
        }
    }

    #[test]
    fn summary_takes_medians_and_sums_errors() {
        let s = summary(&[sample(3.0, 1), sample(1.0, 0), sample(2.0, 2)]).unwrap();
        assert_eq!(s.rate, 2.0);
        assert_eq!(s.errors, 3);
        assert_eq!(median(vec![1.0, 4.0]), 2.5);
        assert!(summary(&[]).is_none());
    }

    fn rates(v: &[f64]) -> Vec<Sample> {
        v.iter().map(|&r| sample(r, 0)).collect()
    }

    #[test]
    fn verdicts_need_the_whole_range_past_the_bound() {
        let check = |a: &[f64], b: &[f64], at_least| {
            Check::new(
                String::new(),
                &rates(a),
                &rates(b),
                |s| s.rate,
                0.95,
                at_least,
            )
        };
        // Every round of A over 0.95 × every round of B.
        let c = check(&[100.0, 98.0, 99.0], &[100.0, 101.0, 102.0], true);
        assert_eq!(c.band, Some((98.0 / 102.0, 1.0)));
        assert_eq!(c.verdict(), Verdict::Pass);
        // The median ratio clears the bound, but the rounds' range straddles it.
        let c = check(&[100.0, 90.0, 99.0], &[100.0, 101.0, 102.0], true);
        assert!(c.ratio.unwrap() > 0.95);
        assert_eq!(c.verdict(), Verdict::Noise);
        // Every round short of the bound.
        assert_eq!(
            check(&[80.0, 85.0], &[100.0, 99.0], true).verdict(),
            Verdict::Miss
        );
        // At most: lower is better.
        assert_eq!(
            check(&[80.0, 85.0], &[100.0, 99.0], false).verdict(),
            Verdict::Pass
        );
        assert_eq!(
            check(&[100.0, 101.0], &[100.0, 99.0], false).verdict(),
            Verdict::Miss
        );
        // A single round measures no spread; a missing figure gives nothing.
        assert_eq!(check(&[100.0], &[50.0], true).verdict(), Verdict::OneRound);
        assert_eq!(check(&[], &[50.0, 60.0], true).verdict(), Verdict::Missing);
        // Equal to the bound with no spread at all (idle memory repeats exactly): it holds.
        assert_eq!(
            check(&[95.0, 95.0], &[100.0, 100.0], true).verdict(),
            Verdict::Pass
        );
    }

    #[test]
    fn spreads_show_the_range_and_its_width() {
        let s = rates(&[46_300.0, 58_900.0, 50_500.0]);
        assert_eq!(fmt_spread(&s, |s| s.rate, fmt_rate), "46.3k–58.9k (25%)");
        assert_eq!(fmt_spread(&s[..1], |s| s.rate, fmt_rate), "1 round");
        assert_eq!(range(&[], |s| s.rate), None);
    }

    #[test]
    fn targets_use_the_std_baseline() {
        let entry = |kind, rates_: &[f64]| Entry {
            contender: Contender::plain(kind),
            samples: rates(rates_),
            failures: Vec::new(),
        };
        let res: Results = vec![(
            Point::Echo(16),
            vec![
                entry(Kind::Std, &[100.0, 100.0]),
                entry(Kind::Tokio, &[110.0, 112.0]),
                entry(Kind::Thread, &[96.0, 97.0]),
            ],
        )];
        let checks = targets(&res);
        let find = |what: &str| checks.iter().find(|c| c.what == what).unwrap();
        let vs_std = find("echo 16 conns: socketserver thread round trips/s ≥ 0.95 × std");
        assert_eq!(vs_std.verdict(), Verdict::Pass);
        let vs_tokio = find("echo 16 conns: socketserver thread round trips/s ≥ tokio");
        assert_eq!(vs_tokio.verdict(), Verdict::Miss);
        let table = targets_table(&[("pinned", &checks)]);
        assert!(
            table.contains("| 0.87 (-13%) | 0.86–0.88 | MISS |"),
            "{table}"
        );
        let sweep = Sweep {
            pinned: true,
            results: res,
            reruns: 0,
        };
        let t = tables(&sweep, "###");
        assert!(
            t.contains("| socketserver thread | 16 | 96 (0.96×) | 96–97 (1%) |"),
            "{t}"
        );
        assert!(t.contains("| tokio (current-thread) | 16 |"), "{t}");
        let chart = svg(
            "test",
            &[Panel {
                subtitle: "test".into(),
                results: &sweep.results,
            }],
        );
        assert!(
            chart.starts_with("<svg") && chart.contains("<path"),
            "{chart}"
        );
    }

    #[test]
    fn axis_rounds_up_to_a_tidy_step() {
        assert_eq!(axis(143_000.0), (150_000.0, 50_000.0));
        assert_eq!(axis(117_500.0), (125_000.0, 25_000.0));
        assert_eq!(axis(9.0), (10.0, 2.0));
    }
}
