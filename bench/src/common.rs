//! What both benchmark programs (the main one and `tls_bench`) state and compute alike: the rule
//! by which a target is judged, the median of rounds, the date of a run.

/// How the targets are judged, for the results.
pub const TARGETS_RULE: &str = "Each target compares a figure of A with the same figure of B. The \
ratio is that of their medians, with its margin to the bound; the range is what the rounds \
allow, from A's lowest round over B's highest to A's highest over B's lowest (see every round \
below). PASS only when the whole range clears the bound, MISS only when all of it misses: \
otherwise the margin is smaller than the measured spread and the result is within noise. A \
single round measures no spread and gives no verdict.\n\n";

/// The median of the rounds (0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
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

/// Today's date, UTC, as YYYY-MM-DD (civil-from-days, Howard Hinnant's algorithm).
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
