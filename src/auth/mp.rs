//! The handshake of Python's `multiprocessing.connection` `Listener` / `Client`: six framed
//! messages, a mutual HMAC challenge-response, in both its 3.11 (legacy) and 3.12+ forms.
//!
//! The listener sends `#CHALLENGE#` + a message, the client answers with an HMAC of the
//! message, the listener says `#WELCOME#` or `#FAILURE#`; then the same the other way round.
//! Python 3.11 sends 20 random bytes and expects raw HMAC-MD5; 3.12+ sends `{sha256}` + 40
//! random bytes and expects `{sha256}` + HMAC-SHA-256 of the whole message, prefix included.
//! Like CPython 3.12+, we answer whichever form we are sent and accept a raw MD5 answer or any
//! `{md5,sha256,sha384,sha3_256,sha3_384}` one, checked in constant time. Handshake messages
//! over 256 bytes are refused ("bad message length"). The framing is `mp/frame.rs`'s.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::random;
use crate::error::Kind;
use crate::mp::{Limits, MpConnection, read_frame};
use crate::{Digest, Error, Result};

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

/// Reads one handshake message (at most 256 bytes, like Python's `recv_bytes(256)`).
fn recv_handshake<S: Read + Write>(c: &mut MpConnection<S>) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    match read_frame(&mut c.stream, &mut v, Limits::max(HANDSHAKE_MAX)) {
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

/// Python 3.12's `_verify_challenge`: the answer names its digest (raw 16 bytes: MD5), and the
/// MAC is compared in constant time.
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

/// The random part of a challenge: 20 bare bytes (3.11), or `{digest}` and 40 bytes (3.12+).
fn challenge_message(version: MpVersion, digest: Digest) -> io::Result<Vec<u8>> {
    Ok(match version {
        MpVersion::Legacy => {
            let mut m = vec![0u8; LEGACY_MESSAGE_LENGTH];
            random::fill(&mut m)?;
            m
        }
        MpVersion::Modern => {
            let mut m = format!("{{{}}}", digest.name()).into_bytes();
            let start = m.len();
            m.resize(start + MESSAGE_LENGTH, 0);
            random::fill(&mut m[start..])?;
            m
        }
    })
}

/// Python's `deliver_challenge`: send `#CHALLENGE#` + `message`, check the answer, say welcome
/// or failure.
fn deliver_mp_challenge<S: Read + Write>(
    c: &mut MpConnection<S>,
    key: &[u8],
    message: &[u8],
) -> Result<()> {
    send_mp_challenge(c, message)?;
    check_mp_answer(c, key, message)
}

/// The first half of `deliver_challenge`: the challenge, sent.
pub(super) fn send_mp_challenge<S: Read + Write>(
    c: &mut MpConnection<S>,
    message: &[u8],
) -> Result<()> {
    let mut challenge = CHALLENGE.to_vec();
    challenge.extend_from_slice(message);
    c.send_bytes(&challenge)
}

/// The second half of `deliver_challenge`: the answer, checked, and the verdict sent.
pub(super) fn check_mp_answer<S: Read + Write>(
    c: &mut MpConnection<S>,
    key: &[u8],
    message: &[u8],
) -> Result<()> {
    let response = recv_handshake(c)?;
    match verify_response(key, message, &response) {
        Ok(()) => c.send_bytes(WELCOME),
        Err(e) => {
            // Best effort: the peer may already be gone, and the verdict is what matters.
            let _ = c.send_bytes(FAILURE);
            Err(e.with_addr(c.peer.as_ref()))
        }
    }
}

/// Python's `answer_challenge`: answer the peer's challenge and read its verdict.
fn answer_mp_challenge<S: Read + Write>(c: &mut MpConnection<S>, key: &[u8]) -> Result<()> {
    send_mp_answer(c, key)?;
    read_mp_verdict(c)
}

/// The first half of `answer_challenge`: the peer's challenge, read and answered.
pub(super) fn send_mp_answer<S: Read + Write>(c: &mut MpConnection<S>, key: &[u8]) -> Result<()> {
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
    c.send_bytes(&response)
}

/// The second half of `answer_challenge`: the peer's verdict on our answer.
pub(super) fn read_mp_verdict<S: Read + Write>(c: &mut MpConnection<S>) -> Result<()> {
    let verdict = recv_handshake(c)?;
    if verdict != WELCOME {
        return Err(Error::new(Kind::AuthRejected)
            .with_addr(c.peer.as_ref())
            .with_detail("digest sent was rejected"));
    }
    Ok(())
}

/// `Listener.accept`'s half: deliver `message` as our challenge, then answer the client's.
fn server_side<S: Read + Write>(c: &mut MpConnection<S>, key: &[u8], message: &[u8]) -> Result<()> {
    check_key(key)?;
    deliver_mp_challenge(c, key, message)?;
    answer_mp_challenge(c, key)
}

/// `Client`'s half: answer the listener's challenge, then deliver `message` as ours.
fn client_side<S: Read + Write>(c: &mut MpConnection<S>, key: &[u8], message: &[u8]) -> Result<()> {
    check_key(key)?;
    answer_mp_challenge(c, key)?;
    deliver_mp_challenge(c, key, message)
}

pub(super) fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        // gh-88118: Python's client freezes on an empty key; refuse it up front.
        return Err(Error::config("authkey must not be empty"));
    }
    Ok(())
}

