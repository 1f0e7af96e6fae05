//! Python's `multiprocessing.connection` wire protocol: length-prefixed messages and the mutual
//! HMAC handshake of `Listener` / `Client`, in both its 3.11 (legacy) and 3.12+ forms.
//!
//! Only `send_bytes` / `recv_bytes` are provided: `send()` / `recv()` in Python pickle objects,
//! and unpickling data from the network is out of scope (and unsafe in Python too).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::auth::deadline::DeadlineIo;
use crate::error::Kind;
use crate::{Addr, Digest, Error, Result};

const CHALLENGE: &[u8] = b"#CHALLENGE#";
const WELCOME: &[u8] = b"#WELCOME#";
const FAILURE: &[u8] = b"#FAILURE#";
/// Random bytes in a 3.12+ challenge.
const MESSAGE_LENGTH: usize = 40;
/// Random bytes in a legacy (3.11) challenge, and the least a challenge may carry.
const LEGACY_MESSAGE_LENGTH: usize = 20;
/// Every handshake message is read with `recv_bytes(256)` in Python.
const HANDSHAKE_MAX: usize = 256;
/// Python's `_MAX_DIGEST_LEN`: the longest allowed digest name.
const MAX_DIGEST_NAME: usize = 8;

/// The default largest message [`MpConnection::recv_bytes`] accepts: 64 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Which form of the handshake to *send*. Answers are computed as the peer's challenge asks, and
/// both forms of answer are accepted, whichever is set here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MpVersion {
    /// Python 3.12+: a `{digest}`-prefixed 40-byte challenge. Python 3.11 peers answer it too.
    #[default]
    Modern,
    /// Python 3.11 byte for byte: a bare 20-byte challenge answered with raw HMAC-MD5.
    Legacy,
}

/// A framed connection speaking `multiprocessing.connection`'s message format: a 4-byte
/// big-endian length, or `-1` and an 8-byte length for messages over 2 GiB − 1, then the bytes.
///
/// ```no_run
/// use socketserver::{MpConnection, mp_connect};
/// use std::time::Duration;
///
/// // Python: Listener(("127.0.0.1", 6000), authkey=b"secret")
/// let mut conn = mp_connect("127.0.0.1:6000", b"secret", Duration::from_secs(5))?;
/// conn.send_bytes(b"hello")?;
/// let reply = conn.recv_bytes()?;
/// # Ok::<(), socketserver::Error>(())
/// ```
#[derive(Debug)]
pub struct MpConnection<S> {
    stream: S,
    max_message: usize,
    peer: Option<Addr>,
}

impl<S: Read + Write> MpConnection<S> {
    /// Frames `stream`, accepting messages up to [`DEFAULT_MAX_MESSAGE`] bytes.
    pub fn new(stream: S) -> Self {
        MpConnection {
            stream,
            max_message: DEFAULT_MAX_MESSAGE,
            peer: None,
        }
    }

    /// Sets the largest message `recv_bytes` accepts; a longer length prefix is an error, found
    /// before anything is allocated.
    pub fn with_max_message(mut self, max: usize) -> Self {
        self.max_message = max;
        self
    }

    /// Names the peer in errors.
    pub fn with_peer(mut self, peer: Addr) -> Self {
        self.peer = Some(peer);
        self
    }

    /// The largest message `recv_bytes` accepts.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, mutably. Reading or writing it directly breaks the framing.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> S {
        self.stream
    }

    fn io_err(&self, e: io::Error) -> Error {
        Error::io(self.peer.as_ref(), e)
    }

    /// Sends one message (Python's `send_bytes`).
    pub fn send_bytes(&mut self, buf: &[u8]) -> Result<()> {
        let r = write_frame(&mut self.stream, buf);
        r.map_err(|e| self.io_err(e))
    }

    /// Receives one message (Python's `recv_bytes`). A length over the maximum is a
    /// [`is_too_large`](Error::is_too_large) error and a negative length other than `-1` a
    /// [`is_bad_message`](Error::is_bad_message) one; the connection is unusable after either.
    pub fn recv_bytes(&mut self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.recv_bytes_into(&mut v)?;
        Ok(v)
    }

    /// Receives one message into `buf` (cleared first), reusing its allocation.
    pub fn recv_bytes_into(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        let r = read_frame(&mut self.stream, buf, self.max_message);
        r.map_err(|e| e.with_addr(self.peer.as_ref()))
    }
}

