//! Turning samples into the results: medians over rounds, the markdown tables (every figure
//! with its ratio to the std baseline), the target checks, and the SVG chart.

use std::fmt::Write as _;

use socketserver::Digest;

use crate::contender::{Contender, Kind};
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

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
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
        foreign: m(|s| s.foreign),
        cpu_us_per_op: m(|s| s.cpu_us_per_op),
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

/// The markdown tables, one per scenario.
pub fn tables(res: &Results) -> String {
    let mut out = String::new();
    for name in ["echo", "connect", "idle"] {
        let points: Vec<_> = res.iter().filter(|(p, _)| p.scenario() == name).collect();
        if points.is_empty() {
            continue;
        }
        match name {
            "echo" => {
                out.push_str("### Echo: 64-byte round trips on persistent connections\n\n");
                out.push_str("| contender | conns | round trips/s | p50 | p99 | max | errors | server RSS | server CPU / op |\n");
                out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|\n");
            }
            "connect" => {
                out.push_str("### Connect: connect → [handshake] → 64-byte echo → close\n\n");
                out.push_str("| contender | clients | connections/s | p50 | p99 | max | errors | server RSS | server CPU / op |\n");
                out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|\n");
            }
            _ => {
                out.push_str("### Idle capacity: connections held, then each checked to echo\n\n");
                out.push_str("| contender | held | errors | server RSS | RSS per connection | check p50 | check p99 | check max |\n");
                out.push_str("|---|--:|--:|--:|--:|--:|--:|--:|\n");
            }
        }
        for (point, entries) in points {
            let n = point.size();
            let base = find(res, *point, STD);
            for e in entries {
                let label = e.contender.label();
                let Some(s) = summary(&e.samples) else {
                    let why = e.failures.first().map_or("no data", String::as_str);
                    let why = why.lines().next().unwrap_or("").replace('|', "/");
                    let blanks = if name == "idle" { 6 } else { 7 };
                    let _ = writeln!(
                        out,
                        "| {label} | {n} | failed: {why} |{}",
                        " |".repeat(blanks)
                    );
                    continue;
                };
                let b = |f: fn(&Sample) -> f64| base.as_ref().map(f);
                let row = if name == "idle" {
                    vec![
                        label,
                        format!("{:.0} of {n}", s.rate),
                        s.errors.to_string(),
                        cell(fmt_kib(s.rss_kib), s.rss_kib, b(|s| s.rss_kib)),
                        cell(
                            fmt_bytes(s.rss_per_conn),
                            s.rss_per_conn,
                            b(|s| s.rss_per_conn),
                        ),
                        cell(fmt_us(s.p50_us), s.p50_us, b(|s| s.p50_us)),
                        cell(fmt_us(s.p99_us), s.p99_us, b(|s| s.p99_us)),
                        cell(fmt_us(s.max_us), s.max_us, b(|s| s.max_us)),
                    ]
                } else {
                    vec![
                        label,
                        n.to_string(),
                        cell(fmt_rate(s.rate), s.rate, b(|s| s.rate)),
                        cell(fmt_us(s.p50_us), s.p50_us, b(|s| s.p50_us)),
                        cell(fmt_us(s.p99_us), s.p99_us, b(|s| s.p99_us)),
                        cell(fmt_us(s.max_us), s.max_us, b(|s| s.max_us)),
                        s.errors.to_string(),
                        cell(fmt_kib(s.rss_kib), s.rss_kib, b(|s| s.rss_kib)),
                        cell(
                            fmt_us(s.cpu_us_per_op),
                            s.cpu_us_per_op,
                            b(|s| s.cpu_us_per_op),
                        ),
                    ]
                };
                let _ = writeln!(out, "| {} |", row.join(" | "));
            }
        }
        out.push('\n');
    }
    out
}

/// Each round's rate (or RSS per connection, for idle), to show the spread behind a median.
pub fn raw_rounds(res: &Results) -> String {
    let mut out = String::new();
    for (point, entries) in res {
        let (name, unit) = match point {
            Point::Echo(n) => (format!("echo {n} conns"), "round trips/s"),
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
                        Point::Idle(_) => fmt_bytes(s.rss_per_conn),
                        _ => fmt_rate(s.rate),
                    };
                    if s.foreign >= crate::BUSY {
                        format!("{v} (busy machine: {:.0}%)", s.foreign * 100.0)
                    } else {
                        v
                    }
                })
                .collect();
            let _ = writeln!(out, "  - {}: {}", e.contender.label(), vals.join(", "));
        }
    }
    out
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

