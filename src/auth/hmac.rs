//! The classic handshake of the Python tutorial: the server sends 32 random bytes, the client
//! answers with the lowercase hex HMAC of them; no acknowledgement follows.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::time::Duration;

use super::{connect_and, mac, random};
use crate::deadline::DeadlineIo;
use crate::error::Kind;
use crate::{Digest, Error, Result};

/// Length of the classic handshake's challenge (`os.urandom(32)` in the tutorial).
pub const CHALLENGE_LEN: usize = 32;

/// The classic server side: 32 random bytes out, exactly the hex digest's length back (never
/// more: what follows is the handler's), verified in constant time.
///
/// A client using another digest than the server is the usual cause of a failed handshake, and
/// it looks like something else: a shorter digest (MD5's 32 hex digits to a SHA-256 server)
/// leaves the server waiting for the rest until the timeout; a longer one fails as a wrong
/// digest. Both errors say how many hex digits came and which digest the client seems to use.
pub(crate) fn serve<S: AsFd>(mut io: DeadlineIo<'_, S>, key: &[u8], digest: Digest) -> Result<()> {
    let challenge = send_challenge(&mut io)?;
    check_reply(io, key, digest, &challenge)
}

/// The first half of [`serve`]: the challenge, sent.
pub(crate) fn send_challenge<S: AsFd>(io: &mut DeadlineIo<'_, S>) -> Result<[u8; CHALLENGE_LEN]> {
    let mut challenge = [0u8; CHALLENGE_LEN];
    random::fill(&mut challenge)?;
    io.write_all(&challenge)?;
    Ok(challenge)
}

/// The second half of [`serve`]: the reply to `challenge`, read and verified.
pub(crate) fn check_reply<S: AsFd>(
    mut io: DeadlineIo<'_, S>,
    key: &[u8],
    digest: Digest,
    challenge: &[u8; CHALLENGE_LEN],
) -> Result<()> {
    let mut reply = [0u8; 2 * mac::MAX_MAC_LEN];
    let want = 2 * digest.output_len();
    let mut got = 0;
    while got < want {
        match io.read(&mut reply[got..want]) {
            Ok(0) => {
                return Err(Error::new(Kind::AuthFailed).with_detail(format!(
                    "connection closed after {}",
                    digits_received(&reply[..got], want, digest)
                )));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let e = Error::io(None, e);
                if !e.is_timeout() {
                    return Err(e);
                }
                return Err(Error::new(Kind::Timeout).with_detail(digits_received(
                    &reply[..got],
                    want,
                    digest,
                )));
            }
        }
    }
    let reply = &reply[..want];
    let mut tag = [0u8; mac::MAX_MAC_LEN];
    let tag = &mut tag[..digest.output_len()];
    if hex::decode_to_slice(reply, tag).is_err() {
        return Err(Error::new(Kind::AuthFailed).with_detail("reply is not a hex digest"));
    }
    if !digest.verify(key, &[challenge], tag) {
        let mut e = Error::new(Kind::AuthFailed);
        // More hex digits already waiting (peeked, never consumed) may be the rest of a longer
        // digest; the connection is closed either way, so looking costs nothing.
        let mut more = [0u8; 2 * mac::MAX_MAC_LEN];
        let n = io.peek_ready(&mut more[..2 * mac::MAX_MAC_LEN - want]);
        let extra = more[..n]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if let Some(guess) = client_digest_guess(want + extra, digest) {
            e = e.with_detail(format!(
                "{extra} more hex digits followed the {want} expected: {guess}"
            ));
        }
        return Err(e);
    }
    Ok(())
}

/// "12 of 64 hex digits received", and when the part received is all hex and as long as
/// another digest, the likely mismatch.
fn digits_received(received: &[u8], want: usize, digest: Digest) -> String {
    let mut s = format!("{} of {want} hex digits received", received.len());
    if received.iter().all(u8::is_ascii_hexdigit)
        && let Some(guess) = client_digest_guess(received.len(), digest)
    {
        s.push_str(": ");
        s.push_str(&guess);
    }
    s
}

/// Which other digests give `hex_len` hex digits, as a question for the log:
/// "is the client using MD5 while the server expects SHA-256?".
fn client_digest_guess(hex_len: usize, server: Digest) -> Option<String> {
    let names: Vec<&str> = Digest::ALL
        .into_iter()
        .filter(|d| *d != server && 2 * d.output_len() == hex_len)
        .map(display_name)
        .collect();
    (!names.is_empty()).then(|| {
        format!(
            "is the client using {} while the server expects {}?",
            names.join(" or "),
            display_name(server)
        )
    })
}

/// The digest's name as its standard writes it.
fn display_name(d: Digest) -> &'static str {
    match d {
        Digest::Md5 => "MD5",
        Digest::Sha256 => "SHA-256",
        Digest::Sha384 => "SHA-384",
        Digest::Sha3_256 => "SHA3-256",
        Digest::Sha3_384 => "SHA3-384",
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Runs the server side against a client that answers with `answer(challenge)`.
    fn serve_against(server: Digest, answer: fn(&[u8]) -> Vec<u8>) -> Result<()> {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let client = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut challenge = [0u8; CHALLENGE_LEN];
            theirs.read_exact(&mut challenge).unwrap();
            theirs.write_all(&answer(&challenge)).unwrap();
            theirs // held open until the server is done
        });
        let r = serve(
            DeadlineIo::new(&ours, Duration::from_millis(200)),
            b"key",
            server,
        );
        drop(client.join().unwrap());
        r
    }

    #[test]
    fn a_shorter_client_digest_times_out_saying_which_it_seems_to_be() {
        let e = serve_against(Digest::Sha256, |c| {
            hex::encode(Digest::Md5.mac(b"key", &[c])).into_bytes()
        })
        .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert_eq!(
            e.detail(),
            Some(
                "32 of 64 hex digits received: is the client using MD5 while the server expects \
                 SHA-256?"
            )
        );
    }

    #[test]
    fn a_longer_client_digest_fails_saying_which_it_seems_to_be() {
        let e = serve_against(Digest::Md5, |c| {
            let mut a = hex::encode(Digest::Sha256.mac(b"key", &[c])).into_bytes();
            a.extend_from_slice(b"hello\n"); // the client's first request, in the same write
            a
        })
        .unwrap_err();
        assert!(e.is_auth_failed(), "{e}");
        assert_eq!(
            e.detail(),
            Some(
                "32 more hex digits followed the 32 expected: is the client using SHA-256 or \
                 SHA3-256 while the server expects MD5?"
            )
        );
    }

    #[test]
    fn other_failures_only_count_the_digits() {
        let silent = serve_against(Digest::Sha256, |_| Vec::new()).unwrap_err();
        assert!(silent.is_timeout());
        assert_eq!(silent.detail(), Some("0 of 64 hex digits received"));
        // 32 characters, but not hex: no guess.
        let garbage = serve_against(Digest::Sha256, |_| vec![b'z'; 32]).unwrap_err();
        assert_eq!(garbage.detail(), Some("32 of 64 hex digits received"));
        // A wrong key with the right digest: nothing follows, nothing to guess.
        let wrong = serve_against(Digest::Md5, |c| {
            hex::encode(Digest::Md5.mac(b"other", &[c])).into_bytes()
        })
        .unwrap_err();
        assert!(
            wrong.is_auth_failed() && wrong.detail().is_none(),
            "{wrong}"
        );
        serve_against(Digest::Sha384, |c| {
            hex::encode(Digest::Sha384.mac(b"key", &[c])).into_bytes()
        })
        .unwrap();
    }
}
