//! The PROXY admission stage: reads exactly the header off the socket, no byte further, under
//! the admission deadline, and hands the parsed header on to the request.
//!
//! The parsing is the `proxy-header` crate's; what is ours is finding where the header ends
//! without consuming what follows it (the client's first bytes, which belong to the handler).
//! Each round peeks at what has arrived, consumes what is known to be header, and waits for
//! more only once everything peeked has been consumed (so the wait never spins on bytes
//! already there). A well-behaved proxy's header arrives in one segment: one peek, one read.

use std::io::Read;
use std::sync::Arc;

use proxy_header::{ParseConfig, ProxyHeader};

use super::config::ProxyProtocol;
use super::info::ProxyInfo;
use crate::admission::{Admitting, Progress, Resume, Stage, StageKind, VerifyHook};
use crate::error::Kind;
use crate::recorder::{Event, ProxyFault};
use crate::{Addr, Error, Result};

/// The v2 signature: the first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// How every v1 header starts.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest v1 header, CRLF included (the spec's figure).
pub(crate) const V1_MAX: usize = 107;
/// The fixed part of a v2 header: signature, version and command, family, length.
const V2_FIXED: usize = 16;

/// What the bytes seen so far say about the header.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// The header is the first `n` bytes.
    Complete(usize),
    /// Not complete yet; all the bytes seen are header.
    More,
    /// The first bytes are no PROXY header at all.
    Missing,
    /// It started as a header and went wrong.
    Malformed,
    /// Longer than allowed: the length it announced (v2) or the bytes seen (v1).
    Oversized(usize),
}

/// Where the header in `buf` (what arrived so far, from its first byte) ends.
fn scan(buf: &[u8], max_v2_payload: usize) -> Scan {
    let starts = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    if starts(V2_SIGNATURE) {
        if buf.len() < V2_FIXED {
            return Scan::More;
        }
        let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if payload > max_v2_payload {
            return Scan::Oversized(V2_FIXED + payload);
        }
        let total = V2_FIXED + payload;
        return if buf.len() >= total {
            Scan::Complete(total)
        } else {
            Scan::More
        };
    }
    if starts(V1_PREFIX) {
        let window = &buf[..buf.len().min(V1_MAX)];
        return match window.iter().position(|&b| b == b'\n') {
            Some(i) => Scan::Complete(i + 1),
            None if buf.len() >= V1_MAX => Scan::Oversized(buf.len()),
            None => Scan::More,
        };
    }
    match buf.first() {
        Some(&b) if b == V2_SIGNATURE[0] || b == V1_PREFIX[0] => Scan::Malformed,
        _ => Scan::Missing,
    }
}

/// Why a header was refused; each has its counter.
#[derive(Debug)]
enum Refusal {
    Missing,
    Malformed(&'static str),
    Oversized(usize),
}

/// The most a header can be: the v2 fixed part and the largest payload allowed.
const CAP: usize = V2_FIXED + ProxyProtocol::MAX_V2_PAYLOAD;

/// Reads the header off `conn` into `buf`, leaving every byte after it in the socket; its
/// length, or why it was refused.
fn read_header(
    conn: &Admitting<'_>,
    buf: &mut [u8; CAP],
) -> Result<std::result::Result<usize, Refusal>> {
    let mut io = conn.io();
    let io_err = |e: std::io::Error| Error::io(Some(&conn.peer), e);
    let mut have = 0;
    loop {
        let n = io.peek(&mut buf[have..]).map_err(io_err)?;
        if n == 0 {
            return Ok(Err(if have == 0 {
                Refusal::Missing
            } else {
                Refusal::Malformed("the connection ended inside the header")
            }));
        }
        let (take, done) = match scan(&buf[..have + n], ProxyProtocol::MAX_V2_PAYLOAD) {
            Scan::Complete(len) => (len, true),
            Scan::More => (have + n, false),
            Scan::Missing => return Ok(Err(Refusal::Missing)),
            Scan::Malformed => return Ok(Err(Refusal::Malformed("not a PROXY header"))),
            Scan::Oversized(len) => return Ok(Err(Refusal::Oversized(len))),
        };
        // Consume what is header (all that was peeked, unless the header ends inside it):
        // the bytes are there already, so this read does not wait.
        io.read_exact(&mut buf[have..take]).map_err(io_err)?;
        have = take;
        if done {
            return Ok(Ok(have));
        }
    }
}

/// The PROXY stage of one server.
pub(crate) struct ProxyStage {
    config: ProxyProtocol,
    verify: Option<VerifyHook>,
}

impl ProxyStage {
    pub(crate) fn new(config: ProxyProtocol) -> ProxyStage {
        ProxyStage {
            config,
            verify: None,
        }
    }

