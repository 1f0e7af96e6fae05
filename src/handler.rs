//! The request handler traits: Python's `BaseRequestHandler` (`setup` → `handle` → `finish`) and
//! `StreamRequestHandler` (buffered `rfile` / `wfile`), for every stream transport.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};

use crate::stream::{Direction, StreamTimeout, write_fmt_once};
use crate::{Addr, Credentials, RFile, ServerHandle, Stream, WFile};

/// What a handler method returns on failure: any error, boxed.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// What every handler method returns.
pub type HandlerResult = Result<(), HandlerError>;

/// Why a request's handler did not complete, as passed to the `handle_error` hook.
#[derive(Debug)]
#[non_exhaustive]
pub enum HandlerFailure {
    /// A handler method returned an error.
    Error(HandlerError),
    /// A handler method (or the handler factory) panicked; this is the panic message.
    Panic(String),
}

impl HandlerFailure {
    /// Whether the handler failed on a timeout: a read or write timeout of its connection
    /// ([`Builder::read_timeout`](crate::Builder::read_timeout)), or any error of kind
    /// `TimedOut` / `WouldBlock` or [`Error::is_timeout`](crate::Error::is_timeout), anywhere in
    /// the error's `source()` chain. The server logs these at info, not as errors.
    pub fn is_timeout(&self) -> bool {
        let HandlerFailure::Error(e) = self else {
            return false;
        };
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**e);
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<io::Error>()
                && matches!(
                    io.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                )
            {
                return true;
            }
            if e.downcast_ref::<crate::Error>()
                .is_some_and(|e| e.is_timeout())
            {
                return true;
            }
            next = e.source();
        }
        false
    }

    /// The connection timeout behind this failure, if it is one of [`Stream`]'s.
    pub(crate) fn stream_timeout(&self) -> Option<&StreamTimeout> {
        let HandlerFailure::Error(e) = self else {
            return None;
        };
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**e);
        while let Some(e) = next {
            if let Some(t) = e.downcast_ref::<StreamTimeout>() {
                return Some(t);
            }
            // An io::Error's source() skips its own payload, which is where ours sits.
            if let Some(t) = e
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|p| p.downcast_ref::<StreamTimeout>())
            {
                return Some(t);
            }
            next = e.source();
        }
        None
    }

    /// What a timeout failure means, for the log: "no data from PEER for 30s".
    pub(crate) fn describe_timeout(&self, peer: &Addr) -> String {
        match self.stream_timeout() {
            Some(StreamTimeout {
                direction: Direction::Read,
                after: Some(t),
            }) => format!("no data from {peer} for {t:?}"),
            Some(StreamTimeout {
                direction: Direction::Write,
                after: Some(t),
            }) => format!("{peer} read nothing for {t:?}"),
            _ => format!("timed out waiting on {peer}: {self}"),
        }
    }
}

impl fmt::Display for HandlerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerFailure::Error(e) => write!(f, "error: {e}"),
            HandlerFailure::Panic(m) => write!(f, "panic: {m}"),
        }
    }
}

/// Serves one connection of a stream server (TCP or Unix-domain).
///
/// The server makes a handler per connection with the factory it was given (so fields are
/// per-connection state; shared state is an `Arc` the factory captures) and calls, on the
/// connection's thread, [`setup`](Self::setup), then [`handle`](Self::handle), then
/// [`finish`](Self::finish). `finish` runs even when `handle` fails or panics, but not when
/// `setup` does, as in Python. An error or panic from any of them goes to the server's
/// `handle_error` hook (by default a log line with the peer address); the connection is closed
/// and the server carries on.
///
/// ```
/// use std::io::{Read, Write};
/// use socketserver::{Handler, HandlerResult, Request};
///
/// struct Echo;
///
/// impl Handler for Echo {
///     fn handle(&mut self, req: &mut Request) -> HandlerResult {
///         let mut buf = [0u8; 4096];
///         loop {
///             let n = req.read(&mut buf)?;
///             if n == 0 {
///                 return Ok(()); // the client hung up
///             }
///             req.write_all(&buf[..n])?;
///         }
///     }
/// }
/// ```
///
/// For lines, use a [`StreamHandler`], whose `rfile` bounds their length.
pub trait Handler: Send + 'static {
    /// Runs before [`handle`](Self::handle). If it fails, neither `handle` nor `finish` runs.
    fn setup(&mut self, req: &mut Request) -> HandlerResult {
        let _ = req;
        Ok(())
    }

    /// Serves the connection. Returning ends it: the server shuts the socket down and closes it.
    fn handle(&mut self, req: &mut Request) -> HandlerResult;

    /// Runs after [`handle`](Self::handle), whether it succeeded, failed or panicked.
    fn finish(&mut self, req: &mut Request) -> HandlerResult {
        let _ = req;
        Ok(())
    }
}

