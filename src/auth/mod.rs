//! Authentication protocols, both challenge-response handshakes in one place: the classic HMAC
//! handshake of the Python tutorial (`hmac.rs`) and `multiprocessing.connection`'s mutual one
//! (`mp.rs`), server and client sides, over the HMAC digests of `mac.rs` and challenges from
//! `random.rs`. The server side runs as a stage of the admission pipeline (`admission.rs`),
//! which owns its deadline and the cap on unfinished handshakes.

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

mod hmac;
pub(crate) mod mac;
mod mp;
pub(crate) mod random;

use crate::deadline::DeadlineIo;
use crate::error::Kind;
use crate::wait::deadline_after;
use crate::{Addr, Error, Result, Stream};
pub use hmac::{CHALLENGE_LEN, answer_challenge, connect_with_auth};
pub use mac::Digest;
pub use mp::{MpVersion, mp_client_handshake, mp_connect, mp_connect_with, mp_server_handshake};

#[derive(Clone, Debug)]
enum Protocol {
    Hmac(Digest),
    Multiprocessing(MpVersion, Digest),
}

/// Authentication for a stream server: which handshake, and the key. Its deadline and the cap
/// on unfinished handshakes are the builder's, shared by every admission stage:
/// [`Builder::handshake_timeout`](crate::Builder::handshake_timeout) and
/// [`Builder::max_pending_handshakes`](crate::Builder::max_pending_handshakes).
///
/// Enable it with [`Builder::auth`](crate::Builder::auth). The handshake runs on the
/// connection's worker thread (never on the accepting thread, except in
/// [`Dispatch::Sync`](crate::Dispatch::Sync) mode, where every request runs on the one serving
/// thread: there a silent client holds the server for the handshake deadline,
/// [`Builder::handshake_timeout`](crate::Builder::handshake_timeout), so serve untrusted
/// networks in thread or pool mode) before the handler's `setup`;
/// a client that fails it is logged with its address (never the key), counted in
/// [`Stats::auth_failures`](crate::Stats::auth_failures), and disconnected without the handler
/// ever running.
///
/// * [`Auth::hmac`]: the classic handshake of the Python tutorial. The server sends 32 random
///   bytes; the client answers with the lowercase hex HMAC of them; there is no acknowledgement.
///   SHA-256 by default; [`Digest::Md5`] for the tutorial's own clients.
/// * [`Auth::multiprocessing`]: the mutual handshake of Python's
///   `multiprocessing.connection.Listener`, after which the handler speaks framed messages
///   ([`MpConnection`](crate::MpConnection)).
///
/// ```
/// use socketserver::{Auth, Digest};
///
/// let auth = Auth::hmac(b"secret".to_vec()).digest(Digest::Md5);
/// ```
#[derive(Clone)]
pub struct Auth {
    key: Vec<u8>,
    protocol: Protocol,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("key", &"<redacted>")
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl Auth {
    fn new(key: Vec<u8>, protocol: Protocol) -> Auth {
        Auth { key, protocol }
    }

    /// The classic handshake with `key`, HMAC-SHA-256 unless [`digest`](Self::digest) says
    /// otherwise.
    pub fn hmac(key: impl Into<Vec<u8>>) -> Auth {
        Auth::new(key.into(), Protocol::Hmac(Digest::Sha256))
    }

    /// Python's `multiprocessing.connection` handshake with `key`, sending 3.12+ challenges
    /// (which 3.11 clients answer too) and accepting every answer CPython 3.12+ accepts.
    pub fn multiprocessing(key: impl Into<Vec<u8>>) -> Auth {
        Auth::new(
            key.into(),
            Protocol::Multiprocessing(MpVersion::Modern, Digest::Sha256),
        )
    }

    /// Which form of `multiprocessing` challenge to send: [`MpVersion::Legacy`] reproduces
    /// Python 3.11's exchange byte for byte. No effect on the classic handshake.
    pub fn mp_version(mut self, version: MpVersion) -> Auth {
        if let Protocol::Multiprocessing(v, _) = &mut self.protocol {
            *v = version;
        }
        self
    }

    /// The HMAC digest: for the classic handshake, the one clients must use; for
    /// `multiprocessing`, the one the server's challenge asks for.
    pub fn digest(mut self, digest: Digest) -> Auth {
        match &mut self.protocol {
            Protocol::Hmac(d) | Protocol::Multiprocessing(_, d) => *d = digest,
        }
        self
    }

    /// Refuses a configuration that could never admit anyone.
    pub(crate) fn check(&self) -> Result<()> {
        if self.key.is_empty() {
            return Err(Error::config("authentication key must not be empty"));
        }
        Ok(())
    }

    /// Runs the server side of the handshake over a connection whose I/O is bounded by the
    /// admission deadline.
    /// Event mode: sends the server's first message and says what answer to wait for.
    pub(crate) fn begin(&self, mut io: DeadlineIo<'_, Stream>) -> Result<AuthStep> {
        match self.protocol {
            Protocol::Hmac(d) => {
                let challenge = hmac::send_challenge(&mut io)?;
                Ok(AuthStep::Wait(
                    Need::Bytes(2 * d.output_len()),
                    AuthState(State::Hmac(challenge)),
                ))
            }
            Protocol::Multiprocessing(v, d) => {
                mp::check_key(&self.key)?;
                let message = mp::listener_challenge(v, d)?;
                mp::send_mp_challenge(&mut crate::MpConnection::new(io), &message)?;
                Ok(AuthStep::Wait(
                    Need::Frame,
                    AuthState(State::MpAnswer(message)),
                ))
            }
        }
    }

    /// Event mode: the answer [`begin`](Self::begin) (or an earlier `resume`) waited for is
    /// there; goes on to the next wait, or to the end.
    pub(crate) fn resume(&self, state: AuthState, io: DeadlineIo<'_, Stream>) -> Result<AuthStep> {
        match (state.0, &self.protocol) {
            (State::Hmac(challenge), Protocol::Hmac(d)) => {
                hmac::check_reply(io, &self.key, *d, &challenge)?;
                Ok(AuthStep::Done)
            }
            (State::MpAnswer(message), _) => {
                mp::check_mp_answer(&mut crate::MpConnection::new(io), &self.key, &message)?;
                Ok(AuthStep::Wait(Need::Frame, AuthState(State::MpChallenge)))
            }
            (State::MpChallenge, _) => {
                mp::send_mp_answer(&mut crate::MpConnection::new(io), &self.key)?;
                Ok(AuthStep::Wait(Need::Frame, AuthState(State::MpVerdict)))
            }
            (State::MpVerdict, _) => {
                mp::read_mp_verdict(&mut crate::MpConnection::new(io))?;
                Ok(AuthStep::Done)
            }
            (State::Hmac(_), _) => Err(Error::config("handshake state of another protocol")),
        }
    }

    pub(crate) fn serve(&self, io: DeadlineIo<'_, Stream>) -> Result<()> {
        match self.protocol {
            Protocol::Hmac(d) => hmac::serve(io, &self.key, d),
            Protocol::Multiprocessing(v, d) => mp::serve(io, &self.key, v, d),
        }
    }
}

/// Connects to `addr` (trying each resolved address) and runs `handshake` on the new stream,
/// all within `timeout`. The stream is left without socket timeouts.
/// Where an event-mode handshake stands: over, or waiting for the peer's next message.
pub(crate) enum AuthStep {
    Done,
    Wait(Need, AuthState),
}

/// What a handshake waits for before it can go on without blocking.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Need {
    /// This many bytes.
    Bytes(usize),
    /// A whole `multiprocessing.connection` frame (4-byte big-endian length, then that many).
    Frame,
}