fn write_frame<W: Write>(w: &mut W, buf: &[u8]) -> io::Result<()> {
    let n = buf.len();
    if n > 0x7fff_ffff {
        let mut header = [0u8; 12];
        header[..4].copy_from_slice(&(-1i32).to_be_bytes());
        header[4..].copy_from_slice(&(n as u64).to_be_bytes());
        w.write_all(&header)?;
        w.write_all(buf)
    } else if n > 16384 {
        w.write_all(&(n as i32).to_be_bytes())?;
        w.write_all(buf)
    } else {
        // One write for header and payload, as Python does (bpo-20540): no Nagle stall.
        let mut frame = Vec::with_capacity(4 + n);
        frame.extend_from_slice(&(n as i32).to_be_bytes());
        frame.extend_from_slice(buf);
        w.write_all(&frame)
    }
}

fn read_frame<R: Read>(r: &mut R, buf: &mut Vec<u8>, max: usize) -> Result<()> {
    buf.clear();
    let mut header = [0u8; 4];
    r.read_exact(&mut header).map_err(|e| Error::io(None, e))?;
    let size = match i32::from_be_bytes(header) {
        -1 => {
            let mut long = [0u8; 8];
            r.read_exact(&mut long).map_err(|e| Error::io(None, e))?;
            u64::from_be_bytes(long)
        }
        n if n < 0 => {
            return Err(Error::new(Kind::BadMessage)
                .with_detail(format!("bad message length: negative length {n}")));
        }
        n => n as u64,
    };
    if size > max as u64 {
        return Err(Error::new(Kind::TooLarge).with_detail(format!(
            "bad message length: {size} bytes, more than the maximum of {max}"
        )));
    }
    let size = size as usize;
    // Grow as bytes arrive, so a lying length prefix costs no more memory than what was sent.
    buf.reserve(size.min(64 * 1024));
    let got = r
        .take(size as u64)
        .read_to_end(buf)
        .map_err(|e| Error::io(None, e))?;
    if got < size {
        return Err(Error::io(None, io::ErrorKind::UnexpectedEof.into())
            .with_detail(format!("message truncated: {got} of {size} bytes")));
    }
    Ok(())
}

/// Reads one handshake message (at most 256 bytes, like Python's `recv_bytes(256)`).
fn recv_handshake<S: Read + Write>(c: &mut MpConnection<S>) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    match read_frame(&mut c.stream, &mut v, HANDSHAKE_MAX) {
        Ok(()) => Ok(v),
        Err(e) if e.is_too_large() => Err(Error::new(Kind::BadMessage)
            .with_addr(c.peer.as_ref())
            .with_detail("bad message length: handshake message over 256 bytes")),
        Err(e) => Err(e.with_addr(c.peer.as_ref())),
    }
}

/// Python's `_get_digest_name_and_payload`: a 16- or 20-byte message is legacy (no prefix, MD5);
/// anything else must carry an allowed `{name}` prefix.
fn split_digest(message: &[u8]) -> Option<(Option<Digest>, &[u8])> {
    if message.len() == 16 || message.len() == LEGACY_MESSAGE_LENGTH {
        return Some((None, message));
    }
    if message.first() != Some(&b'{') {
        return None;
    }
    let end = message.len().min(MAX_DIGEST_NAME + 2);
    let curly = message[1..end].iter().position(|&b| b == b'}')? + 1;
    let name = std::str::from_utf8(&message[1..curly]).ok()?;
    let digest = Digest::from_name(name)?;
    Some((Some(digest), &message[curly + 1..]))
}

