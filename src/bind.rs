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
use crate::stream::{ActivityLimits, MinDataRate};
use crate::transport::datagram::{DEFAULT_MAX_REPLY_RATIO, DatagramService, DatagramSocket};
use crate::transport::socket::{bind_inet, bind_unix};
use crate::transport::stream::{StreamService, TcpAcceptor, UnixAcceptor};
use crate::transport::{DatagramTransport, StreamTransport, Tcp, Udp, Unix, UnixDatagram};
use crate::{
    Addr, Auth, Builder, DatagramHandler, Dispatch, Error, Handler, MessageHandler, Result, Server,
};

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
///
/// Like Python's `UDPServer`, it serves one datagram at a time on the serving thread
/// ([`Dispatch::Sync`], the default for datagram servers): replies leave in the order the
/// datagrams arrived, and a burst waits in the socket's receive buffer instead of spawning a
/// thread per packet. [`Dispatch::Thread`] and [`Dispatch::Pool`] serve datagrams concurrently:
/// the replies then come back in whatever order the handlers finish, so choose them only for
/// handlers that block (on a database, say) and clients that match replies to requests
/// themselves.
///
/// Replies are limited to 3× the size of the datagram they answer, since a UDP source address
/// can be forged: see [`Builder::max_reply_ratio`].
pub type UdpServer<H> = Server<Udp<H>>;

/// A Unix-domain datagram server: Python's `UnixDatagramServer`. Clients must bind a path of
/// their own to receive replies. Serves one datagram at a time, in order, like [`UdpServer`]
/// (see there for what the other [`Dispatch`] modes do to ordering).
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
        stream_builder(Box::new(factory))
    }
}

impl<H: Handler> Builder<Tcp<H>> {
    /// Sets `TCP_NODELAY` on accepted connections. Default true, as Go does. TCP builders only
    /// (a Unix-domain socket has no Nagle's algorithm to turn off).
    ///
    /// With it on, every write leaves at once instead of waiting (Nagle's algorithm) for the
    /// peer to acknowledge the previous segment, which with delayed ACKs costs ~40 ms per
    /// reply that is written in more than one piece. The trade-off: a handler that writes many
    /// tiny pieces sends as many tiny segments. Formatted writes (`write!` on a
    /// [`Request`](crate::Request), [`WFile`](crate::WFile) or [`Stream`](crate::Stream))
    /// leave in one write whatever this setting; for many small unformatted writes give `wfile`
    /// a buffer ([`StreamOptions::wbufsize`](crate::StreamOptions::wbufsize)) and flush per reply,
    /// or turn this off.
    ///
    /// ```compile_fail
    /// use socketserver::{UnixStreamServer, handler_fn};
    ///
    /// let builder = UnixStreamServer::builder(|| handler_fn(|_req| Ok(()))).nodelay(false);
    /// ```
    pub fn nodelay(mut self, nodelay: bool) -> Self {
        self.service.nodelay = nodelay;
        self
    }

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
        // Accepted sockets inherit TCP_NODELAY from the listener (Linux, the BSDs, macOS), so
        // setting it here costs no system call per connection.
        socket2::SockRef::from(&listener)
            .set_tcp_nodelay(self.service.nodelay)
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
        stream_builder(Box::new(factory))
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

