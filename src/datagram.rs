//! The datagram handler: Python's `DatagramRequestHandler`.

use std::fmt;
use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};

use crate::log_limit::limited;
use crate::wait::{Polled, deadline_after, poll_until};

use crate::{Addr, HandlerResult, ServerHandle};

/// Serves one datagram of a [`UdpServer`](crate::UdpServer) or
/// [`UnixDatagramServer`](crate::UnixDatagramServer).
///
/// As with [`Handler`](crate::Handler), the server makes one per request with its factory and
/// calls `setup` → `handle` → `finish`. Whatever the handler wrote to
/// [`DatagramRequest::wfile`] is sent back to the client as one datagram when all three succeeded.
///
/// Unlike Python, an empty reply is not sent by default (an empty datagram is a real packet that
/// a client may take for an answer); turn it on with
/// [`Builder::send_empty_reply`](crate::Builder::send_empty_reply) for Python's behaviour.
///
/// ```
/// use socketserver::{DatagramHandler, DatagramRequest, HandlerResult};
///
/// struct Upper;
///
/// impl DatagramHandler for Upper {
///     fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult {
///         let reply = req.packet().to_ascii_uppercase();
///         req.wfile.extend_from_slice(&reply);
///         Ok(())
///     }
/// }
/// ```
pub trait DatagramHandler: Send + 'static {
    /// Runs before `handle`; if it fails, neither `handle` nor `finish` runs.
    fn setup(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        let _ = req;
        Ok(())
    }

    /// Serves the datagram.
    fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult;

    /// Runs after `handle`, whether it succeeded or not.
    fn finish(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        let _ = req;
        Ok(())
    }
}

/// One received datagram, as a [`DatagramHandler`] sees it.
///
/// # The amplification guard
///
/// A UDP source address can be forged: an attacker who sends small datagrams "from" a victim
/// makes a server send its replies to the victim, multiplied by however much larger the replies
/// are. So by default everything sent in answer to one UDP datagram, [`wfile`](Self::wfile)
/// and [`send`](Self::send) together, is at most 3× the datagram's size (the factor QUIC
/// allows a server before it has validated a client's address, RFC 9000 §8.1). A reply that
/// would go over is dropped whole (never truncated), logged (rate-limited) and counted in
/// [`Stats::amplification_dropped`](crate::Stats::amplification_dropped). Change the factor, or
/// turn the guard off, with [`Builder::max_reply_ratio`](crate::Builder::max_reply_ratio);
/// lift it for one request, once the handler knows the client is genuine (it proved it holds a
/// token, say), with [`allow_any_reply_size`](Self::allow_any_reply_size). Unix datagram
/// servers have no guard by default: the kernel sets a Unix datagram's source, so it cannot
/// be forged.
pub struct DatagramRequest {
    packet: Vec<u8>,
    peer: Addr,
    sock: Arc<Sock>,
    server: ServerHandle,
    /// Bytes that may still be sent in reply; `UNLIMITED` when the guard is off. Atomic so that
    /// `send` can take `&self`.
    reply_budget: AtomicUsize,
    /// The factor the budget was made with, for the log line.
    reply_ratio: Option<usize>,
    /// The reply: sent back to the client as one datagram after `finish`.
    pub wfile: Vec<u8>,
}

const UNLIMITED: usize = usize::MAX;

impl DatagramRequest {
    /// A request for `packet`, whose replies may total `reply_ratio` times its size (`None`:
    /// any size).
    pub(crate) fn new(
        packet: Vec<u8>,
        peer: Addr,
        sock: Arc<Sock>,
        server: ServerHandle,
        reply_ratio: Option<usize>,
    ) -> Self {
        let budget = reply_ratio.map_or(UNLIMITED, |r| r.saturating_mul(packet.len()));
        DatagramRequest {
            packet,
            peer,
            sock,
            server,
            reply_budget: AtomicUsize::new(budget),
            reply_ratio,
            wfile: Vec::new(),
        }
    }

    /// The datagram's payload (Python's `rfile`; `&[u8]` implements `Read`).
    pub fn packet(&self) -> &[u8] {
        &self.packet
    }

    /// The client's address. For a Unix datagram client that did not bind a path, it is unnamed
    /// and no reply can reach it.
    pub fn peer_addr(&self) -> &Addr {
        &self.peer
    }

