//! The four server kinds: how each binds. Everything after binding is the shared core.

use std::fmt;
use std::net::{TcpListener, ToSocketAddrs, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram as StdUnixDatagram, UnixListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use socket2::Type;

use crate::datagram::Sock;
use crate::transport::datagram::{DatagramService, DatagramSocket};
use crate::transport::socket::{bind_inet, bind_unix};
use crate::transport::stream::{StreamService, TcpAcceptor, UnixAcceptor};
use crate::transport::{DatagramTransport, StreamTransport, Tcp, Udp, Unix, UnixDatagram};
use crate::{Addr, Auth, Builder, DatagramHandler, Error, Handler, Result, Server};

/// A TCP server (IPv4 or IPv6): Python's `TCPServer` / `ThreadingTCPServer`.
///
/// ```no_run
/// use socketserver::{Handler, HandlerResult, Request, TcpServer};
/// use std::io::Write;
///
/// struct Hello;
/// impl Handler for Hello {
///     fn handle(&mut self, req: &mut Request) -> HandlerResult {
///         req.write_all(b"hello")?;
///         Ok(())
///     }
/// }
///
/// let server = TcpServer::bind("127.0.0.1:9000", || Hello)?;
/// server.serve_forever();
/// # Ok::<(), socketserver::Error>(())
/// ```
pub type TcpServer<H> = Server<Tcp<H>>;

/// A Unix-domain stream server on a filesystem path: Python's `UnixStreamServer`. Same handlers,
/// modes, hooks and authentication as [`TcpServer`]; the socket file is removed on close.
pub type UnixStreamServer<H> = Server<Unix<H>>;

/// A UDP server: Python's `UDPServer`, one [`DatagramHandler`] per datagram.
pub type UdpServer<H> = Server<Udp<H>>;

/// A Unix-domain datagram server: Python's `UnixDatagramServer`. Clients must bind a path of
/// their own to receive replies.
pub type UnixDatagramServer<H> = Server<UnixDatagram<H>>;

/// Resolves `addr` to the socket addresses to try. A failure names the address as the caller
/// wrote it (`nosuchhost:9000`), since there is no socket address to show.
fn resolve(addr: impl ToSocketAddrs + fmt::Debug) -> Result<Vec<std::net::SocketAddr>> {
    let fail = |e| Error::unresolved(describe(&addr), e);
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(fail)?.collect();
    if addrs.is_empty() {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no address to bind",
        )));
    }
    Ok(addrs)
}

/// How an address argument reads in an error: a string without its quotes, anything else
/// (`("host", 80)`, a `SocketAddr`) as its `Debug` form.
fn describe(addr: &impl fmt::Debug) -> String {
    let text = format!("{addr:?}");
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) => inner.to_owned(),
        None => text,
    }
}

/// Binds the first of the resolved addresses that works.
fn bind_first<T>(
    addr: impl ToSocketAddrs + fmt::Debug,
    mut bind: impl FnMut(std::net::SocketAddr) -> Result<T>,
) -> Result<T> {
    let mut last = None;
    for a in resolve(addr)? {
        match bind(a) {
            Ok(t) => return Ok(t),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("resolve returns at least one address"))
}

impl<H: Handler> Server<Tcp<H>> {
    /// Binds a TCP server on `addr` (port 0 picks a free port; see
    /// [`local_addr`](Server::local_addr)) with default settings: a thread per connection.
    /// `factory` makes one handler per connection.
    pub fn bind(
        addr: impl ToSocketAddrs + fmt::Debug,
        factory: impl Fn() -> H + Send + Sync + 'static,
    ) -> Result<Self> {
        Self::builder(factory).bind(addr)
    }

    /// A [`Builder`] for a TCP server whose connections are served by handlers from `factory`.
    pub fn builder(factory: impl Fn() -> H + Send + Sync + 'static) -> Builder<Tcp<H>> {
        Builder::with_service(StreamService::new(Box::new(factory)))
    }
}

impl<H: Handler> Builder<Tcp<H>> {
    /// Binds and listens on `addr`. A failed bind closes the socket it made: no descriptor leaks.
    pub fn bind(self, addr: impl ToSocketAddrs + fmt::Debug) -> Result<Server<Tcp<H>>> {
        let sock = bind_first(addr, |a| bind_inet(a, Type::STREAM, &self.socket))?;
        self.from_listener(sock.into())
    }

    /// Serves on a listener bound elsewhere: Python's `bind_and_activate=False`, or an inherited
    /// socket (systemd socket activation). It must already be listening.
    pub fn from_listener(self, listener: TcpListener) -> Result<Server<Tcp<H>>> {
        let at = listener.local_addr().ok().map(Addr::Inet);
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::bind(at.as_ref(), e))?;
        let track_activity = self.tracks_activity();
        self.build(TcpAcceptor {
            listener,
            track_activity,
        })
    }
}

