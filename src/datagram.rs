//! The datagram handler: Python's `DatagramRequestHandler`.

use std::fmt;
use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};

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
pub struct DatagramRequest {
    packet: Vec<u8>,
    peer: Addr,
    sock: Arc<Sock>,
    server: ServerHandle,
    /// The reply: sent back to the client as one datagram after `finish`.
    pub wfile: Vec<u8>,
}

impl DatagramRequest {
    pub(crate) fn new(packet: Vec<u8>, peer: Addr, sock: Arc<Sock>, server: ServerHandle) -> Self {
        DatagramRequest {
            packet,
            peer,
            sock,
            server,
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

    /// Sends a datagram to the client now, besides the reply in `wfile`.
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        self.send_timeout(buf, Duration::from_secs(5))
    }

    pub(crate) fn send_timeout(&self, buf: &[u8], timeout: Duration) -> io::Result<()> {
        self.sock.send_to(buf, &self.peer, timeout)
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
