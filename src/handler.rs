//! The request handler traits: Python's `BaseRequestHandler` (`setup` → `handle` → `finish`) and
//! `StreamRequestHandler` (buffered `rfile` / `wfile`), for every stream transport.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};

use crate::stream::{Direction, StreamTimeout, write_fmt_once};
use crate::{Addr, RFile, ServerHandle, Stream, WFile};

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

    /// Whether the handler failed because the client went away mid-request: an I/O error of
    /// kind `ConnectionReset`, `ConnectionAborted`, `BrokenPipe` or `UnexpectedEof` anywhere in
    /// the error's `source()` chain (a load balancer's health check that resets its connection,
    /// a client killed mid-reply). The server logs these at debug and does not count them in
    /// [`Stats::handler_errors`](crate::Stats::handler_errors): the handler did nothing wrong.
    pub fn is_disconnect(&self) -> bool {
        let HandlerFailure::Error(e) = self else {
            return false;
        };
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&**e);
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<io::Error>()
                && matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                )
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

    /// Whether this handler serves one message per call, as [`Dispatch::Event`](crate::Dispatch::Event)
    /// needs: true only for [`MessageRequestHandler`]. Not for implementing.
    #[doc(hidden)]
    const SERVES_MESSAGES: bool = false;

    /// The message handler and its buffered connection, for
    /// [`Dispatch::Event`](crate::Dispatch::Event), once `setup` has run. Not for implementing.
    #[doc(hidden)]
    fn messages(&mut self) -> Option<(&mut dyn MessageHandler, &mut StreamRequest)> {
        None
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

    /// What was negotiated on a TLS connection (feature `tls`): version, cipher suite, SNI,
    /// ALPN, the client's certificate chain. `None` on a plaintext one.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(&self) -> Option<&crate::TlsInfo> {
        self.stream.tls()
    }

    /// The local address of this connection (for a server bound to `0.0.0.0`, the address the
    /// client reached).
    pub fn local_addr(&self) -> io::Result<Addr> {
        self.stream.local_addr()
    }

    /// The client process's credentials on a Unix-domain connection (`SO_PEERCRED`). Linux only.
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    #[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
    pub fn peer_credentials(&self) -> Option<crate::Credentials> {
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
    #[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
    pub fn proxy_addr(&self) -> Option<&Addr> {
        self.proxy.as_deref().map(|p| p.proxy_addr())
    }

    /// The PROXY header the connection came with (its version, destination and v2 TLVs), when
    /// the server takes them.
    #[cfg(feature = "proxy-protocol")]
    #[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
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
///
/// Made from the defaults and changed with the `with_*` methods, so that options can be added
/// without breaking anyone:
///
/// ```
/// use socketserver::StreamOptions;
///
/// let options = StreamOptions::new().with_wbufsize(8 * 1024).with_max_line(1024);
/// assert_eq!(options.rbufsize(), 8 * 1024);
/// assert_eq!(options.max_line(), 1024);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    rbufsize: usize,
    wbufsize: usize,
    max_line: usize,
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

impl StreamOptions {
    /// The defaults: an 8 KiB `rfile`, an unbuffered `wfile`, lines up to 64 KiB.
    pub fn new() -> StreamOptions {
        StreamOptions::default()
    }

    /// Capacity of `rfile`, the buffered reader. Default 8 KiB.
    pub fn rbufsize(&self) -> usize {
        self.rbufsize
    }

    /// Sets [`rbufsize`](Self::rbufsize).
    pub fn with_rbufsize(mut self, bytes: usize) -> StreamOptions {
        self.rbufsize = bytes;
        self
    }

    /// Capacity of `wfile`, the buffered writer. Default 0, as in Python: every write goes
    /// straight to the socket. With a buffer, flush it when a reply is complete; `finish` flushes
    /// whatever is left.
    pub fn wbufsize(&self) -> usize {
        self.wbufsize
    }

    /// Sets [`wbufsize`](Self::wbufsize).
    pub fn with_wbufsize(mut self, bytes: usize) -> StreamOptions {
        self.wbufsize = bytes;
        self
    }

    /// The longest line `rfile`'s line reads accept, counting its newline; a longer one fails
    /// with an [`is_too_large`](crate::Error::is_too_large) error after this many bytes. Default
    /// 64 KiB (Python's `http.server` uses the same limit for request lines and headers).
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Sets [`max_line`](Self::max_line).
    pub fn with_max_line(mut self, bytes: usize) -> StreamOptions {
        self.max_line = bytes;
        self
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
    fn new(req: &Request, o: StreamOptions) -> StreamRequest {
        StreamRequest {
            rfile: RFile::new(req.stream.clone(), o.rbufsize, o.max_line, req.peer.clone()),
            wfile: WFile::new(req.stream.clone(), o.wbufsize),
            peer: req.peer.clone(),
            server: req.server.clone(),
            #[cfg(feature = "proxy-protocol")]
            proxy: req.proxy.clone(),
        }
    }

    /// The address of the client.
    pub fn peer_addr(&self) -> &Addr {
        &self.peer
    }

    /// The connection's socket, for timeouts and options. Reading it directly bypasses (and may
    /// race with) `rfile`'s buffer.
    pub fn stream(&self) -> &Stream {
        self.rfile.get_ref()
    }

    /// The client process's credentials on a Unix-domain connection (`SO_PEERCRED`). Linux only.
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    #[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
    pub fn peer_credentials(&self) -> Option<crate::Credentials> {
        self.stream().peer_credentials()
    }

    /// The server this connection belongs to.
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// The proxy the connection came through: see [`Request::proxy_addr`].
    #[cfg(feature = "proxy-protocol")]
    #[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
    pub fn proxy_addr(&self) -> Option<&Addr> {
        self.proxy.as_deref().map(|p| p.proxy_addr())
    }

    /// The PROXY header the connection came with: see [`Request::proxy`].
    #[cfg(feature = "proxy-protocol")]
    #[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
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
        let s = self.state.insert(StreamRequest::new(req, self.options));
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

/// What a [`MessageHandler`] wants after a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Next {
    /// Keep the connection open and wait for the next message (HTTP's keep-alive).
    Message,
    /// Close the connection: `finish` runs, then the socket is shut down and closed.
    Close,
}

/// Serves a connection one message at a time: the handler of
/// [`Dispatch::Event`](crate::Dispatch::Event), which holds a worker thread only while a
/// message is being served and parks the connection, holding no thread and no buffer, until the
/// next one arrives (Apache's event MPM, with a blocking API). Wrap it in
/// [`MessageRequestHandler`] to get a [`Handler`]; in the other dispatch modes it serves its
/// messages one after another on the connection's thread.
///
/// The handler is made per connection, so its fields are per-connection state that survives
/// between messages. [`handle_message`](Self::handle_message) runs when at least one byte of a
/// message has arrived (and, with [`message_ready`](Self::message_ready), only once the whole
/// message has), reads it from `rfile`, writes its reply to `wfile`, and says whether to keep
/// the connection. A pipelined message already in `rfile`'s buffer is served at once, without
/// parking.
///
/// In event mode no call ever waits on the peer:
/// * A read past what has arrived does not block: the call is taken back (its input is unread
///   again and what it wrote is dropped, whatever it returned) and runs again, from the start
///   of the message, once more has come. So read the message before changing the handler's
///   state, or say with `message_ready` when it is whole. A message must fit in `rfile`'s
///   buffer, which grows for it up to the larger of
///   [`StreamOptions::rbufsize`] and [`StreamOptions::max_line`]; a longer one closes the
///   connection.
/// * Writes never block: what the socket cannot take now is queued and sent as the peer reads.
///   While more than 64 KiB waits, the connection is not read (backpressure), so a client that
///   never reads costs its socket buffers and that, not a worker. What is queued is sent
///   before a close.
///
/// ```
/// use std::io::Write;
/// use socketserver::{HandlerError, MessageHandler, Next, StreamRequest};
///
/// /// Answers each line with its length; `quit` ends the connection.
/// struct Lengths {
///     served: u64, // survives between messages
/// }
///
/// impl MessageHandler for Lengths {
///     fn handle_message(&mut self, s: &mut StreamRequest) -> Result<Next, HandlerError> {
///         let mut line = String::new();
///         if s.rfile.read_line(&mut line)? == 0 || line.trim() == "quit" {
///             return Ok(Next::Close);
///         }
///         self.served += 1;
///         writeln!(s.wfile, "{} {}", self.served, line.trim_end().len())?;
///         Ok(Next::Message)
///     }
///
///     // A line is a message: wait, parked, until all of it is here.
///     fn message_ready(&self, buffered: &[u8]) -> bool {
///         buffered.contains(&b'\n')
///     }
/// }
/// ```
pub trait MessageHandler: Send + 'static {
    /// Runs once, before the first message; if it fails, the connection is closed without
    /// `finish`.
    fn setup(&mut self, s: &mut StreamRequest) -> HandlerResult {
        let _ = s;
        Ok(())
    }

    /// Serves one message. An error or a panic closes the connection (after `finish`) and is
    /// reported like a failed `handle`; other connections are not affected.
    fn handle_message(&mut self, s: &mut StreamRequest) -> Result<Next, HandlerError>;

    /// Runs once when the connection ends, however it ends (the client hung up, the handler
    /// said [`Next::Close`] or failed, the server drained); `wfile` is flushed after it.
    fn finish(&mut self, s: &mut StreamRequest) -> HandlerResult {
        let _ = s;
        Ok(())
    }

    /// Whether `buffered`, the start of the next message as received so far, is a whole
    /// message. In [`Dispatch::Event`](crate::Dispatch::Event) the connection stays parked,
    /// holding no thread, until this says yes (or `rfile`'s buffer is full), and a call that
    /// runs out of input anyway is taken back and run again, so a client that sends half a
    /// message and stops costs no worker: the idle timeout and the minimum data rate close it.
    /// The default, any byte, is right for any framing; saying when a message is whole saves
    /// the calls that would be taken back.
    fn message_ready(&self, buffered: &[u8]) -> bool {
        !buffered.is_empty()
    }
}

/// Adapts a [`MessageHandler`] into a [`Handler`], the one [`Dispatch::Event`](crate::Dispatch::Event)
/// requires: builds `rfile` and `wfile` with the [`StreamOptions`], and flushes `wfile` after
/// each message and after `finish`.
///
/// ```no_run
/// # use socketserver::{HandlerError, MessageHandler, Next, StreamRequest};
/// # struct Lengths;
/// # impl MessageHandler for Lengths {
/// #     fn handle_message(&mut self, _: &mut StreamRequest) -> Result<Next, HandlerError> {
/// #         Ok(Next::Close)
/// #     }
/// # }
/// use socketserver::{Dispatch, MessageRequestHandler, TcpServer};
///
/// let server = TcpServer::builder(|| MessageRequestHandler::new(Lengths))
///     .dispatch(Dispatch::Event { workers: 2 })
///     .bind("127.0.0.1:0")?;
/// # Ok::<(), socketserver::Error>(())
/// ```
pub struct MessageRequestHandler<M> {
    inner: M,
    options: StreamOptions,
    state: Option<StreamRequest>,
}

impl<M: MessageHandler> MessageRequestHandler<M> {
    /// Wraps `inner` with the default [`StreamOptions`].
    pub fn new(inner: M) -> Self {
        Self::with_options(inner, StreamOptions::default())
    }

    /// Wraps `inner` with the given options.
    pub fn with_options(inner: M, options: StreamOptions) -> Self {
        MessageRequestHandler {
            inner,
            options,
            state: None,
        }
    }

    /// The wrapped handler.
    pub fn get_ref(&self) -> &M {
        &self.inner
    }

    fn state(&mut self) -> Result<(&mut M, &mut StreamRequest), HandlerError> {
        match &mut self.state {
            Some(s) => Ok((&mut self.inner, s)),
            None => Err("MessageRequestHandler used before setup".into()),
        }
    }
}

impl<M: MessageHandler> Handler for MessageRequestHandler<M> {
    const SERVES_MESSAGES: bool = true;

    fn setup(&mut self, req: &mut Request) -> HandlerResult {
        let s = self.state.insert(StreamRequest::new(req, self.options));
        self.inner.setup(s)
    }

    /// Outside event mode: the messages one after another, until the client hangs up or the
    /// handler says [`Next::Close`]. (A drain cuts a connection that waits here for its next
    /// message once the grace period ends, as any other; event mode closes parked ones at
    /// once, since no thread waits there.)
    fn handle(&mut self, _req: &mut Request) -> HandlerResult {
        let (inner, s) = self.state()?;
        while !s.rfile.fill_buf()?.is_empty() {
            let next = inner.handle_message(s)?;
            // A message is a unit, as in event mode.
            s.rfile.get_ref().unit_done(s.rfile.buffer().len());
            s.wfile.flush()?;
            if next == Next::Close {
                break;
            }
        }
        Ok(())
    }

    fn finish(&mut self, _req: &mut Request) -> HandlerResult {
        let (inner, s) = self.state()?;
        let finished = inner.finish(s);
        let flushed = s.wfile.flush();
        finished?;
        Ok(flushed?)
    }

    fn messages(&mut self) -> Option<(&mut dyn MessageHandler, &mut StreamRequest)> {
        let s = self.state.as_mut()?;
        Some((&mut self.inner, s))
    }
}
