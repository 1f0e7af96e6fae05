//! The handler traits of stream servers: [`Handler`], Python's `BaseRequestHandler` and
//! `StreamRequestHandler` in one (`setup` → `handle` → `finish`, with buffered `rfile` and
//! `wfile`), and [`MessageHandler`], one message per call, for every dispatch mode.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};

use crate::stream::{Direction, StreamTimeout};
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

/// Serves one connection of a stream server (TCP or Unix-domain): Python's
/// `BaseRequestHandler` and `StreamRequestHandler` in one.
///
/// The server makes a handler per connection with the factory it was given (so fields are
/// per-connection state; shared state is an `Arc` the factory captures) and calls, on the
/// connection's thread, [`setup`](Self::setup), then [`handle`](Self::handle), then
/// [`finish`](Self::finish). `finish` runs even when `handle` fails or panics, but not when
/// `setup` does, as in Python; `wfile` is flushed after it. An error or panic from any of them
/// goes to the server's `handle_error` hook (by default a log line with the peer address); the
/// connection is closed and the server carries on.
///
/// The [`Request`] reads through its `rfile`, whose line reads are bounded (an endless line is
/// an error, not an endless allocation), and writes through its `wfile`:
///
/// ```
/// use std::io::Write;
/// use socketserver::{Handler, HandlerResult, Request};
///
/// struct LineEcho;
///
/// impl Handler for LineEcho {
///     fn handle(&mut self, req: &mut Request) -> HandlerResult {
///         // Each line at most StreamOptions::max_line bytes (64 KiB).
///         for line in req.rfile.lines() {
///             writeln!(req.wfile, "{}", line?)?;
///         }
///         Ok(())
///     }
/// }
/// ```
///
/// A handler holds its thread for the whole connection. One that serves a message at a time
/// (a request and its reply) is better written as a [`MessageHandler`]: every type that is one
/// is a `Handler` too, and only those run in event mode
/// ([`Builder::event`](crate::Builder::event)).
pub trait Handler: Send + 'static {
    /// Runs before [`handle`](Self::handle). If it fails, neither `handle` nor `finish` runs.
    fn setup(&mut self, req: &mut Request) -> HandlerResult {
        let _ = req;
        Ok(())
    }

    /// Serves the connection. Returning ends it: the server shuts the socket down and closes it.
    fn handle(&mut self, req: &mut Request) -> HandlerResult;

    /// Runs after [`handle`](Self::handle), whether it succeeded, failed or panicked; `wfile`
    /// is flushed after it.
    fn finish(&mut self, req: &mut Request) -> HandlerResult {
        let _ = req;
        Ok(())
    }

    /// The message handler this is, for event mode: only the [`MessageHandler`]s' own
    /// implementation says so. Not for implementing.
    #[doc(hidden)]
    fn as_message_handler(&mut self) -> Option<&mut dyn MessageHandler> {
        None
    }
}

/// One accepted connection, as a handler sees it: a buffered reader (`rfile`) and writer
/// (`wfile`), the peer address, and a handle to the server. The `Request` itself reads through
/// `rfile` and writes through `wfile`, so `req.read(..)` and `write!(req, ..)` work too.
///
/// `write!` formats the whole message, then writes it in one call (one segment).
pub struct Request {
    /// Buffered reader over the connection (Python's `rfile`); its line reads are bounded by
    /// [`StreamOptions::max_line`]. Its buffer is allocated by the first read, so a handler
    /// that never reads through it pays for none.
    pub rfile: RFile,
    /// Writer over the connection (Python's `wfile`): unbuffered by default, as in Python
    /// ([`StreamOptions::wbufsize`]); flushed after `finish`, and after each message of a
    /// [`MessageHandler`].
    pub wfile: WFile,
    pub(crate) stream: Stream,
    pub(crate) peer: Addr,
    pub(crate) server: ServerHandle,
    /// The PROXY header the connection came with, if the server takes them.
    #[cfg(feature = "proxy-protocol")]
    pub(crate) proxy: Option<std::sync::Arc<crate::proxy::ProxyInfo>>,
}

impl Request {
    pub(crate) fn new(
        stream: Stream,
        peer: Addr,
        server: ServerHandle,
        options: StreamOptions,
    ) -> Request {
        Request {
            rfile: RFile::new(
                stream.clone(),
                options.rbufsize,
                options.max_line,
                peer.clone(),
            ),
            wfile: WFile::new(stream.clone(), options.wbufsize),
            stream,
            peer,
            server,
            #[cfg(feature = "proxy-protocol")]
            proxy: None,
        }
    }