    /// A [`Builder`] for a UDP server: [`Dispatch::Sync`] unless told otherwise (see
    /// [`UdpServer`]).
    pub fn builder(factory: impl Fn() -> H + Send + Sync + 'static) -> Builder<Udp<H>> {
        let service = DatagramService::new(Box::new(factory), Some(DEFAULT_MAX_REPLY_RATIO));
        Builder::with_service(service).dispatch(Dispatch::Sync)
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

    /// A [`Builder`] for a Unix-domain datagram server: [`Dispatch::Sync`] unless told
    /// otherwise (see [`UdpServer`]).
    pub fn builder(factory: impl Fn() -> H + Send + Sync + 'static) -> Builder<UnixDatagram<H>> {
        // No amplification guard: the kernel sets a Unix datagram's source, which cannot be
        // forged.
        let service = DatagramService::new(Box::new(factory), None);
        Builder::with_service(service).dispatch(Dispatch::Sync)
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

impl<T: StreamTransport> Builder<T>
where
    T::Handler: MessageHandler,
{
    /// Event mode, for message handlers only (checked when the program compiles: only a
    /// builder whose handler is a [`MessageHandler`] has this method), with `workers` worker
    /// threads (at least 1): a worker is held only while a message is served. Between messages a connection is
    /// parked in an epoll set, holding no thread and no buffer, so idle connections cost their
    /// socket and the handler's own state; a pipelined message is served without parking;
    /// PROXY headers, TLS handshakes and authentication handshakes park too while the client
    /// (or the load balancer) sends them. Like Apache's event MPM, with a blocking handler API.
    /// No worker waits on a peer: the sockets are non-blocking, a message that needs input not
    /// yet arrived is taken back and run again when it comes, output the socket cannot take is
    /// queued (and the connection not read while more than 64 KiB waits), so clients that stop
    /// reading or stop mid-message stall nobody (see
    /// [`MessageHandler`](crate::MessageHandler)). The read and write timeouts do not apply:
    /// nothing blocks for them to bound; the idle timeout and minimum data rate do.
    /// The workers take turns waiting on the set and serve a batch of ready connections per
    /// wake-up (64 between them, at least 8 each): one worker per core suits handlers that do
    /// not block for long; more if they do (a handler that blocks delays the connections of
    /// its batch). The workers accept too: the listener is in their set, so a new connection
    /// is accepted, checked (`verify_request`, the caps) and started by the worker that sees
    /// it, with no hand-over between threads, while a slot is free under `max_connections`:
    /// when none is, new clients wait in the backlog (or the pressure policy sheds an idle
    /// connection for them) until a connection closes, and after an accept error (out of
    /// descriptors) the workers back off. The thread that runs `serve_forever` runs the
    /// `service_actions` hook, and takes the backlog at a drain.
    /// Capped by [`Builder::max_connections`](crate::Builder::max_connections), whose default
    /// is what the descriptor limit allows. Linux only.
    ///
    /// ```no_run
    /// use socketserver::{TcpServer, message_fn, Next};
    ///
    /// let server = TcpServer::builder(|| message_fn(|_req| Ok(Next::Close)))
    ///     .event(2)
    ///     .bind("127.0.0.1:0")?;
    /// # Ok::<(), socketserver::Error>(())
    /// ```
    ///
    /// A whole-connection [`Handler`](crate::Handler) would hold its worker, so its builder has
    /// no `event`:
    ///
    /// ```compile_fail
    /// use socketserver::{TcpServer, handler_fn};
    ///
    /// let server = TcpServer::builder(|| handler_fn(|_req| Ok(()))).event(2);
    /// ```
    ///
    /// Nor does a datagram server's (a datagram is one message already):
    ///
    /// ```compile_fail
    /// use socketserver::{UdpServer, datagram_fn};
    ///
    /// let server = UdpServer::builder(|| datagram_fn(|_req| Ok(()))).event(2);
    /// ```
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    #[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
    pub fn event(self, workers: usize) -> Self {
        self.run_events(workers)
    }
}

impl<T: StreamTransport> Builder<T> {
    /// The buffering of every connection's `rfile` and `wfile`, and the longest line `rfile`
    /// reads (default: [`StreamOptions::default`](crate::StreamOptions)).
    pub fn stream_options(mut self, options: crate::StreamOptions) -> Self {
        self.service.options = options;
        self
    }

    /// Requires every client to pass `auth`'s handshake before its handler runs, within the
    /// [handshake deadline](Self::handshake_timeout). An empty key is rejected when the server
    /// is built.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.service.admission.add(Box::new(auth));
        self
    }

    /// How long a connection has for all of admission, whatever stages are configured: the
    /// PROXY header (`proxy_protocol`), the TLS handshake (`tls`, with the cargo feature of
    /// that name) and the [`auth`](Self::auth) handshake, in that order, under one
    /// deadline that starts when the connection is accepted and covers every read and write of
    /// every stage together. A client that trickles bytes, or takes its time over each stage,
    /// cannot stretch it. A connection still in admission at the deadline is closed, logged
    /// (rate-limited) and counted in
    /// [`Stats::handshake_timeouts`](crate::Stats::handshake_timeouts); its handler never
    /// runs. Default 5 s; no effect without a stage. Zero is refused when the server is built;
    /// `Duration::MAX` means no deadline.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.service.admission.set_timeout(timeout);
        self
    }

    /// The most connections that may be in admission at once (like OpenSSH's `MaxStartups`),
    /// whatever stages are configured (PROXY header, TLS, [`auth`](Self::auth)). When a new
    /// connection finds the cap reached, the oldest unfinished admission is cut (counted in
    /// [`Stats::handshake_evictions`](crate::Stats::handshake_evictions)), so silent
    /// connections can hold at most this many workers while honest clients, which answer in a
    /// round trip, get through. At least 1 (zero is refused when the server is built).
    ///
    /// Default: 1024 in event mode, where an unfinished admission holds no thread. In pool
    /// mode and with [`max_connections`](Self::max_connections) set, handshakes may take any
    /// worker (slot), and when a new connection takes the last free one while at least half of
    /// them (at least 4, or all of a smaller pool) are handshakes, the oldest unfinished
    /// handshake whose client has not answered yet is cut, so a worker frees for the next
    /// client; 64 in sync mode and in thread mode without `max_connections`.
    ///
    /// The limit of this policy: a burst of more than `max` new connections arriving within
    /// one round trip of an honest client can cut its handshake too (nothing tells the two
    /// apart before the client answers); that client sees the connection closed and should
    /// retry. Held silent connections, however many, cannot starve it.
    pub fn max_pending_handshakes(mut self, max: usize) -> Self {
        self.service.admission.set_max_pending(max);
        self
    }

    /// Serves every connection over TLS (feature `tls`): the handshake runs on the worker as
    /// the admission stage before [`auth`](Self::auth)'s, which then runs inside TLS, bounded by
    /// the one [handshake deadline](Self::handshake_timeout) (5 s by default) and
    /// [pending cap](Self::max_pending_handshakes).
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, tls: crate::Tls) -> Self {
        self.service.admission.add(Box::new(tls));
        self
    }

