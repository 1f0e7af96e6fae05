//! The request handler traits: Python's `BaseRequestHandler` (`setup` → `handle` → `finish`) and
//! `StreamRequestHandler` (buffered `rfile` / `wfile`), for every stream transport.

use std::fmt;
use std::io::{self, BufReader, BufWriter, IoSlice, IoSliceMut, Read, Write};
use std::time::Duration;

use crate::{Addr, Credentials, ServerHandle, Stream};

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
/// use std::io::{BufRead, BufReader, Write};
/// use socketserver::{Handler, HandlerResult, Request};
///
/// struct Echo;
///
/// impl Handler for Echo {
///     fn handle(&mut self, req: &mut Request) -> HandlerResult {
///         let mut lines = BufReader::new(req.stream().clone());
///         let mut line = String::new();
///         while lines.read_line(&mut line)? > 0 {
///             req.write_all(line.as_bytes())?;
///             line.clear();
///         }
///         Ok(())
///     }
/// }
/// ```
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
pub struct Request {
    pub(crate) stream: Stream,
    pub(crate) peer: Addr,
    pub(crate) server: ServerHandle,
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
}

/// Buffering and socket options of a [`StreamRequestHandler`], with Python's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// Capacity of `rfile`, the buffered reader. Default 8 KiB.
    pub rbufsize: usize,
    /// Capacity of `wfile`, the buffered writer. Default 0, as in Python: every write goes
    /// straight to the socket. With a buffer, flush it when a reply is complete; `finish` flushes
    /// whatever is left.
    pub wbufsize: usize,
    /// Read and write timeout applied to the socket in `setup`. Default none.
    pub timeout: Option<Duration>,
    /// Set `TCP_NODELAY` (Python's `disable_nagle_algorithm`). Default false.
    pub nodelay: bool,
}

impl Default for StreamOptions {
    fn default() -> StreamOptions {
        StreamOptions {
            rbufsize: 8 * 1024,
            wbufsize: 0,
            timeout: None,
            nodelay: false,
        }
    }
}

/// A connection with a buffered reader (`rfile`) and writer (`wfile`), as a [`StreamHandler`]
/// sees it.
pub struct StreamRequest {
    /// Buffered reader over the connection.
    pub rfile: BufReader<Stream>,
    /// Writer over the connection (buffered when `wbufsize` > 0); flushed after `finish`.
    pub wfile: BufWriter<Stream>,
    peer: Addr,
    server: ServerHandle,
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
}

/// Serves one connection through buffered `rfile` / `wfile`, like Python's
/// `StreamRequestHandler`. Wrap it in [`StreamRequestHandler`] to get a [`Handler`].
///
/// ```
/// use std::io::{BufRead, Write};
/// use socketserver::{StreamHandler, StreamRequest, HandlerResult};
///
/// struct LineEcho;
///
/// impl StreamHandler for LineEcho {
///     fn handle(&mut self, s: &mut StreamRequest) -> HandlerResult {
///         let mut line = Vec::new();
///         while s.rfile.read_until(b'\n', &mut line)? > 0 {
///             s.wfile.write_all(&line)?;
///             line.clear();
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

/// Adapts a [`StreamHandler`] into a [`Handler`]: applies the [`StreamOptions`] to the socket,
/// builds `rfile` and `wfile`, and flushes `wfile` after `finish`.
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
        if o.timeout.is_some() {
            req.stream.set_read_timeout(o.timeout)?;
            req.stream.set_write_timeout(o.timeout)?;
        }
        if o.nodelay {
            req.stream.set_nodelay(true)?;
        }
        let s = self.state.insert(StreamRequest {
            rfile: BufReader::with_capacity(o.rbufsize, req.stream.clone()),
            wfile: BufWriter::with_capacity(o.wbufsize, req.stream.clone()),
            peer: req.peer.clone(),
            server: req.server.clone(),
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