/// The `Listener` side of the handshake on an open stream: deliver our challenge (in the form
/// `version` names, asking for HMAC-SHA-256 in the 3.12+ form) and verify the answer, then
/// answer the client's challenge. Six messages; no timeout of its own: give `stream` one
/// (the [`Auth::multiprocessing`](crate::Auth::multiprocessing) middleware and [`mp_connect`]
/// bound the whole handshake by a deadline).
///
/// A wrong answer from the client is an [`is_auth_failed`](Error::is_auth_failed) error
/// ("digest wrong", after `#FAILURE#` was sent); the client refusing our answer an
/// [`is_auth_rejected`](Error::is_auth_rejected) one ("digest rejected"); a malformed or
/// oversized handshake message an [`is_bad_message`](Error::is_bad_message) one. Nothing past
/// the handshake is read from `stream`.
pub fn mp_server_handshake<S: Read + Write>(
    stream: S,
    key: &[u8],
    version: MpVersion,
) -> Result<MpConnection<S>> {
    let mut c = MpConnection::new(stream);
    server_side(&mut c, key, &challenge_message(version, Digest::Sha256)?)?;
    Ok(c)
}

/// The `Client` side of the handshake on an open stream: answer the listener's challenge, then
/// deliver ours (3.12+ form unless `version` is legacy). Errors as for
/// [`mp_server_handshake`]; with a wrong key against a Python `Listener`, the error is
/// [`is_auth_rejected`](Error::is_auth_rejected).
pub fn mp_client_handshake<S: Read + Write>(
    stream: S,
    key: &[u8],
    version: MpVersion,
) -> Result<MpConnection<S>> {
    let mut c = MpConnection::new(stream);
    client_side(&mut c, key, &challenge_message(version, Digest::Sha256)?)?;
    Ok(c)
}

/// Python's `Client(address, authkey=key)`: connects over TCP and runs the mutual handshake,
/// all within `timeout` (Python's own has no timeout: gh-123736). Afterwards the socket has no
/// timeout. An empty key is refused (gh-88118).
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
    let (stream, peer, ()) = super::connect_and(addr, timeout, |io| {
        mp_client_handshake(io, key, version).map(drop)
    })?;
    Ok(MpConnection::new(stream).with_peer(peer))
}

/// The challenge message a listener of `version` and `digest` sends (random each time).
pub(super) fn listener_challenge(version: MpVersion, digest: Digest) -> Result<Vec<u8>> {
    Ok(challenge_message(version, digest)?)
}