/// One target: a ratio of two measured figures against a bound.
pub struct Check {
    /// What is checked.
    pub what: String,
    /// The measured ratio, if both figures exist.
    pub ratio: Option<f64>,
    /// The bound.
    pub bound: f64,
    /// True: the ratio must be at least the bound; false: at most.
    pub at_least: bool,
}

impl Check {
    /// "PASS", "MISS" or "n/a".
    pub fn verdict(&self) -> &'static str {
        match self.ratio {
            None => "n/a",
            Some(r)
                if (self.at_least && r >= self.bound) || (!self.at_least && r <= self.bound) =>
            {
                "PASS"
            }
            Some(_) => "MISS",
        }
    }
}

/// Evaluates the issue's targets on the medians.
pub fn targets(res: &Results) -> Vec<Check> {
    let thread = Contender::plain(Kind::Thread);
    let pool = Contender::plain(Kind::Pool);
    let tokio = Contender::plain(Kind::Tokio);
    let mut out = Vec::new();
    let mut check = |what: String, a: Option<f64>, b: Option<f64>, bound: f64, at_least| {
        let ratio = match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        out.push(Check {
            what,
            ratio,
            bound,
            at_least,
        });
    };
    let get = |p: Point, c: Contender, f: fn(&Sample) -> f64| find(res, p, c).map(|s| f(&s));
    for (point, _) in res {
        let Point::Echo(n) = *point else { continue };
        for c in [thread, pool] {
            let l = c.label();
            let rate = get(*point, c, |s| s.rate);
            check(
                format!("echo {n} conns: {l} round trips/s ≥ 0.95 × std"),
                rate,
                get(*point, STD, |s| s.rate),
                0.95,
                true,
            );
            check(
                format!("echo {n} conns: {l} round trips/s ≥ tokio"),
                rate,
                get(*point, tokio, |s| s.rate),
                1.0,
                true,
            );
        }
    }
    for (point, _) in res {
        let Point::Connect(n) = *point else { continue };
        let rate = |c| get(*point, c, |s| s.rate);
        // Against a thread spawned per connection, and against the fair peer: a std pool of
        // the same size, pre-spawned too.
        for base in [STD, Contender::plain(Kind::StdPool)] {
            check(
                format!("connect {n} clients: {} ≥ {}", pool.label(), base.label()),
                rate(pool),
                rate(base),
                1.0,
                true,
            );
        }
        for base in [pool, thread] {
            for d in [Digest::Md5, Digest::Sha256] {
                let with = Contender::with_auth(base.kind, d);
                check(
                    format!(
                        "connect {n} clients: {} ≥ 0.9 × {}",
                        with.label(),
                        base.label()
                    ),
                    rate(with),
                    rate(base),
                    0.9,
                    true,
                );
            }
        }
    }
    for (point, _) in res {
        let Point::Idle(n) = *point else { continue };
        check(
            format!("idle {n}: {} server RSS ≤ tokio", thread.label()),
            get(*point, thread, |s| s.rss_kib),
            get(*point, tokio, |s| s.rss_kib),
            1.0,
            false,
        );
    }
    for (point, _) in res {
        let Point::Echo(n) = *point else { continue };
        if n != 128 {
            continue;
        }
        for c in [thread, pool] {
            check(
                format!("echo {n} conns: {} p99 latency ≤ std", c.label()),
                get(*point, c, |s| s.p99_us),
                get(*point, STD, |s| s.p99_us),
                1.0,
                false,
            );
        }
    }
    out
}