/// One accepted connection, as a [`Handler`] sees it: the stream (also readable and writable
/// through the `Request` itself), the peer address, and a handle to the server.
///
/// `write!(req, ...)` formats the whole message, then writes it in one call (one segment).
pub struct Request {
    pub(crate) stream: Stream,
    pub(crate) peer: Addr,
    pub(crate) server: ServerHandle,
    /// The PROXY header the connection came with, if the server takes them.
    #[cfg(feature = "proxy-protocol")]
    pub(crate) proxy: Option<std::sync::Arc<crate::proxy::ProxyInfo>>,
}

impl Request {
    /// The connection's socket. Clone it for a second reader or writer.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The address of the client.
    pub fn peer_addr(&self) -> &Addr {
        &self.peer
    }

    /// The local address of this connection (for a server bound to `0.0.0.0`, the address the
    /// client reached).
    pub fn local_addr(&self) -> io::Result<Addr> {
        self.stream.local_addr()
    }

    /// The client process's credentials on a Unix-domain connection, where the OS provides them.
    pub fn peer_credentials(&self) -> Option<Credentials> {
        self.stream.peer_credentials()
    }

    /// The server this connection belongs to: call [`ServerHandle::shutdown`] to stop it.
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// The proxy the connection came through, when the server takes PROXY headers
    /// ([`Builder::proxy_protocol`](crate::Builder::proxy_protocol)): the socket's peer, while
    /// [`peer_addr`](Self::peer_addr) is the client the header named.
    #[cfg(feature = "proxy-protocol")]
    pub fn proxy_addr(&self) -> Option<&Addr> {
        self.proxy.as_deref().map(|p| p.proxy_addr())
    }

    /// The PROXY header the connection came with (its version, destination and v2 TLVs), when
    /// the server takes them.
    #[cfg(feature = "proxy-protocol")]
    pub fn proxy(&self) -> Option<&crate::proxy::ProxyInfo> {
        self.proxy.as_deref()
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Read for Request {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.stream).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&self.stream).read_vectored(bufs)
    }
}

impl Write for Request {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.stream).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.stream).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn write_fmt(&mut self, args: fmt::Arguments<'_>) -> io::Result<()> {
        write_fmt_once(self, args)
    }
}

/// Buffering of a [`StreamRequestHandler`] and the longest line it reads.
///
/// Python's `StreamRequestHandler.timeout` and `disable_nagle_algorithm` are server settings
/// here, shared by every handler type: [`Builder::read_timeout`](crate::Builder::read_timeout)
/// (with `write_timeout`, `idle_timeout` and `min_data_rate`) and
/// [`Builder::nodelay`](crate::Builder::nodelay), on by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// Capacity of `rfile`, the buffered reader. Default 8 KiB.
    pub rbufsize: usize,
    /// Capacity of `wfile`, the buffered writer. Default 0, as in Python: every write goes
    /// straight to the socket. With a buffer, flush it when a reply is complete; `finish` flushes
    /// whatever is left.
    pub wbufsize: usize,
    /// The longest line `rfile`'s line reads accept, counting its newline; a longer one fails
    /// with an [`is_too_large`](crate::Error::is_too_large) error after this many bytes. Default
    /// 64 KiB (Python's `http.server` uses the same limit for request lines and headers).
    pub max_line: usize,
}

impl Default for StreamOptions {
    fn default() -> StreamOptions {
        StreamOptions {
            rbufsize: 8 * 1024,
            wbufsize: 0,
            max_line: 64 * 1024,
        }
    }
}

/// A connection with a buffered reader (`rfile`) and writer (`wfile`), as a [`StreamHandler`]
/// sees it.
pub struct StreamRequest {
    /// Buffered reader over the connection; its line reads are bounded by
    /// [`StreamOptions::max_line`].
    pub rfile: RFile,
    /// Writer over the connection (buffered when `wbufsize` > 0); flushed after `finish`.
    pub wfile: WFile,
    peer: Addr,
    server: ServerHandle,
    #[cfg(feature = "proxy-protocol")]
    proxy: Option<std::sync::Arc<crate::proxy::ProxyInfo>>,
}

impl StreamRequest {
    /// The address of the client.
    pub fn peer_addr(&self) -> &Addr {
        &self.peer
    }

    /// The connection's socket, for timeouts and options. Reading it directly bypasses (and may
    /// race with) `rfile`'s buffer.
    pub fn stream(&self) -> &Stream {
        self.rfile.get_ref()
    }