/// Python's `_create_response`: raw HMAC-MD5 for a legacy challenge, else `{name}` + the MAC
/// with the digest the challenge names, over the whole message (prefix included).
fn create_response(key: &[u8], message: &[u8]) -> Result<Vec<u8>> {
    let (digest, _) = split_digest(message).ok_or_else(|| {
        Error::new(Kind::BadMessage)
            .with_detail("challenge has an unsupported length or digest prefix")
    })?;
    Ok(match digest {
        None => Digest::Md5.mac(key, &[message]),
        Some(d) => {
            let mut r = format!("{{{}}}", d.name()).into_bytes();
            r.extend_from_slice(&d.mac(key, &[message]));
            r
        }
    })
}

/// Python 3.12's `_verify_challenge`, in constant time.
fn verify_response(key: &[u8], message: &[u8], response: &[u8]) -> Result<()> {
    let (digest, mac) = split_digest(response).ok_or_else(|| {
        Error::new(Kind::AuthFailed)
            .with_detail("response has an unsupported length or digest prefix")
    })?;
    let digest = digest.unwrap_or(Digest::Md5);
    if mac.len() != digest.output_len() {
        return Err(Error::new(Kind::AuthFailed).with_detail(format!(
            "expected a {digest} MAC of {} bytes, got {}",
            digest.output_len(),
            mac.len()
        )));
    }
    if !digest.verify(key, &[message], mac) {
        return Err(Error::new(Kind::AuthFailed).with_detail("digest received was wrong"));
    }
    Ok(())
}

/// Python's `deliver_challenge`: send a challenge, check the answer, say welcome or failure.
fn deliver_challenge<S: Read + Write>(
    c: &mut MpConnection<S>,
    key: &[u8],
    version: MpVersion,
    digest: Digest,
) -> Result<()> {
    let message = match version {
        MpVersion::Legacy => {
            let mut m = vec![0u8; LEGACY_MESSAGE_LENGTH];
            rand::rng().fill_bytes(&mut m);
            m
        }
        MpVersion::Modern => {
            let mut m = format!("{{{}}}", digest.name()).into_bytes();
            let start = m.len();
            m.resize(start + MESSAGE_LENGTH, 0);
            rand::rng().fill_bytes(&mut m[start..]);
            m
        }
    };
    let mut challenge = CHALLENGE.to_vec();
    challenge.extend_from_slice(&message);
    c.send_bytes(&challenge)?;
    let response = recv_handshake(c)?;
    match verify_response(key, &message, &response) {
        Ok(()) => c.send_bytes(WELCOME),
        Err(e) => {
            // Best effort: the peer may already be gone, and the verdict is what matters.
            let _ = c.send_bytes(FAILURE);
            Err(e.with_addr(c.peer.as_ref()))
        }
    }
}

/// Python's `answer_challenge`: answer the peer's challenge and read its verdict.
fn answer_challenge<S: Read + Write>(c: &mut MpConnection<S>, key: &[u8]) -> Result<()> {
    let message = recv_handshake(c)?;
    let Some(challenge) = message.strip_prefix(CHALLENGE) else {
        return Err(Error::new(Kind::BadMessage)
            .with_addr(c.peer.as_ref())
            .with_detail("protocol error: expected a challenge"));
    };
    if challenge.len() < LEGACY_MESSAGE_LENGTH {
        return Err(Error::new(Kind::BadMessage)
            .with_addr(c.peer.as_ref())
            .with_detail(format!("challenge too short: {} bytes", challenge.len())));
    }
    let response = create_response(key, challenge).map_err(|e| e.with_addr(c.peer.as_ref()))?;
    c.send_bytes(&response)?;
    let verdict = recv_handshake(c)?;
    if verdict != WELCOME {
        return Err(Error::new(Kind::AuthRejected)
            .with_addr(c.peer.as_ref())
            .with_detail("digest sent was rejected"));
    }
    Ok(())
}

fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        // gh-88118: Python's client freezes on an empty key; refuse it up front.
        return Err(Error::config("authkey must not be empty"));
    }
    Ok(())
}

/// The `Listener` side of the handshake on an open stream: deliver our challenge and verify the
/// answer, then answer the client's challenge. Six messages; no timeout of its own (the
/// middleware and [`mp_connect`] wrap the stream in one).
pub fn mp_server_handshake<S: Read + Write>(
    stream: S,
    key: &[u8],
    version: MpVersion,
) -> Result<MpConnection<S>> {
    check_key(key)?;
    let mut c = MpConnection::new(stream);
    deliver_challenge(&mut c, key, version, Digest::Sha256)?;
    answer_challenge(&mut c, key)?;
    Ok(c)
}