/// The targets as a markdown table.
pub fn targets_table(checks: &[Check]) -> String {
    let mut out = String::from(
        "| target | measured ratio | margin to the bound | result |\n|---|--:|--:|:-:|\n",
    );
    for c in checks {
        let r = c.ratio.map_or("—".to_owned(), |r| format!("{r:.2}"));
        // How far past the bound, in percent: positive is room to spare, negative a shortfall.
        let margin = c.ratio.map_or("—".to_owned(), |r| {
            let m = if c.at_least {
                r / c.bound - 1.0
            } else {
                c.bound / r - 1.0
            };
            format!("{:+.0}%", m * 100.0)
        });
        let _ = writeln!(out, "| {} | {r} | {margin} | {} |", c.what, c.verdict());
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

/// A grouped bar chart of echo round trips/s by connection count, one bar per contender.
pub fn svg(res: &Results, subtitle: &str) -> String {
    let groups: Vec<(usize, &Vec<Entry>)> = res
        .iter()
        .filter_map(|(p, e)| match p {
            Point::Echo(n) => Some((*n, e)),
            _ => None,
        })
        .collect();
    let mut contenders: Vec<Contender> = Vec::new();
    for (_, entries) in &groups {
        for e in entries.iter() {
            if !contenders.contains(&e.contender) {
                contenders.push(e.contender);
            }
        }
    }
    let value = |n: usize, c: Contender| find(res, Point::Echo(n), c).map(|s| s.rate);
    let max = groups
        .iter()
        .flat_map(|(n, _)| contenders.iter().filter_map(move |c| value(*n, *c)))
        .fold(0.0, f64::max);
    let (top, step) = axis(max);
    let (w, h) = (820.0, 440.0);
    let (left, right, upper, lower) = (80.0, 20.0, 90.0, 60.0);
    let (pw, ph) = (w - left - right, h - upper - lower);
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
    for c in &contenders {
        let label = esc(&c.label());
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="58" width="12" height="12" fill="{}"/><text x="{}" y="69" font-size="12">{label}</text>"#,
            color(c),
            lx + 16.0
        );
        lx += 16.0 + 7.5 * c.label().chars().count() as f64 + 18.0;
    }
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
    // Bars.
    let gw = pw / groups.len().max(1) as f64;
    let bw = (gw * 0.8) / contenders.len().max(1) as f64;
    for (gi, (n, _)) in groups.iter().enumerate() {
        let gx = left + gi as f64 * gw + gw * 0.1;
        for (ci, c) in contenders.iter().enumerate() {
            let Some(v) = value(*n, *c) else { continue };
            let bh = v / top * ph;
            let x = gx + ci as f64 * bw;
            let y = upper + ph - bh;
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" fill="{}"><title>{}: {:.0} round trips/s</title></rect>"#,
                x + 1.0,
                bw - 2.0,
                color(c),
                esc(&c.label()),
                v
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                x + bw / 2.0,
                y - 4.0,
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

    #[test]
    fn checks_compare_against_their_bound() {
        let check = |ratio, at_least| Check {
            what: String::new(),
            ratio,
            bound: 0.95,
            at_least,
        };
        assert_eq!(check(Some(0.95), true).verdict(), "PASS");
        assert_eq!(check(Some(0.94), true).verdict(), "MISS");
        assert_eq!(check(Some(0.90), false).verdict(), "PASS");
        assert_eq!(check(None, true).verdict(), "n/a");
    }

    #[test]
    fn targets_use_the_std_baseline() {
        let entry = |kind, rate| Entry {
            contender: Contender::plain(kind),
            samples: vec![sample(rate, 0)],
            failures: Vec::new(),
        };
        let res: Results = vec![(
            Point::Echo(16),
            vec![
                entry(Kind::Std, 100.0),
                entry(Kind::Tokio, 110.0),
                entry(Kind::Thread, 96.0),
            ],
        )];
        let checks = targets(&res);
        let thread_vs_std = checks
            .iter()
            .find(|c| c.what == "echo 16 conns: socketserver thread round trips/s ≥ 0.95 × std")
            .unwrap();
        assert_eq!(thread_vs_std.verdict(), "PASS");
        let thread_vs_tokio = checks
            .iter()
            .find(|c| c.what == "echo 16 conns: socketserver thread round trips/s ≥ tokio")
            .unwrap();
        assert_eq!(thread_vs_tokio.verdict(), "MISS");
        assert!(tables(&res).contains("96 (0.96×)"));
        assert!(svg(&res, "test").starts_with("<svg"));
    }

    #[test]
    fn axis_rounds_up_to_a_tidy_step() {
        assert_eq!(axis(143_000.0), (150_000.0, 50_000.0));
        assert_eq!(axis(117_500.0), (125_000.0, 25_000.0));
        assert_eq!(axis(9.0), (10.0, 2.0));
    }
}