    /// The client process's credentials on a Unix-domain connection, where the OS provides them.
    pub fn peer_credentials(&self) -> Option<Credentials> {
        self.stream().peer_credentials()
    }

    /// The server this connection belongs to.
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// The proxy the connection came through: see [`Request::proxy_addr`].
    #[cfg(feature = "proxy-protocol")]
    pub fn proxy_addr(&self) -> Option<&Addr> {
        self.proxy.as_deref().map(|p| p.proxy_addr())
    }

    /// The PROXY header the connection came with: see [`Request::proxy`].
    #[cfg(feature = "proxy-protocol")]
    pub fn proxy(&self) -> Option<&crate::proxy::ProxyInfo> {
        self.proxy.as_deref()
    }
}

/// Serves one connection through buffered `rfile` / `wfile`, like Python's
/// `StreamRequestHandler`. Wrap it in [`StreamRequestHandler`] to get a [`Handler`].
///
/// ```
/// use std::io::Write;
/// use socketserver::{StreamHandler, StreamRequest, HandlerResult};
///
/// struct LineEcho;
///
/// impl StreamHandler for LineEcho {
///     fn handle(&mut self, s: &mut StreamRequest) -> HandlerResult {
///         // Each line at most StreamOptions::max_line bytes (64 KiB): an endless line is an
///         // error, not an endless allocation.
///         for line in s.rfile.lines() {
///             writeln!(s.wfile, "{}", line?)?;
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait StreamHandler: Send + 'static {
    /// Runs before [`handle`](Self::handle); if it fails, neither `handle` nor `finish` runs.
    fn setup(&mut self, s: &mut StreamRequest) -> HandlerResult {
        let _ = s;
        Ok(())
    }

    /// Serves the connection.
    fn handle(&mut self, s: &mut StreamRequest) -> HandlerResult;

    /// Runs after `handle`, whether it succeeded or not; `wfile` is flushed after it.
    fn finish(&mut self, s: &mut StreamRequest) -> HandlerResult {
        let _ = s;
        Ok(())
    }
}

/// Adapts a [`StreamHandler`] into a [`Handler`]: builds `rfile` and `wfile` with the
/// [`StreamOptions`], and flushes `wfile` after `finish`.
///
/// ```no_run
/// # use socketserver::{StreamHandler, StreamRequest, HandlerResult};
/// # struct LineEcho;
/// # impl StreamHandler for LineEcho {
/// #     fn handle(&mut self, s: &mut StreamRequest) -> HandlerResult { Ok(()) }
/// # }
/// use socketserver::{StreamRequestHandler, TcpServer};
///
/// let server = TcpServer::bind("127.0.0.1:0", || StreamRequestHandler::new(LineEcho))?;
/// # Ok::<(), socketserver::Error>(())
/// ```
pub struct StreamRequestHandler<H> {
    inner: H,
    options: StreamOptions,
    state: Option<StreamRequest>,
}

impl<H: StreamHandler> StreamRequestHandler<H> {
    /// Wraps `inner` with the default [`StreamOptions`].
    pub fn new(inner: H) -> Self {
        Self::with_options(inner, StreamOptions::default())
    }

    /// Wraps `inner` with the given options.
    pub fn with_options(inner: H, options: StreamOptions) -> Self {
        StreamRequestHandler {
            inner,
            options,
            state: None,
        }
    }

    fn state(&mut self) -> Result<(&mut H, &mut StreamRequest), HandlerError> {
        match &mut self.state {
            Some(s) => Ok((&mut self.inner, s)),
            None => Err("StreamRequestHandler used before setup".into()),
        }
    }
}

impl<H: StreamHandler> Handler for StreamRequestHandler<H> {
    fn setup(&mut self, req: &mut Request) -> HandlerResult {
        let o = self.options;
        let s = self.state.insert(StreamRequest {
            rfile: RFile::new(req.stream.clone(), o.rbufsize, o.max_line, req.peer.clone()),
            wfile: WFile::new(req.stream.clone(), o.wbufsize),
            peer: req.peer.clone(),
            server: req.server.clone(),
            #[cfg(feature = "proxy-protocol")]
            proxy: req.proxy.clone(),
        });
        self.inner.setup(s)
    }

    fn handle(&mut self, _req: &mut Request) -> HandlerResult {
        let (inner, s) = self.state()?;
        inner.handle(s)
    }

    fn finish(&mut self, _req: &mut Request) -> HandlerResult {
        let (inner, s) = self.state()?;
        let finished = inner.finish(s);
        let flushed = s.wfile.flush();
        finished?;
        Ok(flushed?)
    }
}
