//! Stream transports: accepting TCP and Unix-domain connections, and serving each one through
//! the authentication middleware and a [`Handler`]'s lifecycle.

use std::io;
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use super::socket::OwnedPath;
use super::{Incoming, Listener, Service};
use crate::admission::Pipeline;
use crate::control::Control;
use crate::lifecycle;
use crate::log_limit::limited;
use crate::worker::Ctx;
use crate::{Addr, Handler, Request, Stream};

/// An accepted connection waiting for a worker.
pub struct Accepted {
    stream: Stream,
    peer: Addr,
}

impl Incoming for Accepted {
    fn peer(&self) -> &Addr {
        &self.peer
    }

    fn stream(&self) -> Option<&Stream> {
        Some(&self.stream)
    }

    fn reject(self) {
        close(&self.stream, &self.peer);
    }
}

/// Python's `shutdown_request`: half-close so the client sees end-of-file after everything we
/// wrote, then close (when the last handle drops).
fn close(stream: &Stream, peer: &Addr) {
    if let Err(e) = stream.shutdown(Shutdown::Write)
        && e.kind() != io::ErrorKind::NotConnected
    {
        log::debug!("shutdown of connection from {peer}: {e}");
    }
}

/// Accepted sockets inherit `O_NONBLOCK` from the listener on the BSDs and macOS (not on Linux);
/// handlers expect blocking sockets.
fn make_blocking(s: impl AsFd) -> io::Result<()> {
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    rustix::io::ioctl_fionbio(s, false)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = s;
    Ok(())
}

/// A listening TCP socket.
pub struct TcpAcceptor {
    pub(crate) listener: TcpListener,
    pub(crate) track_activity: bool,
}

impl Listener for TcpAcceptor {
    type Request = Accepted;

    fn accept(&self, _: &Control) -> io::Result<Accepted> {
        let (s, peer) = self.listener.accept()?;
        make_blocking(&s)?;
        Ok(Accepted {
            stream: Stream::tcp(s, self.track_activity),
            peer: Addr::from_peer(peer),
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    fn local_addr(&self) -> Addr {
        self.listener
            .local_addr()
            .map_or(Addr::Unix(None), Addr::Inet)
    }
}

/// A listening Unix-domain stream socket; removes its socket file when dropped.
pub struct UnixAcceptor {
    pub(crate) listener: UnixListener,
    pub(crate) track_activity: bool,
    pub(crate) _path: Option<OwnedPath>,
}

impl Listener for UnixAcceptor {
    type Request = Accepted;

    fn accept(&self, _: &Control) -> io::Result<Accepted> {
        let (s, peer) = self.listener.accept()?;
        make_blocking(&s)?;
        Ok(Accepted {
            stream: Stream::unix(s, self.track_activity),
            peer: Addr::from_unix(&peer),
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    fn local_addr(&self) -> Addr {
        self.listener
            .local_addr()
            .map_or(Addr::Unix(None), |a| Addr::from_unix(&a))
    }
}

/// Serves connections: admission (the handshakes, if any), timeouts, then the handler.
pub struct StreamService<H> {
    pub(crate) factory: Box<dyn Fn() -> H + Send + Sync>,
    pub(crate) admission: Pipeline,
    pub(crate) read_timeout: Option<Duration>,
    pub(crate) write_timeout: Option<Duration>,
    /// `TCP_NODELAY` for TCP connections, set on the listener (accepted sockets inherit it).
    pub(crate) nodelay: bool,
}

impl<H> StreamService<H> {
    pub(crate) fn new(factory: Box<dyn Fn() -> H + Send + Sync>) -> Self {
        StreamService {
            factory,
            admission: Pipeline::default(),
            read_timeout: None,
            write_timeout: None,
            nodelay: true,
        }
    }

    fn apply_timeouts(&self, s: &Stream) -> io::Result<()> {
        if self.read_timeout.is_some() {
            s.set_read_timeout(self.read_timeout)?;
        }
        if self.write_timeout.is_some() {
            s.set_write_timeout(self.write_timeout)?;
        }
        Ok(())
    }
}

impl<H: Handler> Service for StreamService<H> {
    type Request = Accepted;

    fn prepare(&mut self, limit: Option<usize>) -> crate::Result<()> {
        // The OS refuses a zero socket timeout; say so once, at build, rather than on every
        // connection.
        if self.read_timeout == Some(Duration::ZERO) || self.write_timeout == Some(Duration::ZERO) {
            return Err(crate::Error::config(
                "a read or write timeout of zero: use None for no timeout",
            ));
        }
        self.admission.prepare(limit)
    }

    fn serve(&self, conn: Accepted, ctx: &Ctx) {
        let Accepted { stream, mut peer } = conn;
        // Kept to the end: it holds the client's count under max_per_source.
        let Some(learnt) = self
            .admission
            .admit(&stream, &mut peer, &ctx.handle.control)
        else {
            return close(&stream, &peer);
        };
        if let Err(e) = self.apply_timeouts(&stream) {
            limited!(warn, "cannot set timeouts on connection from {peer}: {e}");
            return close(&stream, &peer);
        }
        let Some(mut handler) = lifecycle::make(&*self.factory, &peer, ctx) else {
            return close(&stream, &peer);
        };
        let mut req = Request {
            stream,
            peer,
            server: ctx.handle.clone(),
            #[cfg(feature = "proxy-protocol")]
            proxy: learnt.proxy.clone(),
        };
        lifecycle::run(&mut handler, &mut req, ctx);
        drop(handler);
        close(&req.stream, &req.peer);
        drop(learnt);
    }

    fn learns_client(&self) -> bool {
        self.admission.learns_client()
    }

    fn take_verify(
        &mut self,
        hook: crate::admission::VerifyHook,
    ) -> Option<crate::admission::VerifyHook> {
        self.admission.take_verify(hook)
    }
}