/// The `Client` side of the handshake on an open stream: answer the listener's challenge, then
/// deliver ours (3.12+ form unless `version` is legacy).
pub fn mp_client_handshake<S: Read + Write>(
    stream: S,
    key: &[u8],
    version: MpVersion,
) -> Result<MpConnection<S>> {
    check_key(key)?;
    let mut c = MpConnection::new(stream);
    answer_challenge(&mut c, key)?;
    deliver_challenge(&mut c, key, version, Digest::Sha256)?;
    Ok(c)
}

/// Python's `Client(address, authkey=key)`: connects over TCP and runs the mutual handshake,
/// all within `timeout`. Afterwards the socket has no timeout.
pub fn mp_connect(
    addr: impl ToSocketAddrs,
    key: &[u8],
    timeout: Duration,
) -> Result<MpConnection<TcpStream>> {
    mp_connect_with(addr, key, timeout, MpVersion::Modern)
}

/// [`mp_connect`], choosing the form of the challenge we send.
pub fn mp_connect_with(
    addr: impl ToSocketAddrs,
    key: &[u8],
    timeout: Duration,
    version: MpVersion,
) -> Result<MpConnection<TcpStream>> {
    check_key(key)?;
    let start = Instant::now();
    let (stream, peer) = crate::auth::connect_timeout(addr, timeout)?;
    let left = timeout.saturating_sub(start.elapsed());
    let io = DeadlineIo::new(&stream, left);
    let c = mp_client_handshake(io, key, version).map_err(|e| e.with_addr(Some(&peer)))?;
    c.into_inner()
        .finish()
        .map_err(|e| Error::io(Some(&peer), e))?;
    Ok(MpConnection::new(stream).with_peer(peer))
}

/// Runs the listener side over a server connection, with the middleware's deadline.
pub(crate) fn serve<S: Read + Write>(
    io: S,
    key: &[u8],
    version: MpVersion,
    digest: Digest,
) -> Result<()> {
    let mut c = MpConnection::new(io);
    deliver_challenge(&mut c, key, version, digest)?;
    answer_challenge(&mut c, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_match_python_layout() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"hello").unwrap();
        assert_eq!(wire, b"\x00\x00\x00\x05hello");
        write_frame(&mut wire, b"").unwrap();
        let mut c = MpConnection::new(io::Cursor::new(wire));
        assert_eq!(c.recv_bytes().unwrap(), b"hello");
        assert_eq!(c.recv_bytes().unwrap(), b"");
        assert!(c.recv_bytes().unwrap_err().io_error().is_some());
    }

    #[test]
    fn bad_lengths_are_rejected_without_allocating() {
        let mut c = MpConnection::new(io::Cursor::new(b"\xff\xff\xff\xfe".to_vec()));
        assert!(c.recv_bytes().unwrap_err().is_bad_message());
        let huge = [&[0xffu8; 4][..], &u64::MAX.to_be_bytes()].concat();
        let mut c = MpConnection::new(io::Cursor::new(huge));
        assert!(c.recv_bytes().unwrap_err().is_too_large());
        let mut c =
            MpConnection::new(io::Cursor::new(b"\x00\x00\x01\x00".to_vec())).with_max_message(255);
        assert!(c.recv_bytes().unwrap_err().is_too_large());
    }

    #[test]
    fn digest_prefix_parsing_follows_python() {
        assert_eq!(split_digest(&[0u8; 20]).unwrap().0, None);
        assert_eq!(split_digest(&[0u8; 16]).unwrap().0, None);
        let m = b"{sha256}0123456789012345678901234567890123456789";
        assert_eq!(split_digest(m).unwrap(), (Some(Digest::Sha256), &m[8..]));
        assert!(split_digest(b"{sha1}xxxxxxxxxxxxxxxxxxxxxxxxx").is_none());
        assert!(split_digest(b"0123456789012345678901234").is_none());
    }
}
