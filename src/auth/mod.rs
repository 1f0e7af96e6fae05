//! The authentication middleware: a challenge-response handshake run on the connection's own
//! thread before the handler, bounded in time and in how many may be unfinished at once.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub(crate) mod deadline;
pub(crate) mod mac;
pub(crate) mod random;

use crate::control::{Control, Counters, lock};
use crate::error::Kind;
use crate::mp::{self, MpVersion};
use crate::wait::deadline_after;
use crate::{Addr, Error, Result, Stream};
use deadline::DeadlineIo;
pub use mac::Digest;

/// Length of the classic handshake's challenge (`os.urandom(32)` in the tutorial).
pub const CHALLENGE_LEN: usize = 32;

#[derive(Clone, Debug)]
enum Protocol {
    Hmac(Digest),
    Multiprocessing(MpVersion, Digest),
}

/// Authentication for a stream server: which handshake, the key, and its limits.
///
/// Enable it with [`Builder::auth`](crate::Builder::auth). The handshake runs on the
/// connection's worker thread (never on the accepting thread, except in
/// [`Dispatch::Sync`](crate::Dispatch::Sync) mode, where every request runs on the one serving
/// thread: there a silent client holds the server for the handshake timeout, so serve untrusted
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
/// use std::time::Duration;
///
/// let auth = Auth::hmac(b"secret".to_vec())
///     .digest(Digest::Md5)
///     .handshake_timeout(Duration::from_secs(2))
///     .max_pending(32);
/// ```
#[derive(Clone)]
pub struct Auth {
    key: Vec<u8>,
    protocol: Protocol,
    timeout: Duration,
    max_pending: Option<usize>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("key", &"<redacted>")
            .field("protocol", &self.protocol)
            .field("timeout", &self.timeout)
            .field("max_pending", &self.max_pending)
            .finish()
    }
}

impl Auth {
    /// The default handshake timeout: a client must finish within this.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    fn new(key: Vec<u8>, protocol: Protocol) -> Auth {
        Auth {
            key,
            protocol,
            timeout: Self::DEFAULT_TIMEOUT,
            max_pending: None,
        }
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

    /// How long a client has to complete the handshake (default 5 s), so that a silent client
    /// cannot hold a worker.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Auth {
        self.timeout = timeout;
        self
    }

    /// The most handshakes that may be unfinished at once (like OpenSSH's `MaxStartups`). When a
    /// new connection finds the cap reached, the oldest unfinished handshake is cut (counted in
    /// [`Stats::handshake_evictions`](crate::Stats::handshake_evictions)), so silent connections
    /// can hold at most this many workers while honest clients, which answer in a round trip,
    /// get through. Default: half the pool in pool mode, half of `max_connections` in capped
    /// thread mode (but at least 4, or all of them when fewer), 64 otherwise.
    ///
    /// The limit of this policy: a burst of more than `max` new connections arriving within
    /// one round trip of an honest client can cut its handshake too (nothing tells the two
    /// apart before the client answers); that client sees the connection closed and should
    /// retry. Held silent connections, however many, cannot starve it.
    pub fn max_pending(mut self, max: usize) -> Auth {
        self.max_pending = Some(max);
        self
    }

    /// The configured handshake timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// One unfinished handshake, visible to newer ones that may need to evict it.
struct Pending {
    id: u64,
    stream: Stream,
    evicted: AtomicBool,
}

struct PendingTable {
    cap: usize,
    next_id: u64,
    queue: VecDeque<Arc<Pending>>,
}

/// The server side of [`Auth`], built with the server.
pub(crate) struct AuthServer {
    auth: Auth,
    pending: Mutex<PendingTable>,
}

/// Removes a handshake from the pending table when it ends, however it ends.
struct PendingGuard<'a> {
    server: &'a AuthServer,
    entry: Arc<Pending>,
}

impl PendingGuard<'_> {
    /// Leaves the table; false if a newer connection evicted this handshake first (its socket
    /// is then shut down, so even a correct answer must not reach the handler).
    fn leave(&self) -> bool {
        let mut t = lock(&self.server.pending);
        if let Some(i) = t.queue.iter().position(|p| p.id == self.entry.id) {
            t.queue.remove(i);
        }
        !self.entry.evicted.load(Ordering::Relaxed)
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

impl AuthServer {
    pub(crate) fn new(auth: Auth, default_cap: usize) -> Result<AuthServer> {
        if auth.key.is_empty() {
            return Err(Error::config("authentication key must not be empty"));
        }
        if auth.timeout.is_zero() {
            return Err(Error::config("handshake timeout must be positive"));
        }
        let cap = auth.max_pending.unwrap_or(default_cap).max(1);
        Ok(AuthServer {
            auth,
            pending: Mutex::new(PendingTable {
                cap,
                next_id: 0,
                queue: VecDeque::new(),
            }),
        })
    }

    fn enter(&self, stream: &Stream, control: &Control) -> PendingGuard<'_> {
        let mut t = lock(&self.pending);
        while t.queue.len() >= t.cap {
            let Some(old) = t.queue.pop_front() else {
                break;
            };
            old.evicted.store(true, Ordering::Relaxed);
            let _ = old.stream.shutdown(Shutdown::Both);
            Counters::bump(&control.counters.handshake_evictions);
        }
        let entry = Arc::new(Pending {
            id: t.next_id,
            stream: stream.clone(),
            evicted: AtomicBool::new(false),
        });
        t.next_id += 1;
        t.queue.push_back(entry.clone());
        PendingGuard {
            server: self,
            entry,
        }
    }

    /// Runs the handshake; true if the client may proceed to the handler.
    pub(crate) fn admit(&self, stream: &Stream, peer: &Addr, control: &Control) -> bool {
        let guard = self.enter(stream, control);
        let io = DeadlineIo::new(stream, self.auth.timeout);
        let result = match self.auth.protocol {
            Protocol::Hmac(d) => serve_hmac(io, &self.auth.key, d),
            Protocol::Multiprocessing(v, d) => mp::serve(io, &self.auth.key, v, d),
        };
        let counters = &control.counters;
        let kept = guard.leave();
        match result {
            _ if !kept => {
                log::info!("handshake with {peer} cut: too many unfinished handshakes");
            }
            Ok(()) => return true,
            Err(e) if e.is_timeout() => {
                Counters::bump(&counters.handshake_timeouts);
                log::warn!(
                    "handshake with {peer} timed out after {:?}",
                    self.auth.timeout
                );
            }
            Err(e) => {
                Counters::bump(&counters.auth_failures);
                log::warn!("authentication failed for {peer}: {e}");
            }
        }
        false
    }
}

/// The classic server side: 32 random bytes out, exactly the hex digest's length back (never
/// more: what follows is the handler's), verified in constant time.
fn serve_hmac<S: Read + Write>(mut io: S, key: &[u8], digest: Digest) -> Result<()> {
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

/// Connects to `addr` (trying each resolved address) and runs `handshake` on the new stream,
/// all within `timeout`. The stream is left without socket timeouts.
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