    fn refuse(conn: &Admitting<'_>, why: Refusal) -> Error {
        let control = conn.control();
        let detail = match why {
            Refusal::Missing => {
                control.record(Event::Proxy(ProxyFault::Missing));
                "no PROXY header: the connection did not start with one".to_owned()
            }
            Refusal::Malformed(what) => {
                control.record(Event::Proxy(ProxyFault::Malformed));
                format!("malformed PROXY header: {what}")
            }
            Refusal::Oversized(len) => {
                control.record(Event::Proxy(ProxyFault::Oversized));
                format!(
                    "PROXY header of {len} bytes, over the limit ({V1_MAX} for v1, {} for v2)",
                    V2_FIXED + ProxyProtocol::MAX_V2_PAYLOAD
                )
            }
        };
        Error::new(Kind::BadMessage)
            .with_addr(Some(&conn.peer))
            .with_detail(detail)
    }
}

impl Stage for ProxyStage {
    fn kind(&self) -> StageKind {
        StageKind::Proxy
    }

    fn take_verify(&mut self, hook: VerifyHook) -> Option<VerifyHook> {
        self.verify = Some(hook);
        None
    }

    /// Event mode: parks until the header is whole (or is plainly not one), then reads it as
    /// `run` does, without waiting; an untrusted peer is refused at once.
    fn start(&self, conn: &mut Admitting<'_>) -> Result<Progress> {
        if !self.config.trusts(&conn.peer) {
            return self.run(conn).map(|()| Progress::Done);
        }
        Ok(Progress::Wait(Resume {
            ready: Some(Box::new(|received| {
                !matches!(scan(received, ProxyProtocol::MAX_V2_PAYLOAD), Scan::More)
            })),
            then: None,
        }))
    }

