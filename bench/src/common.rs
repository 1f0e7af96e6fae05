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

/// The line that opens `tls_bench`'s section of results.md.
pub const TLS_BEGIN: &str = "<!-- tls_bench: begin -->";
/// The line that closes `tls_bench`'s section of results.md.
pub const TLS_END: &str = "<!-- tls_bench: end -->";

/// Where `tls_bench`'s section lies in `doc`: from the start of its [`TLS_BEGIN`] line to the
/// end of its [`TLS_END`] line, newline included. `None` when `doc` has neither marker; an
/// error when it has one without the other, either twice, or the end before the begin, since
/// then no one can tell which text is the section.
fn tls_range(doc: &str) -> Result<Option<std::ops::Range<usize>>, String> {
    let (mut begins, mut ends) = (Vec::new(), Vec::new());
    let mut at = 0;
    for line in doc.split_inclusive('\n') {
        match line.trim_end() {
            TLS_BEGIN => begins.push(at),
            TLS_END => ends.push(at + line.len()),
            _ => {}
        }
        at += line.len();
    }
    match (begins.as_slice(), ends.as_slice()) {
        ([], []) => Ok(None),
        (&[b], &[e]) if b < e => Ok(Some(b..e)),
        _ => Err(format!(
            "the tls_bench section's markers are broken ({} `{TLS_BEGIN}`, {} `{TLS_END}`, \
             expected one of each in that order): fix them by hand",
            begins.len(),
            ends.len()
        )),
    }
}

/// `into` with `tls_bench`'s section as `from` has it: in place of `into`'s own section, or
/// appended at the end (after a blank line) when `into` has none; `into` as it is when `from`
/// has no section. The section's text, markers included, is carried byte for byte. The main
/// benchmark carries the section of the results.md it replaces into the new one this way, and
/// `tls_bench` puts its new section into the existing results.md.
pub fn carry_tls_section(into: &str, from: &str) -> Result<String, String> {
    let mine = tls_range(into)?;
    let Some(theirs) = tls_range(from)? else {
        return Ok(into.to_owned());
    };
    let mut section = from[theirs].to_owned();
    if !section.ends_with('\n') {
        section.push('\n');
    }
    Ok(match mine {
        Some(r) => format!("{}{section}{}", &into[..r.start], &into[r.end..]),
        None if into.is_empty() => section,
        None => {
            let sep = if into.ends_with("\n\n") {
                ""
            } else if into.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{into}{sep}{section}")
        }
    })
}

/// The size of every request and reply.
pub const MSG: usize = 64;

/// One 64-byte round trip; `seq` makes each request distinct so a wrong echo is caught.
pub fn round_trip(s: &mut std::net::TcpStream, seq: u64) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut msg = [b'x'; MSG];
    msg[..8].copy_from_slice(&seq.to_le_bytes());
    s.write_all(&msg)?;
    let mut back = [0u8; MSG];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "wrong echo",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(body: &str) -> String {
        format!("{TLS_BEGIN}\n{body}{TLS_END}\n")
    }

    #[test]
    fn a_new_section_replaces_only_the_old_one() {
        let old = format!("# results\n\nbefore\n{}after\n", section("## TLS old\n"));
        let new = section("## TLS new\n| a | b |\n");
        let out = carry_tls_section(&old, &new).unwrap();
        assert_eq!(out, format!("# results\n\nbefore\n{new}after\n"));
    }

    #[test]
    fn a_section_is_appended_where_there_is_none() {
        let new = section("## TLS\n");
        assert_eq!(
            carry_tls_section("# results\n\n| x |\n", &new).unwrap(),
            format!("# results\n\n| x |\n\n{new}")
        );
        assert_eq!(
            carry_tls_section("# results", &new).unwrap(),
            format!("# results\n\n{new}")
        );
        assert_eq!(carry_tls_section("", &new).unwrap(), new);
    }

    #[test]
    fn the_main_benchmark_carries_the_section_unchanged() {
        // The old file's section, odd spacing and all, goes into the freshly written report.
        let kept = section("## TLS benchmark (issue 15)\n\n  | 1.00 |  \n\n");
        let old = format!("# socketserver benchmark results\n\nold figures\n\n{kept}");
        let fresh = "# socketserver benchmark results\n\nnew figures\n";
        let out = carry_tls_section(fresh, &old).unwrap();
        assert_eq!(out, format!("{fresh}\n{kept}"));
        // Rewriting again keeps it once, in the same place.
        let again = carry_tls_section(fresh, &out).unwrap();
        assert_eq!(again, out);
        // No section in the old file: the new report as it is.
        assert_eq!(carry_tls_section(fresh, "old").unwrap(), fresh);
    }

    #[test]
    fn broken_markers_are_an_error_not_a_guess() {
        let new = section("x\n");
        for doc in [
            format!("{TLS_BEGIN}\nno end\n"),
            format!("no begin\n{TLS_END}\n"),
            format!("{TLS_END}\n{TLS_BEGIN}\n"),
            format!("{}{}", section("a\n"), section("b\n")),
        ] {
            assert!(carry_tls_section(&doc, &new).is_err(), "{doc:?}");
            assert!(carry_tls_section("# r\n", &doc).is_err(), "{doc:?}");
        }
    }
}
