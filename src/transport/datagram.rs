//! Datagram transports: receiving UDP and Unix-domain datagrams, and serving each one through a
//! [`DatagramHandler`]'s lifecycle, sending the reply it wrote.

use std::ffi::OsStr;
use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{RecvFlags, SocketAddrAny, SocketAddrUnix};

use super::socket::OwnedPath;
use super::{Incoming, Listener, Service};
use crate::control::Control;
use crate::datagram::Sock;
use crate::log_limit::limited;
use crate::worker::Ctx;
use crate::{Addr, DatagramHandler, DatagramRequest, lifecycle};

/// Python's `UDPServer.max_packet_size`.
pub(crate) const DEFAULT_MAX_PACKET_SIZE: usize = 8192;

/// The amplification guard of UDP servers: replies to a datagram total at most this many times
/// its size. QUIC's limit for a server that has not validated its client's address (RFC 9000
/// §8.1).
pub(crate) const DEFAULT_MAX_REPLY_RATIO: usize = 3;

/// A bound datagram socket, UDP or Unix-domain; removes its socket file when dropped.
pub struct DatagramSocket {
    pub(crate) sock: Arc<Sock>,
    pub(crate) max_packet_size: usize,
    pub(crate) _path: Option<OwnedPath>,
}

/// A received datagram waiting for a worker.
pub struct Received {
    packet: Vec<u8>,
    peer: Addr,
    sock: Arc<Sock>,
}

impl Incoming for Received {
    fn peer(&self) -> &Addr {
        &self.peer
    }

    fn reject(self) {}
}

fn peer_addr(a: Option<SocketAddrAny>) -> Addr {
    let Some(a) = a else {
        return Addr::Unix(None);
    };
    if let Ok(inet) = SocketAddr::try_from(a.clone()) {
        // Linux's dual-stack UDP sockets send to an IPv4 address as they would to its mapped
        // form, so the reply still finds the client.
        return Addr::from_peer(inet);
    }
    let path = SocketAddrUnix::try_from(a)
        .ok()
        .and_then(|u| u.path_bytes().map(|b| PathBuf::from(OsStr::from_bytes(b))));
    Addr::Unix(path.filter(|p| !p.as_os_str().is_empty()))
}

impl Listener for DatagramSocket {
    type Request = Received;
    const STREAMS: bool = false;

    fn accept(&self, control: &Control) -> io::Result<Received> {
        // Linux's MSG_TRUNC reports a datagram's real length; elsewhere a byte of room beyond
        // the limit tells an oversized one apart.
        #[cfg(target_os = "linux")]
        let (mut packet, flags) = (Vec::with_capacity(self.max_packet_size), RecvFlags::TRUNC);
        #[cfg(not(target_os = "linux"))]
        let (mut packet, flags) = (
            Vec::with_capacity(self.max_packet_size.saturating_add(1)),
            RecvFlags::empty(),
        );
        let (_, len, from) = rustix::net::recvfrom(
            self.sock.fd(),
            rustix::buffer::spare_capacity(&mut packet),
            flags,
        )?;
        let peer = peer_addr(from);
        if len > self.max_packet_size {
            control.record(crate::recorder::Event::OversizedDatagram);
            limited!(
                warn,
                "datagram of {len} bytes from {peer} exceeds max_packet_size ({} bytes): dropped",
                self.max_packet_size
            );
            // Not a request: the accept loop checks for shutdown and receives again.
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        Ok(Received {
            packet,
            peer,
            sock: self.sock.clone(),
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.sock.fd()
    }

    fn local_addr(&self) -> Addr {
        match &*self.sock {
            Sock::Udp(s) => s.local_addr().map_or(Addr::Unix(None), Addr::Inet),
            Sock::Unix(s) => s
                .local_addr()
                .map_or(Addr::Unix(None), |a| Addr::from_unix(&a)),
        }
    }
}

/// Serves datagrams: the handler's lifecycle, then the reply it wrote.
pub struct DatagramService<H> {
    pub(crate) factory: Box<dyn Fn() -> H + Send + Sync>,
    pub(crate) send_empty_reply: bool,
    pub(crate) reply_timeout: Duration,
    pub(crate) max_packet_size: usize,
    /// Replies to a datagram total at most this many times its size; `None`: no limit.
    pub(crate) max_reply_ratio: Option<usize>,
}

impl<H> DatagramService<H> {
    /// A service with Python's defaults, and `max_reply_ratio` as its amplification guard.
    pub(crate) fn new(
        factory: Box<dyn Fn() -> H + Send + Sync>,
        max_reply_ratio: Option<usize>,
    ) -> Self {
        DatagramService {
            factory,
            send_empty_reply: false,
            reply_timeout: Duration::from_secs(5),
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            max_reply_ratio,
        }
    }
}

impl<H: DatagramHandler> Service for DatagramService<H> {
    type Request = Received;
    /// Datagram servers do not run in event mode (refused when the server is built).
    type Session = std::convert::Infallible;

    fn session(&self, _: Received, _: &Ctx) -> Option<Self::Session> {
        None
    }

    fn resume(&self, session: &mut Self::Session, _: &Ctx) -> super::Step {
        match *session {}
    }

    fn end(&self, session: Self::Session, _: &Ctx) {
        match session {}
    }

    fn serve(&self, r: Received, ctx: &Ctx) {
        let Some(mut handler) = lifecycle::make(&*self.factory, &r.peer, ctx) else {
            return;
        };
        let mut req = DatagramRequest::new(
            r.packet,
            r.peer,
            r.sock,
            ctx.handle.clone(),
            self.max_reply_ratio,
        );
        if !lifecycle::run(&mut handler, &mut req, ctx) {
            return;
        }
        if req.wfile.is_empty() && !self.send_empty_reply {
            return;
        }
        // Over the amplification guard's budget, the reply is counted, logged and dropped.
        if req.take_reply_budget(req.wfile.len()).is_err() {
            return;
        }
        if let Err(e) = req.send_timeout(&req.wfile, self.reply_timeout) {
            limited!(warn, "cannot send reply to {}: {e}", req.peer_addr());
        }
    }
}