    /// How long one read may wait for data (`SO_RCVTIMEO`), as Python's
    /// `StreamRequestHandler.timeout` does; default none (the idle timeout and the minimum data
    /// rate bound a silent peer already). A read that waits longer fails in the handler with an
    /// `io::Error` of kind `TimedOut` ("no data for 30s"), or a [`crate::Error`] whose
    /// [`is_timeout`](crate::Error::is_timeout) is true from the bounded reads of
    /// [`RFile`](crate::RFile). A handler that returns it is logged at info ("no data from
    /// PEER for 30s"), counted in [`Stats::timeouts`](crate::Stats::timeouts), and its
    /// `handle_error` hook sees [`HandlerFailure::is_timeout`](crate::HandlerFailure::is_timeout).
    ///
    /// These three are the crate's one timeout concept for stream connections: `read_timeout`
    /// and `write_timeout` bound one call and surface in the handler; `idle_timeout` and
    /// [`min_data_rate`](Self::min_data_rate) bound the connection and are enforced by the
    /// server. `None` turns a timeout off.
    ///
    /// Under event mode ([`Builder::event`](crate::Builder::event)) no read or write waits (a message
    /// short of input parks, output is queued), so the two per-call timeouts have nothing to
    /// bound there; the idle timeout and the minimum data rate still apply.
    pub fn read_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.service.read_timeout = timeout.into();
        self
    }

    /// How long one write may wait for the peer to make room (`SO_SNDTIMEO`); default none.
    /// Fails like [`read_timeout`](Self::read_timeout), kind `TimedOut`.
    pub fn write_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.service.write_timeout = timeout.into();
        self
    }

    /// Closes a connection that waits on its peer, reading or writing (or parked, in event
    /// mode), with no byte moving for this long. Default none, as in Python, Go's `net/http`
    /// and tokio: a quiet client (a chat listener, a connection kept for later) is never cut
    /// by a clock.
    ///
    /// What protects the server instead, by default: the minimum data rate
    /// ([`min_data_rate`](Self::min_data_rate)) cuts a request trickled in, and the pressure
    /// policy makes room when the server is at [`max_connections`](Self::max_connections)
    /// with a newcomer waiting: the connections idle longest (waiting on their peer between
    /// requests) are closed first, as many as newcomers wait, counted in
    /// [`Stats::evicted`](crate::Stats::evicted). Below the cap nothing idle is cut.
    ///
    /// When set, a reaper thread shuts the socket down, so a blocked handler returns (a read
    /// sees end of file), and logs the peer at info; counted in
    /// [`Stats::idle_closed`](crate::Stats::idle_closed). Only time spent waiting on the peer
    /// counts: a handler that computes for minutes is never cut. nginx's `keepalive_timeout`
    /// (75 s) and Go's `IdleTimeout` are the usual values for protocols that want one.
    pub fn idle_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.activity_mut().idle = timeout.into();
        self
    }

    /// The minimum rate at which a client must send a request it has started: see
    /// [`MinDataRate`]. Default [`MinDataRate::DEFAULT`], 500 bytes/s after 10 s; `None` turns
    /// it off.
    ///
    /// A client cut for it is logged at info and counted in
    /// [`Stats::slow_closed`](crate::Stats::slow_closed). This catches what the idle timeout
    /// cannot: a request trickled a byte every few seconds, or a `multiprocessing` frame header
    /// whose body never comes. Only an unfinished unit is judged: a line being read by
    /// `rfile`'s line reads, a message not yet whole (or being served) by a
    /// [`MessageHandler`](crate::MessageHandler); between units a client may be silent as long
    /// as it likes. For a whole-connection [`Handler`](crate::Handler) reading the raw stream,
    /// the server's writes end a request: turn the rate off (or lower it) for one that receives
    /// a slow one-way stream without answering, such as a log shipper.
    pub fn min_data_rate(mut self, rate: impl Into<Option<MinDataRate>>) -> Self {
        self.activity_mut().min_rate = rate.into();
        self
    }
}

