//! The classic handshake of the Python tutorial: the server sends 32 random bytes, the client
//! answers with the lowercase hex HMAC of them; no acknowledgement follows.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::{connect_and, mac, random};
use crate::error::Kind;
use crate::{Digest, Error, Result};

/// Length of the classic handshake's challenge (`os.urandom(32)` in the tutorial).
pub const CHALLENGE_LEN: usize = 32;

/// The classic server side: 32 random bytes out, exactly the hex digest's length back (never
/// more: what follows is the handler's), verified in constant time.
pub(crate) fn serve<S: Read + Write>(mut io: S, key: &[u8], digest: Digest) -> Result<()> {
    let mut challenge = [0u8; CHALLENGE_LEN];
    random::fill(&mut challenge)?;
    io.write_all(&challenge)?;
    let mut reply = [0u8; 2 * mac::MAX_MAC_LEN];
    let reply = &mut reply[..2 * digest.output_len()];
    io.read_exact(reply).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::new(Kind::AuthFailed).with_detail("connection closed before a full digest")
        } else {
            e.into()
        }
    })?;
    let mut tag = [0u8; mac::MAX_MAC_LEN];
    let tag = &mut tag[..digest.output_len()];
    if hex::decode_to_slice(&*reply, tag).is_err() {
        return Err(Error::new(Kind::AuthFailed).with_detail("reply is not a hex digest"));
    }
    if !digest.verify(key, &[&challenge], tag) {
        return Err(Error::new(Kind::AuthFailed));
    }
    Ok(())
}

/// The classic handshake's client side on any stream (the tutorial's `auth(sk)`): reads the
/// 32-byte challenge and writes the lowercase hex HMAC of it.
///
/// The protocol has no acknowledgement: with a wrong key, the server just closes the
/// connection, which shows as end-of-file or a reset on the first read after this.
/// A server that closes before sending the challenge (full, or rejecting this client) gives an
/// [`is_refused`](Error::is_refused) error.
pub fn answer_challenge<S: Read + Write>(stream: &mut S, key: &[u8], digest: Digest) -> Result<()> {
    if key.is_empty() {
        return Err(Error::config("authentication key must not be empty"));
    }
    let mut challenge = [0u8; CHALLENGE_LEN];
    stream
        .read_exact(&mut challenge)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                Error::new(Kind::Refused)
                    .with_detail("connection closed before the challenge")
                    .with_source(e)
            }
            _ => Error::io(None, e),
        })?;
    let answer = hex::encode(digest.mac(key, &[&challenge]));
    stream.write_all(answer.as_bytes())?;
    Ok(())
}

/// Connects to a server using the classic handshake and authenticates, all within `timeout`.
/// The returned stream has no timeouts set.
///
/// ```no_run
/// use std::io::{Read, Write};
/// use std::time::Duration;
/// use socketserver::{Digest, connect_with_auth};
///
/// let mut s = connect_with_auth("127.0.0.1:9000", b"secret", Digest::Sha256, Duration::from_secs(5))?;
/// s.write_all(b"hello\n")?;
/// # Ok::<(), socketserver::Error>(())
/// ```
pub fn connect_with_auth(
    addr: impl ToSocketAddrs,
    key: &[u8],
    digest: Digest,
    timeout: Duration,
) -> Result<TcpStream> {
    let (stream, _, ()) = connect_and(addr, timeout, |mut io| {
        answer_challenge(&mut io, key, digest)
    })?;
    Ok(stream)
}