/// Runs the listener side over a server connection, with the middleware's deadline.
pub(crate) fn serve<S: Read + Write>(
    io: S,
    key: &[u8],
    version: MpVersion,
    digest: Digest,
) -> Result<()> {
    let mut c = MpConnection::new(io);
    server_side(&mut c, key, &challenge_message(version, digest)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mp::write_frame;

    /// A scripted peer: reads come from `input`, writes are recorded.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Script {
        fn new(frames: &[&str]) -> Script {
            Script {
                input: io::Cursor::new(hex::decode(frames.concat()).unwrap()),
                output: Vec::new(),
            }
        }

        fn unread(&self) -> usize {
            self.input.get_ref().len() - self.input.position() as usize
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    // Transcripts recorded from CPython itself. Derivation: a script ran `Listener(...,
    // authkey=KEY).accept()` in one interpreter and `Client(..., authkey=KEY)` in another, with
    // `os.urandom` patched to return the bytes START, START+1, ... (START = 0x01 for the
    // listener, 0x41 for the client; each side called it once) and `Connection._send` wrapped
    // to record every byte each side sent. Pairs run: 3.12.1/3.12.1 and 3.13.0/3.13.0 (identical
    // bytes), 3.11.7/3.11.7, 3.12.1 listener/3.11.7 client, 3.11.7 listener/3.12.1 client.
    // Each string is one `_send` call: 4-byte length, then the payload.
    const KEY: &[u8] = b"socketserver test key";

    /// 3.12+ listener: `#CHALLENGE#{sha256}` + 01..28.
    const L_CHALLENGE_312: &str = "0000003b234348414c4c454e4745237b7368613235367d\
        0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728";
    /// 3.11 listener: `#CHALLENGE#` + 01..14.
    const L_CHALLENGE_311: &str =
        "0000001f234348414c4c454e4745230102030405060708090a0b0c0d0e0f1011121314";
    /// 3.12+ client: `#CHALLENGE#{sha256}` + 41..68.
    const C_CHALLENGE_312: &str = "0000003b234348414c4c454e4745237b7368613235367d\
        4142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f606162636465666768";
    /// 3.11 client: `#CHALLENGE#` + 41..54.
    const C_CHALLENGE_311: &str =
        "0000001f234348414c4c454e4745234142434445464748494a4b4c4d4e4f5051525354";
    const WELCOME_FRAME: &str = "000000092357454c434f4d4523";
    const FAILURE_FRAME: &str = "00000009234641494c55524523";
    /// 3.12+ answer to the 3.12+ listener challenge: `{sha256}` + HMAC-SHA256(KEY, `{sha256}`01..28).
    const ANSWER_312_TO_312_L: &str = "000000287b7368613235367d\
        811e55e0619ab1f158dbdc55eac8c5f80b829466f9ecd931bb1b6ef0ce42060a";
    /// 3.12+ answer to the 3.12+ client challenge: `{sha256}` + HMAC-SHA256(KEY, `{sha256}`41..68).
    const ANSWER_312_TO_312_C: &str = "000000287b7368613235367d\
        dbbd6d1f27cc11f0497d13308c62f466dba94b4003cf2cfe99a60c7f5ad7e660";
    /// Any version's answer to the 3.11 listener challenge: HMAC-MD5(KEY, 01..14).
    const ANSWER_TO_311_L: &str = "00000010f2866926e6f3a3bf1ba9bbd714f92d83";
    /// Any version's answer to the 3.11 client challenge: HMAC-MD5(KEY, 41..54).
    const ANSWER_TO_311_C: &str = "000000103cb498f5e101529ca32887219442656c";
    /// 3.11 client's answer to the 3.12+ listener challenge: HMAC-MD5(KEY, `{sha256}`01..28).
    const ANSWER_311_TO_312_L: &str = "000000100d2361484115f17fcb1e2cf6de97b488";
    /// 3.11 listener's answer to the 3.12+ client challenge: HMAC-MD5(KEY, `{sha256}`41..68).
    const ANSWER_311_TO_312_C: &str = "00000010a62e1b1a8038b320a66c307a9de16a4a";

    fn modern(start: u8) -> Vec<u8> {
        let mut m = b"{sha256}".to_vec();
        m.extend((0..40).map(|i| start + i));
        m
    }

    fn legacy(start: u8) -> Vec<u8> {
        (0..20).map(|i| start + i).collect()
    }

    fn run_server(message: &[u8], key: &[u8], input: &[&str]) -> (Result<()>, Script) {
        let mut c = MpConnection::new(Script::new(input));
        let r = server_side(&mut c, key, message);
        (r, c.into_inner())
    }

    fn run_client(message: &[u8], key: &[u8], input: &[&str]) -> (Result<()>, Script) {
        let mut c = MpConnection::new(Script::new(input));
        let r = client_side(&mut c, key, message);
        (r, c.into_inner())
    }

    fn wire(frames: &[&str]) -> String {
        frames.concat()
    }

    #[test]
    fn modern_listener_transcript_matches_cpython_3_12() {
        let input = [ANSWER_312_TO_312_L, C_CHALLENGE_312, WELCOME_FRAME];
        let (r, s) = run_server(&modern(1), KEY, &input);
        r.unwrap();
        let want = wire(&[L_CHALLENGE_312, WELCOME_FRAME, ANSWER_312_TO_312_C]);
        assert_eq!(hex::encode(&s.output), want);
        assert_eq!(s.unread(), 0);
    }

    #[test]
    fn modern_client_transcript_matches_cpython_3_12() {
        let input = [L_CHALLENGE_312, WELCOME_FRAME, ANSWER_312_TO_312_C];
        let (r, s) = run_client(&modern(0x41), KEY, &input);
        r.unwrap();
        let want = wire(&[ANSWER_312_TO_312_L, C_CHALLENGE_312, WELCOME_FRAME]);
        assert_eq!(hex::encode(&s.output), want);
        assert_eq!(s.unread(), 0);
    }

    #[test]
    fn legacy_listener_transcript_matches_cpython_3_11() {
        let input = [ANSWER_TO_311_L, C_CHALLENGE_311, WELCOME_FRAME];
        let (r, s) = run_server(&legacy(1), KEY, &input);
        r.unwrap();
        let want = wire(&[L_CHALLENGE_311, WELCOME_FRAME, ANSWER_TO_311_C]);
        assert_eq!(hex::encode(&s.output), want);
    }

    #[test]
    fn legacy_client_transcript_matches_cpython_3_11() {
        let input = [L_CHALLENGE_311, WELCOME_FRAME, ANSWER_TO_311_C];
        let (r, s) = run_client(&legacy(0x41), KEY, &input);
        r.unwrap();
        let want = wire(&[ANSWER_TO_311_L, C_CHALLENGE_311, WELCOME_FRAME]);
        assert_eq!(hex::encode(&s.output), want);
    }

    #[test]
    fn modern_listener_with_a_3_11_client_matches_cpython_3_12() {
        // A 3.11 client answers the {sha256} challenge with raw HMAC-MD5 over all of it, and
        // sends a bare 20-byte challenge, which a 3.12 listener answers with raw HMAC-MD5.
        let input = [ANSWER_311_TO_312_L, C_CHALLENGE_311, WELCOME_FRAME];
        let (r, s) = run_server(&modern(1), KEY, &input);
        r.unwrap();
        let want = wire(&[L_CHALLENGE_312, WELCOME_FRAME, ANSWER_TO_311_C]);
        assert_eq!(hex::encode(&s.output), want);
    }

    #[test]
    fn modern_client_with_a_3_11_listener_matches_cpython_3_12() {
        let input = [L_CHALLENGE_311, WELCOME_FRAME, ANSWER_311_TO_312_C];
        let (r, s) = run_client(&modern(0x41), KEY, &input);
        r.unwrap();
        let want = wire(&[ANSWER_TO_311_L, C_CHALLENGE_312, WELCOME_FRAME]);
        assert_eq!(hex::encode(&s.output), want);
    }

    #[test]
    fn wrong_answer_gets_failure_and_digest_wrong() {
        // The client's answer was made with KEY; the server holds another key.
        let input = [ANSWER_312_TO_312_L, C_CHALLENGE_312, WELCOME_FRAME];
        let (r, s) = run_server(&modern(1), b"another key", &input);
        let e = r.unwrap_err();
        assert!(e.is_auth_failed(), "{e:?}");
        assert!(e.to_string().starts_with("digest wrong"), "{e}");
        assert_eq!(
            hex::encode(&s.output),
            wire(&[L_CHALLENGE_312, FAILURE_FRAME])
        );
        // Nothing after the answer was read.
        assert_eq!(s.unread(), hex::decode(wire(&input[1..])).unwrap().len());
    }

    #[test]
    fn failure_verdict_is_digest_rejected() {
        let (r, s) = run_client(
            &modern(0x41),
            b"another key",
            &[L_CHALLENGE_312, FAILURE_FRAME],
        );
        let e = r.unwrap_err();
        assert!(e.is_auth_rejected(), "{e:?}");
        assert!(e.to_string().starts_with("digest rejected"), "{e}");
        assert_eq!(s.output.len(), 4 + 8 + 32);
        assert_ne!(hex::encode(&s.output), ANSWER_312_TO_312_L);
    }

    fn frame(payload: &[u8]) -> String {
        let mut v = Vec::new();
        write_frame(&mut v, payload).unwrap();
        hex::encode(v)
    }

    #[test]
    fn server_accepts_every_answer_cpython_3_12_accepts() {
        let message = modern(1);
        let mut answers = vec![Digest::Md5.mac(KEY, &[&message])];
        for d in Digest::ALL {
            let mut a = format!("{{{d}}}").into_bytes();
            a.extend(d.mac(KEY, &[&message]));
            answers.push(a);
        }
        for answer in answers {
            let input = [frame(&answer), C_CHALLENGE_312.into(), WELCOME_FRAME.into()];
            let input: Vec<&str> = input.iter().map(String::as_str).collect();
            let (r, s) = run_server(&message, KEY, &input);
            r.unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&answer)));
            assert!(hex::encode(&s.output).starts_with(&wire(&[L_CHALLENGE_312, WELCOME_FRAME])));
        }
        // A legacy challenge may be answered with a stronger, prefixed digest too.
        let message = legacy(1);
        let mut answer = b"{sha384}".to_vec();
        answer.extend(Digest::Sha384.mac(KEY, &[&message]));
        let (r, _) = run_server(
            &message,
            KEY,
            &[&frame(&answer), C_CHALLENGE_311, WELCOME_FRAME],
        );
        r.unwrap();
    }

    #[test]
    fn server_rejects_what_cpython_3_12_rejects() {
        let message = modern(1);
        let good = Digest::Sha256.mac(KEY, &[&message]);
        let sha1ish = [b"{sha1}".as_slice(), &good[..20]].concat();
        let truncated = [b"{sha256}".as_slice(), &good[..31]].concat();
        let md5_20 = [&Digest::Md5.mac(KEY, &[&message])[..], b"xxxx"].concat();
        let unprefixed = good.clone();
        let no_close = [b"{sha256".as_slice(), &good].concat();
        for bad in [sha1ish, truncated, md5_20, unprefixed, no_close, Vec::new()] {
            let (r, s) = run_server(&message, KEY, &[&frame(&bad)]);
            let e = r.unwrap_err();
            assert!(e.is_auth_failed(), "{}: {e:?}", hex::encode(&bad));
            assert_eq!(
                hex::encode(&s.output),
                wire(&[L_CHALLENGE_312, FAILURE_FRAME])
            );
        }
    }

    #[test]
    fn client_answers_with_the_digest_the_challenge_names() {
        let mut message = b"{sha3_384}".to_vec();
        message.extend([7u8; 40]);
        let mut challenge = CHALLENGE.to_vec();
        challenge.extend(&message);
        let (r, s) = run_client(&legacy(0x41), KEY, &[&frame(&challenge), WELCOME_FRAME]);
        // The input ran out after the verdict: the answer was accepted and ours was sent.
        assert!(r.unwrap_err().io_error().is_some());
        let mut want = b"{sha3_384}".to_vec();
        want.extend(Digest::Sha3_384.mac(KEY, &[&message]));
        let want = wire(&[&frame(&want), C_CHALLENGE_311]);
        assert_eq!(hex::encode(&s.output), want);
    }

    #[test]
    fn client_rejects_bad_challenges() {
        let cases: [(&[u8], &str); 5] = [
            (b"#WELCOME#", "expected a challenge"),
            (b"#CHALLENGE#0123456789012345678", "challenge too short"),
            (b"#CHALLENGE#012345678901234567890", "unsupported"),
            (b"#CHALLENGE#{sha1}01234567890123456789", "unsupported"),
            (b"#CHALLENGE#{SHA256}01234567890123456789", "unsupported"),
        ];
        for (challenge, detail) in cases {
            let (r, s) = run_client(&modern(0x41), KEY, &[&frame(challenge)]);
            let e = r.unwrap_err();
            assert!(e.is_bad_message(), "{e:?}");
            assert!(e.to_string().contains(detail), "{e}");
            assert!(s.output.is_empty());
        }
    }

    #[test]
    fn handshake_messages_over_256_bytes_are_bad_message_length() {
        let long = frame(&[0u8; 257]);
        let (r, s) = run_server(&modern(1), KEY, &[&long]);
        let e = r.unwrap_err();
        assert!(e.is_bad_message(), "{e:?}");
        assert!(e.to_string().contains("bad message length"), "{e}");
        // No verdict: like Python, an oversized answer ends the handshake without #FAILURE#.
        assert_eq!(hex::encode(&s.output), L_CHALLENGE_312);
        let (r, _) = run_client(&modern(0x41), KEY, &["ffffffff", "ffffffffffffffff"]);
        assert!(r.unwrap_err().to_string().contains("bad message length"));
        // 256 bytes is still allowed (and here simply a wrong answer).
        let (r, _) = run_server(&modern(1), KEY, &[&frame(&[0u8; 256])]);
        assert!(r.unwrap_err().is_auth_failed());
    }

    #[test]
    fn empty_key_is_refused() {
        let (r, s) = run_server(&modern(1), b"", &[]);
        assert!(r.unwrap_err().is_config());
        assert!(s.output.is_empty());
        let (r, _) = run_client(&modern(1), b"", &[L_CHALLENGE_312]);
        assert!(r.unwrap_err().is_config());
    }

    #[test]
    fn challenges_have_python_shapes() {
        let m = challenge_message(MpVersion::Legacy, Digest::Sha256).unwrap();
        assert_eq!(m.len(), 20);
        let m = challenge_message(MpVersion::Modern, Digest::Sha256).unwrap();
        assert_eq!(&m[..8], b"{sha256}");
        assert_eq!(m.len(), 48);
        assert_ne!(
            m,
            challenge_message(MpVersion::Modern, Digest::Sha256).unwrap()
        );
        let m = challenge_message(MpVersion::Modern, Digest::Sha3_384).unwrap();
        assert_eq!(&m[..10], b"{sha3_384}");
        assert_eq!(m.len(), 50);
    }

    #[test]
    fn digest_prefix_parsing_follows_python() {
        assert_eq!(split_digest(&[0u8; 20]).unwrap().0, None);
        assert_eq!(split_digest(&[0u8; 16]).unwrap().0, None);
        let m = b"{sha256}0123456789012345678901234567890123456789";
        assert_eq!(split_digest(m).unwrap(), (Some(Digest::Sha256), &m[8..]));
        let m = b"{sha3_384}0123456789012345678901234567890123456789";
        assert_eq!(split_digest(m).unwrap().0, Some(Digest::Sha3_384));
        assert!(split_digest(b"{sha1}xxxxxxxxxxxxxxxxxxxxxxxxx").is_none());
        assert!(split_digest(b"0123456789012345678901234").is_none());
        // Python looks for '}' only within the first 10 bytes.
        assert!(split_digest(b"{sha3_3845}xxxxxxxxxxxxxxxxxxx").is_none());
        assert!(split_digest(b"{").is_none());
        assert!(split_digest(b"").is_none());
    }
}