impl<H: Handler> Server<Unix<H>> {
    /// Binds a Unix-domain stream server on `path` with default settings.
    pub fn bind(
        path: impl AsRef<Path>,
        factory: impl Fn() -> H + Send + Sync + 'static,
    ) -> Result<Self> {
        Self::builder(factory).bind(path)
    }

    /// A [`Builder`] for a Unix-domain stream server.
    pub fn builder(factory: impl Fn() -> H + Send + Sync + 'static) -> Builder<Unix<H>> {
        Builder::with_service(StreamService::new(Box::new(factory)))
    }
}

impl<H: Handler> Builder<Unix<H>> {
    /// Binds and listens on `path`. The socket file is removed when the server closes (only if
    /// it is still the one this server made).
    pub fn bind(self, path: impl AsRef<Path>) -> Result<Server<Unix<H>>> {
        let (sock, owned) = bind_unix(path.as_ref(), Type::STREAM, &self.socket)?;
        let track_activity = self.tracks_activity();
        self.build(UnixAcceptor {
            listener: OwnedFd::from(sock).into(),
            track_activity,
            _path: Some(owned),
        })
    }

    /// Serves on a listener bound elsewhere. Its socket file is left alone on close.
    pub fn from_listener(self, listener: UnixListener) -> Result<Server<Unix<H>>> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::bind(None, e))?;
        let track_activity = self.tracks_activity();
        self.build(UnixAcceptor {
            listener,
            track_activity,
            _path: None,
        })
    }
}

impl<H: DatagramHandler> Server<Udp<H>> {
    /// Binds a UDP server on `addr` with default settings.
    pub fn bind(
        addr: impl ToSocketAddrs + fmt::Debug,
        factory: impl Fn() -> H + Send + Sync + 'static,
    ) -> Result<Self> {
        Self::builder(factory).bind(addr)
    }

    /// A [`Builder`] for a UDP server.
    pub fn builder(factory: impl Fn() -> H + Send + Sync + 'static) -> Builder<Udp<H>> {
        Builder::with_service(DatagramService::new(Box::new(factory)))
    }
}

impl<H: DatagramHandler> Builder<Udp<H>> {
    /// Binds on `addr`.
    pub fn bind(self, addr: impl ToSocketAddrs + fmt::Debug) -> Result<Server<Udp<H>>> {
        let sock = bind_first(addr, |a| bind_inet(a, Type::DGRAM, &self.socket))?;
        self.from_socket(sock.into())
    }

    /// Serves on a socket bound elsewhere.
    pub fn from_socket(self, socket: UdpSocket) -> Result<Server<Udp<H>>> {
        let at = socket.local_addr().ok().map(Addr::Inet);
        socket
            .set_nonblocking(true)
            .map_err(|e| Error::bind(at.as_ref(), e))?;
        let max_packet_size = self.service.max_packet_size;
        self.build(DatagramSocket {
            sock: Arc::new(Sock::Udp(socket)),
            max_packet_size,
            _path: None,
        })
    }
}