    /// The client a PROXY header named, from admission on.
    pub(crate) fn set_peer(&mut self, peer: Addr) {
        self.rfile.set_peer(peer.clone());
        self.peer = peer;
    }

    /// The connection's socket. Clone it for a second reader or writer (a read on it skips
    /// what `rfile` has buffered).
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
        self.rfile.read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.rfile.read_vectored(bufs)
    }
}

impl Write for Request {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wfile.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.wfile.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.wfile.flush()
    }

    fn write_fmt(&mut self, args: fmt::Arguments<'_>) -> io::Result<()> {
        self.wfile.write_fmt(args)
    }
}

/// The buffering of every connection's `rfile` and `wfile`, and the longest line `rfile`
/// reads: [`Builder::stream_options`](crate::Builder::stream_options).
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

/// What a [`MessageHandler`] wants after a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Next {
    /// Keep the connection open and wait for the next message (HTTP's keep-alive).
    Message,
    /// Close the connection: `finish` runs, then the socket is shut down and closed.
    Close,
}

/// Serves a connection one message at a time, in every dispatch mode: the only handler event
/// mode ([`Builder::event`](crate::Builder::event)) takes, since it holds a worker thread only
/// while a message is being served and parks the connection, holding no thread and no buffer,
/// until the next one arrives (Apache's event MPM, with a blocking API). Every message handler
/// is a [`Handler`] too: in the other modes it serves its messages one after another on the
/// connection's thread. The server's
/// [`stream_options`](crate::Builder::stream_options) size its `rfile` and `wfile`.
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
/// use socketserver::{HandlerError, MessageHandler, Next, Request};
///
/// /// Answers each line with its length; `quit` ends the connection.
/// struct Lengths {
///     served: u64, // survives between messages
/// }
///
/// impl MessageHandler for Lengths {
///     fn handle_message(&mut self, s: &mut Request) -> Result<Next, HandlerError> {
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
    fn setup(&mut self, s: &mut Request) -> HandlerResult {
        let _ = s;
        Ok(())
    }

    /// Serves one message. An error or a panic closes the connection (after `finish`) and is
    /// reported like a failed `handle`; other connections are not affected.
    fn handle_message(&mut self, s: &mut Request) -> Result<Next, HandlerError>;

    /// Runs once when the connection ends, however it ends (the client hung up, the handler
    /// said [`Next::Close`] or failed, the server drained); `wfile` is flushed after it.
    fn finish(&mut self, s: &mut Request) -> HandlerResult {
        let _ = s;
        Ok(())
    }

    /// Whether `buffered`, the start of the next message as received so far, is a whole
    /// message. In event mode the connection stays parked,
    /// holding no thread, until this says yes (or `rfile`'s buffer is full), and a call that
    /// runs out of input anyway is taken back and run again, so a client that sends half a
    /// message and stops costs no worker: the idle timeout and the minimum data rate close it.
    /// The default, any byte, is right for any framing; saying when a message is whole saves
    /// the calls that would be taken back.
    fn message_ready(&self, buffered: &[u8]) -> bool {
        !buffered.is_empty()
    }
}

/// Every message handler is a [`Handler`]: outside event mode it serves its messages one after
/// another on the connection's thread, until the client hangs up or it says [`Next::Close`].
/// (A drain cuts a connection that waits here for its next message once the grace period ends,
/// as any other; event mode closes parked ones at once, since no thread waits there.)
impl<M: MessageHandler> Handler for M {
    fn setup(&mut self, req: &mut Request) -> HandlerResult {
        MessageHandler::setup(self, req)
    }

    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        while !req.rfile.fill_buf()?.is_empty() {
            let next = self.handle_message(req)?;
            // A message is a unit, as in event mode.
            req.stream.unit_done(req.rfile.buffer().len());
            req.wfile.flush()?;
            if next == Next::Close {
                break;
            }
        }
        Ok(())
    }

    fn finish(&mut self, req: &mut Request) -> HandlerResult {
        MessageHandler::finish(self, req)
    }

    fn as_message_handler(&mut self) -> Option<&mut dyn MessageHandler> {
        Some(self)
    }
}