    fn run(&self, conn: &mut Admitting<'_>) -> Result<()> {
        if !self.config.trusts(&conn.peer) {
            conn.control().record(Event::Proxy(ProxyFault::Untrusted));
            return Err(Error::new(Kind::Refused)
                .with_addr(Some(&conn.peer))
                .with_detail("not a trusted proxy (ProxyProtocol::trust)"));
        }
        let mut buf = [0u8; CAP];
        let len = match read_header(conn, &mut buf) {
            Ok(Ok(len)) => len,
            Ok(Err(why)) => return Err(Self::refuse(conn, why)),
            Err(e) => {
                if e.is_timeout() {
                    conn.control().record(Event::Proxy(ProxyFault::Timeout));
                }
                return Err(e);
            }
        };
        let buf = &buf[..len];
        let config = ParseConfig {
            include_tlvs: true,
            allow_v1: true,
            allow_v2: true,
        };
        let header = match ProxyHeader::parse(buf, config) {
            Ok((h, used)) if used == buf.len() && h.tlvs().all(|t| t.is_ok()) => h.into_owned(),
            Ok(_) => return Err(Self::refuse(conn, Refusal::Malformed("bad TLVs"))),
            Err(e) => {
                let what = match e {
                    proxy_header::Error::BufferTooShort => "truncated",
                    _ => "invalid fields",
                };
                return Err(Self::refuse(conn, Refusal::Malformed(what)));
            }
        };
        let proxy = conn.peer.clone();
        let client = match header.proxied_address() {
            Some(a) => Addr::Inet(std::net::SocketAddr::new(
                a.source.ip().to_canonical(),
                a.source.port(),
            )),
            None => proxy.clone(),
        };
        if let Some(verify) = &self.verify {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| verify(&client)))
                .unwrap_or_else(|p| {
                    log::error!(
                        "verify_request hook panicked: {}",
                        crate::worker::panic_message(&*p)
                    );
                    false
                });
            if !ok {
                conn.control()
                    .record(Event::Refused(crate::recorder::Refusal::Verify));
                return Err(Error::new(Kind::Refused)
                    .with_addr(Some(&client))
                    .with_detail(format!("verify_request rejected {client} (via {proxy})"))
                    .counted());
            }
        }
        if let Addr::Inet(a) = &client {
            match conn.control().limits.claim_source(a.ip().to_canonical()) {
                Some(claim) => conn.learnt.source = claim,
                None => {
                    conn.control()
                        .record(Event::Refused(crate::recorder::Refusal::PerSource));
                    return Err(Error::new(Kind::Refused)
                        .with_addr(Some(&client))
                        .with_detail(format!(
                            "{} already has {} connections open (max_per_source)",
                            a.ip(),
                            conn.control().limits.max_per_source().unwrap_or_default()
                        ))
                        .counted());
                }
            }
        }
        let version = if buf[0] == b'P' { 1 } else { 2 };
        conn.peer = client;
        conn.learnt.proxy = Some(Arc::new(ProxyInfo {
            proxy,
            version,
            header,
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = ProxyProtocol::MAX_V2_PAYLOAD;

    fn v2(payload_len: u16) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11]);
        h.extend_from_slice(&payload_len.to_be_bytes());
        h
    }

    #[test]
    fn v1_ends_at_its_newline_and_not_past_it() {
        let line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 2000\r\n";
        let mut with_data = line.to_vec();
        with_data.extend_from_slice(b"hello\n");
        assert_eq!(scan(&with_data, MAX), Scan::Complete(line.len()));
        assert_eq!(scan(&line[..10], MAX), Scan::More);
        assert_eq!(scan(b"PRO", MAX), Scan::More);
        assert_eq!(scan(&[b'P'; 200][..], MAX), Scan::Malformed);
        let mut long = b"PROXY ".to_vec();
        long.resize(V1_MAX, b'1');
        assert_eq!(scan(&long, MAX), Scan::Oversized(V1_MAX));
        long.truncate(V1_MAX - 1);
        assert_eq!(scan(&long, MAX), Scan::More, "106 bytes may still end");
    }

    #[test]
    fn v2_ends_where_its_length_says_and_a_long_one_is_refused_before_it_is_read() {
        let mut h = v2(12);
        assert_eq!(scan(&h[..5], MAX), Scan::More);
        assert_eq!(scan(&h, MAX), Scan::More, "the addresses are still to come");
        h.extend_from_slice(&[0; 12]);
        h.extend_from_slice(b"data after");
        assert_eq!(scan(&h, MAX), Scan::Complete(28));
        assert_eq!(scan(&v2(MAX as u16), MAX), Scan::More);
        assert_eq!(
            scan(&v2(MAX as u16 + 1), MAX),
            Scan::Oversized(16 + MAX + 1)
        );
        let mut wrong = v2(12);
        wrong[11] = b'X';
        assert_eq!(scan(&wrong, MAX), Scan::Malformed);
    }

    #[test]
    fn anything_else_is_a_missing_header() {
        assert_eq!(scan(b"GET / HTTP/1.1\r\n", MAX), Scan::Missing);
        assert_eq!(scan(b"\x16\x03\x01", MAX), Scan::Missing, "a TLS hello");
    }
}