    /// The server this datagram arrived on.
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// How many more bytes may be sent in answer to this datagram under the amplification guard
    /// (see [`DatagramRequest`]), [`send`](Self::send) and `wfile` together; `None` when there is
    /// no limit.
    pub fn reply_budget(&self) -> Option<usize> {
        match self.reply_budget.load(Ordering::Relaxed) {
            UNLIMITED => None,
            n => Some(n),
        }
    }

    /// Lifts the amplification guard for this request: replies of any size go out. Call it only
    /// once the client has shown that its address is genuine (it echoed a token the server sent
    /// it, say), or for clients known not to be reachable from a forged address.
    pub fn allow_any_reply_size(&mut self) {
        self.reply_budget.store(UNLIMITED, Ordering::Relaxed);
    }

    /// Sends a datagram to the client now, besides the reply in `wfile`.
    ///
    /// A datagram that would exceed the [reply budget](Self::reply_budget) is not sent: the
    /// error has kind [`PermissionDenied`](io::ErrorKind::PermissionDenied).
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        self.take_reply_budget(buf.len())?;
        self.send_timeout(buf, Duration::from_secs(5))
    }

    pub(crate) fn send_timeout(&self, buf: &[u8], timeout: Duration) -> io::Result<()> {
        self.sock.send_to(buf, &self.peer, timeout)
    }

    /// Takes `len` bytes from the reply budget, or, if they are not left, counts and logs the
    /// dropped reply and says why.
    pub(crate) fn take_reply_budget(&self, len: usize) -> io::Result<()> {
        let taken = self
            .reply_budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| match left {
                UNLIMITED => Some(UNLIMITED),
                left => left.checked_sub(len),
            });
        if taken.is_ok() {
            return Ok(());
        }
        self.server
            .control
            .record(crate::recorder::Event::AmplificationDropped);
        let why = format!(
            "reply of {len} bytes to {} dropped: replies to a datagram of {} bytes may total {} \
             bytes ({}x its size, the amplification guard; see Builder::max_reply_ratio)",
            self.peer,
            self.packet.len(),
            self.reply_ratio
                .unwrap_or(0)
                .saturating_mul(self.packet.len()),
            self.reply_ratio.unwrap_or(0),
        );
        limited!(warn, "{why}");
        Err(io::Error::new(io::ErrorKind::PermissionDenied, why))
    }
}

impl fmt::Debug for DatagramRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramRequest")
            .field("peer", &self.peer)
            .field("len", &self.packet.len())
            .finish_non_exhaustive()
    }
}

/// The server's datagram socket, which requests share to send their replies.
pub(crate) enum Sock {
    Udp(UdpSocket),
    Unix(UnixDatagram),
}

impl Sock {
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Udp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
        }
    }

    /// Sends one datagram to `to`. The socket is non-blocking (the acceptor polls it): a full UDP
    /// send buffer is waited out here, up to `timeout`. A Unix datagram peer whose queue is full
    /// is not reading; `poll` cannot tell when it will (it reports our own buffer as writable),
    /// so the datagram is dropped with an error rather than retried in a spin.
    pub(crate) fn send_to(&self, buf: &[u8], to: &Addr, timeout: Duration) -> io::Result<()> {
        let deadline = deadline_after(timeout);
        loop {
            let sent = match (self, to) {
                (Sock::Udp(s), Addr::Inet(a)) => s.send_to(buf, a),
                (Sock::Unix(s), Addr::Unix(Some(p))) => s.send_to(buf, p),
                (Sock::Unix(_), Addr::Unix(None)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrNotAvailable,
                        "the client socket is unnamed: a Unix datagram client must bind a path \
                         to get replies",
                    ));
                }
                _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
            };
            match sent {
                Ok(n) if n == buf.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("datagram sent short: {n} of {} bytes", buf.len()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Sock::Unix(_) = self {
                        return Err(io::Error::new(
                            io::ErrorKind::WouldBlock,
                            "the client's socket queue is full (it is not reading): reply dropped",
                        ));
                    }
                    let mut fds = [PollFd::from_borrowed_fd(self.fd(), PollFlags::OUT)];
                    if poll_until(&mut fds, deadline)? == Polled::TimedOut {
                        return Err(io::Error::from(io::ErrorKind::TimedOut));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}