impl<H: DatagramHandler> Server<UnixDatagram<H>> {
    /// Binds a Unix-domain datagram server on `path` with default settings.
    pub fn bind(
        path: impl AsRef<Path>,
        factory: impl Fn() -> H + Send + Sync + 'static,
    ) -> Result<Self> {
        Self::builder(factory).bind(path)
    }

    /// A [`Builder`] for a Unix-domain datagram server.
    pub fn builder(factory: impl Fn() -> H + Send + Sync + 'static) -> Builder<UnixDatagram<H>> {
        Builder::with_service(DatagramService::new(Box::new(factory)))
    }
}

impl<H: DatagramHandler> Builder<UnixDatagram<H>> {
    /// Binds on `path`; the socket file is removed when the server closes.
    pub fn bind(self, path: impl AsRef<Path>) -> Result<Server<UnixDatagram<H>>> {
        let (sock, owned) = bind_unix(path.as_ref(), Type::DGRAM, &self.socket)?;
        let max_packet_size = self.service.max_packet_size;
        self.build(DatagramSocket {
            sock: Arc::new(Sock::Unix(OwnedFd::from(sock).into())),
            max_packet_size,
            _path: Some(owned),
        })
    }

    /// Serves on a socket bound elsewhere. Its socket file is left alone on close.
    pub fn from_socket(self, socket: StdUnixDatagram) -> Result<Server<UnixDatagram<H>>> {
        socket
            .set_nonblocking(true)
            .map_err(|e| Error::bind(None, e))?;
        let max_packet_size = self.service.max_packet_size;
        self.build(DatagramSocket {
            sock: Arc::new(Sock::Unix(socket)),
            max_packet_size,
            _path: None,
        })
    }
}

impl<T: StreamTransport> Builder<T> {
    /// Requires every client to pass `auth`'s handshake before its handler runs. An empty key is
    /// rejected when the server is built.
    pub fn auth(mut self, auth: Auth) -> Self {
        let admission = &mut self.service.admission;
        admission.set_limits(auth.timeout(), auth.max_pending_set());
        admission.add(Box::new(auth));
        self
    }

    /// Read timeout of every connection (`SO_RCVTIMEO`): a read that waits longer fails with
    /// `WouldBlock`/`TimedOut` in the handler. Default none.
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.service.read_timeout = Some(timeout);
        self
    }

    /// Write timeout of every connection (`SO_SNDTIMEO`). Default none.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.service.write_timeout = Some(timeout);
        self
    }

    /// Closes connections with no bytes read or written for this long, whatever the handler is
    /// doing (a background reaper shuts their sockets down, so a blocked handler returns).
    /// Counted in [`Stats::idle_closed`](crate::Stats::idle_closed). Default none.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.set_idle_timeout(timeout);
        self
    }
}

impl<T: Transport> Builder<T> {
    /// For Unix-domain servers: if the path holds a socket that nothing listens on any more (a
    /// crashed run's), remove it before binding. A live socket or any other file is never
    /// removed. Default false.
    pub fn replace_stale(mut self, replace: bool) -> Self {
        self.socket.replace_stale = replace;
        self
    }
}

use crate::transport::Transport;

impl<T: DatagramTransport> Builder<T> {
    /// The largest datagram served (Python's `max_packet_size`, default 8192). A longer one is
    /// dropped and logged with its real size, and counted in
    /// [`Stats::oversized_datagrams`](crate::Stats::oversized_datagrams), never truncated.
    pub fn max_packet_size(mut self, bytes: usize) -> Self {
        self.service.max_packet_size = bytes;
        self
    }

    /// Sends the reply even when the handler wrote nothing, as Python does. Default false.
    pub fn send_empty_reply(mut self, send: bool) -> Self {
        self.service.send_empty_reply = send;
        self
    }
}