impl Need {
    /// Whether `received` (peeked, not read) holds what is needed. A frame longer than a
    /// handshake message counts as whole: reading its length is enough to refuse it.
    pub(crate) fn is_met(self, received: &[u8]) -> bool {
        match self {
            Need::Bytes(n) => received.len() >= n,
            Need::Frame => match received.first_chunk::<4>() {
                None => false,
                Some(len) => {
                    let len = u32::from_be_bytes(*len) as usize;
                    len > 256 || received.len() >= 4 + len
                }
            },
        }
    }
}

/// What a parked handshake remembers between the peer's messages.
pub(crate) struct AuthState(State);

enum State {
    /// Classic: the challenge sent, waiting for its hex digest.
    Hmac([u8; CHALLENGE_LEN]),
    /// `multiprocessing`: our challenge sent, waiting for the answer.
    MpAnswer(Vec<u8>),
    /// `multiprocessing`: welcomed the client, waiting for its challenge.
    MpChallenge,
    /// `multiprocessing`: answered the client's challenge, waiting for its verdict.
    MpVerdict,
}

pub(crate) fn connect_and<T>(
    addr: impl ToSocketAddrs,
    timeout: Duration,
    handshake: impl FnOnce(DeadlineIo<'_, TcpStream>) -> Result<T>,
) -> Result<(TcpStream, Addr, T)> {
    let start = Instant::now();
    let deadline = deadline_after(timeout);
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| Error::io(None, e))?
        .collect();
    let mut last = Error::io(
        None,
        io::Error::new(io::ErrorKind::InvalidInput, "no address"),
    );
    for a in addrs {
        let peer = Addr::Inet(a);
        let connected = match deadline {
            None => TcpStream::connect(a),
            Some(d) => match d.checked_duration_since(Instant::now()) {
                None => return Err(Error::new(Kind::Timeout).with_addr(Some(&peer))),
                Some(left) => TcpStream::connect_timeout(&a, left),
            },
        };
        match connected {
            Ok(stream) => {
                let io = DeadlineIo::new(&stream, timeout.saturating_sub(start.elapsed()));
                let out = handshake(io).map_err(|e| e.with_addr(Some(&peer)))?;
                return Ok((stream, peer, out));
            }
            Err(e) => last = Error::io(Some(&peer), e),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_count_is_met_at_exactly_that_many_bytes() {
        let need = Need::Bytes(64);
        assert!(!need.is_met(&[]));
        assert!(!need.is_met(&[b'a'; 63]));
        assert!(need.is_met(&[b'a'; 64]));
        assert!(need.is_met(&[b'a'; 65]));
    }

    #[test]
    fn a_frame_is_met_when_whole_or_when_its_length_alone_refuses_it() {
        let frame = |len: u32, body: usize| [&len.to_be_bytes()[..], &vec![0; body]].concat();
        assert!(!Need::Frame.is_met(&[]));
        assert!(
            !Need::Frame.is_met(&[0, 0, 0]),
            "the length is not all there"
        );
        assert!(Need::Frame.is_met(&frame(0, 0)));
        assert!(!Need::Frame.is_met(&frame(5, 4)));
        assert!(Need::Frame.is_met(&frame(5, 5)));
        assert!(Need::Frame.is_met(&frame(5, 9)), "and the bytes after it");
        // 256 bytes is a handshake message: wait for all of it.
        assert!(!Need::Frame.is_met(&frame(256, 0)));
        assert!(!Need::Frame.is_met(&frame(256, 255)));
        assert!(Need::Frame.is_met(&frame(256, 256)));
        // Longer is refused by its length: no need to wait for the rest.
        assert!(Need::Frame.is_met(&frame(257, 0)));
        assert!(Need::Frame.is_met(&frame(u32::MAX, 0)));
    }

    #[test]
    fn an_event_mode_classic_handshake_waits_for_the_whole_hex_digest() {
        for digest in Digest::ALL {
            let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let stream = Stream::unix(ours, false);
            let io = DeadlineIo::new(&stream, Duration::from_secs(1));
            let step = Auth::hmac(b"key".to_vec())
                .digest(digest)
                .begin(io)
                .unwrap();
            let AuthStep::Wait(Need::Bytes(n), _) = step else {
                panic!("{digest}: not waiting for a byte count");
            };
            assert_eq!(n, 2 * digest.output_len(), "{digest}");
        }
    }

    #[test]
    fn the_key_is_never_shown() {
        let auth = Auth::hmac(b"hunter2".to_vec()).digest(Digest::Md5);
        let shown = format!("{auth:?}");
        assert!(
            shown.contains("<redacted>") && shown.contains("Md5"),
            "{shown}"
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("104, 117"),
            "{shown}"
        );
        assert!(Auth::hmac(Vec::new()).check().unwrap_err().is_config());
        Auth::multiprocessing(b"k".to_vec()).check().unwrap();
    }
}