/// A stream server's builder, with the activity limits stream servers have by default.
fn stream_builder<T: StreamTransport>(
    factory: Box<dyn Fn() -> T::Handler + Send + Sync>,
) -> Builder<T> {
    let mut builder = Builder::with_service(StreamService::new(factory));
    *builder.activity_mut() = ActivityLimits::STREAM_DEFAULT;
    builder
}

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

    /// The amplification guard: everything sent in answer to one datagram (`wfile` and
    /// [`DatagramRequest::send`](crate::DatagramRequest::send) together) may total at most
    /// `ratio` times its size; a reply that would go over is dropped, logged (rate-limited) and
    /// counted in [`Stats::amplification_dropped`](crate::Stats::amplification_dropped). `None`
    /// turns the guard off. Default: `Some(3)` for UDP, whose source addresses can be forged
    /// (QUIC's factor, RFC 9000 §8.1); `None` for Unix datagrams, whose cannot. A handler lifts
    /// it for one request with
    /// [`allow_any_reply_size`](crate::DatagramRequest::allow_any_reply_size).
    pub fn max_reply_ratio(mut self, ratio: Option<usize>) -> Self {
        self.service.max_reply_ratio = ratio;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HandlerResult, Request};

    struct Nothing;
    impl Handler for Nothing {
        fn handle(&mut self, _: &mut Request) -> HandlerResult {
            Ok(())
        }
    }
    impl DatagramHandler for Nothing {
        fn handle(&mut self, _: &mut crate::DatagramRequest) -> HandlerResult {
            Ok(())
        }
    }

    #[test]
    fn stream_servers_limit_activity_by_default_and_datagram_servers_have_none() {
        // No idle clock: the minimum rate, and the pressure policy its tracking enables.
        let expected = ActivityLimits {
            idle: None,
            min_rate: Some(MinDataRate::new(500, Duration::from_secs(10))),
        };
        assert_eq!(*TcpServer::builder(|| Nothing).activity_mut(), expected);
        assert_eq!(
            *UnixStreamServer::builder(|| Nothing).activity_mut(),
            expected
        );
        assert!(TcpServer::builder(|| Nothing).service.nodelay);
        let off = TcpServer::builder(|| Nothing)
            .idle_timeout(None)
            .min_data_rate(None);
        assert!(!off.tracks_activity());
        assert!(!UdpServer::builder(|| Nothing).tracks_activity());
        assert!(!UnixDatagramServer::builder(|| Nothing).tracks_activity());
    }
}
