//! Stream transports: accepting TCP and Unix-domain connections, and serving each one through
//! the authentication middleware and a [`Handler`]'s lifecycle.

use std::io;
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use super::socket::OwnedPath;
use super::{Incoming, Listener, Service, Step};
use crate::admission::{Admission, Admitted, Learnt, Pipeline};
use crate::control::Control;
use crate::lifecycle::{self, Served};
use crate::log_limit::limited;
use crate::observe::ConnSpan;
use crate::worker::Ctx;
use crate::{Addr, Handler, Next, Request, Stream, StreamOptions};

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
    #[cfg(feature = "tls")]
    stream.close_notify();
    // Event mode: what is queued goes first, as far as the socket takes it now.
    let _ = stream.flush_output();
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
    const STREAMS: bool = true;

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
    const STREAMS: bool = true;

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
    /// The buffering of each connection's `rfile` and `wfile`.
    pub(crate) options: StreamOptions,
}

impl<H> StreamService<H> {
    pub(crate) fn new(factory: Box<dyn Fn() -> H + Send + Sync>) -> Self {
        StreamService {
            factory,
            admission: Pipeline::default(),
            read_timeout: None,
            write_timeout: None,
            nodelay: true,
            options: StreamOptions::default(),
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

impl<H: Handler> StreamService<H> {
    /// After admission: timeouts, the handler, its `setup`. `None` if the connection must close
    /// (it is then closed by the caller; `finish` does not run after a failed `setup`).
    fn start(&self, req: &mut Request, ctx: &Ctx) -> Option<H> {
        if let Err(e) = self.apply_timeouts(&req.stream) {
            limited!(
                warn,
                "cannot set timeouts on connection from {}: {e}",
                req.peer
            );
            return None;
        }
        let mut handler = lifecycle::make(&*self.factory, &req.peer, ctx)?;
        lifecycle::setup(&mut handler, req, ctx).then_some(handler)
    }
}

/// An event-mode connection between its messages.
pub struct Session<H> {
    req: Request,
    phase: Phase<H>,
    /// The connection's span, entered each time the session runs.
    span: ConnSpan,
    /// What admission learnt (the client's place under `max_per_source`), kept to the end.
    learnt: Option<Learnt>,
}

enum Phase<H> {
    /// Accepted; nothing run yet.
    Fresh,
    /// Going through admission (or just through it, or refused).
    Admitting(Admission),
    /// Set up; serving messages.
    Serving(H),
    /// Finished (`finish` has run), sending what is still queued before the close.
    Flushing,
    /// Closing.
    Ended,
}

/// Event mode: a connection whose queued output is above this is not read (nor its buffered
/// messages served) until the peer has taken some: a client that never reads costs its socket
/// buffers and this, never a worker. One reply may take it past the bound; the next waits.
pub(crate) const OUTPUT_BOUND: usize = 64 * 1024;

/// Parks the connection, unless the server is draining (a parked connection is closed at once
/// then, and one that parks after the drain swept them must close itself).
fn park<H>(s: &mut Session<H>, ctx: &Ctx) -> Step {
    s.req.stream.set_parked(true);
    // Pairs with the fence of `Control::begin_drain`: either the drain sees this connection
    // parked and cuts it, or this sees the drain.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    if ctx.control().drain.is_draining() {
        s.req.stream.set_parked(false);
        return Step::Close;
    }
    Step::Park
}

/// Serves the messages that are whole in the buffer or on the socket, without waiting for the
/// peer; `Park` once the socket has nothing more (its buffer released when empty), or while the
/// output the peer has not taken is above [`OUTPUT_BOUND`] (it is then not read: backpressure).
fn serve_messages<H: Handler>(h: &mut H, req: &mut Request, ctx: &Ctx) -> Step {
    // Input was signalled: ask the socket at least once.
    let mut asked = false;
    loop {
        match req.stream.flush_output() {
            Ok(queued) if queued > OUTPUT_BOUND => return Step::Park,
            Ok(_) => {}
            Err(e) => {
                lifecycle::read_failed(req, ctx, e);
                return Step::Close;
            }
        }
        let Some(m) = h.as_message_handler() else {
            return Step::Close;
        };
        let buffered = req.rfile.buffer();
        let whole = !buffered.is_empty() && (m.message_ready(buffered) || req.rfile.is_full());
        if whole {
            match lifecycle::message(h, req, ctx) {
                Served::Next(Next::Message) => continue,
                Served::Next(Next::Close) => return Step::Close,
                // The read that found the socket empty left it so: the next byte is signalled.
                Served::Starved => {
                    req.rfile.park();
                    return Step::Park;
                }
                Served::TooLarge => {
                    limited!(
                        info,
                        "message from {} longer than {} bytes (rfile's limit in event mode: \
                         StreamOptions::rbufsize or max_line); connection closed",
                        req.peer,
                        req.rfile.message_limit()
                    );
                    return Step::Close;
                }
            }
        }
        // The last read left the socket empty, and any byte since is signalled anew.
        if asked && req.rfile.drained() {
            req.rfile.park();
            return Step::Park;
        }
        asked = true;
        match req.rfile.fill_nonblocking() {
            Ok(0) => return Step::Close,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                req.rfile.park();
                return Step::Park;
            }
            Err(e) => {
                lifecycle::read_failed(req, ctx, e);
                return Step::Close;
            }
        }
    }
}

/// Event mode: the handler is done with the connection. `finish` runs now, and what it and
/// the messages before it wrote is sent before the close (the connection waits, parked on
/// its socket, while the peer takes it); `Close` once nothing is left.
fn finish_and_flush<H: Handler>(mut h: H, s: &mut Session<H>, ctx: &Ctx) -> Step {
    s.req.stream.hold_output();
    lifecycle::finish(&mut h, &mut s.req, ctx);
    drop(h);
    if s.req.stream.release_output().is_err() {
        return Step::Close;
    }
    #[cfg(feature = "tls")]
    s.req.stream.close_notify();
    flush_then_close(s, ctx)
}

/// `Close` once the queued output is sent (or cannot be), else parks for it.
fn flush_then_close<H>(s: &mut Session<H>, ctx: &Ctx) -> Step {
    s.phase = Phase::Flushing;
    match s.req.stream.flush_output() {
        Ok(0) | Err(_) => Step::Close,
        Ok(_) => park(s, ctx),
    }
}

impl<H: Handler> Service for StreamService<H> {
    type Request = Accepted;
    type Session = Session<H>;

    fn prepare(&mut self, limit: Option<usize>, parks: bool) -> crate::Result<()> {
        // The OS refuses a zero socket timeout; say so once, at build, rather than on every
        // connection.
        if self.read_timeout == Some(Duration::ZERO) || self.write_timeout == Some(Duration::ZERO) {
            return Err(crate::Error::config(
                "a read or write timeout of zero: use None for no timeout",
            ));
        }
        self.admission.prepare(limit, parks)
    }

    fn session(&self, conn: Accepted, ctx: &Ctx) -> Option<Session<H>> {
        let span = lifecycle::open(&conn.peer);
        Some(Session {
            req: Request::new(conn.stream, conn.peer, ctx.handle.clone(), self.options),
            phase: Phase::Fresh,
            span,
            learnt: None,
        })
    }

    fn resume(&self, s: &mut Session<H>, ctx: &Ctx) -> Step {
        let span = s.span.clone();
        span.in_scope(|| self.resume_session(s, ctx))
    }

    fn end(&self, s: Session<H>, ctx: &Ctx) {
        let Session {
            mut req,
            phase,
            span,
            learnt,
        } = s;
        req.stream.set_parked(false);
        if let Phase::Serving(mut h) = phase {
            span.in_scope(|| lifecycle::finish(&mut h, &mut req, ctx));
            drop(h);
        }
        close(&req.stream, &req.peer);
        lifecycle::closed(ctx, &req.stream, &span);
        drop(learnt);
    }

    fn tick(&self, ctx: &Ctx) {
        if !self.admission.is_empty() {
            self.admission.expire(ctx.control());
        }
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

    fn serve(&self, conn: Accepted, ctx: &Ctx) {
        let span = lifecycle::open(&conn.peer);
        let stream = conn.stream.clone();
        self.serve_connection(conn, ctx, &span);
        lifecycle::closed(ctx, &stream, &span);
    }
}

impl<H: Handler> StreamService<H> {
    /// Event mode: runs a session as far as it goes without waiting for the peer.
    fn resume_session(&self, s: &mut Session<H>, ctx: &Ctx) -> Step {
        s.req.stream.set_parked(false);
        let control = &ctx.handle.control;
        loop {
            match std::mem::replace(&mut s.phase, Phase::Ended) {
                Phase::Fresh => {
                    let a = self.admission.begin(&s.req.stream, &s.req.peer, control);
                    // Other stages look once more before parking: their input may have come
                    // with what woke the connection.
                    let settled = matches!(&a, Admission::Parked(p) if p.read_all());
                    s.phase = Phase::Admitting(a);
                    if settled {
                        return park(s, ctx);
                    }
                }
                Phase::Admitting(Admission::Admitted(a)) => {
                    // The client a PROXY header named, and its header, from here on.
                    let Admitted { peer, learnt } = *a;
                    s.req.set_peer(peer);
                    #[cfg(feature = "proxy-protocol")]
                    {
                        s.req.proxy = learnt.proxy.clone();
                    }
                    s.learnt = Some(learnt);
                    match self.start(&mut s.req, ctx) {
                        Some(h) => s.phase = Phase::Serving(h),
                        None => return Step::Close,
                    }
                }
                Phase::Admitting(Admission::Parked(p)) => {
                    match self.admission.resume(p, &s.req.stream, control) {
                        Admission::Parked(p) => {
                            s.phase = Phase::Admitting(Admission::Parked(p));
                            return park(s, ctx);
                        }
                        a => s.phase = Phase::Admitting(a),
                    }
                }
                Phase::Admitting(Admission::Refused) | Phase::Ended => return Step::Close,
                Phase::Serving(mut h) => {
                    return match serve_messages(&mut h, &mut s.req, ctx) {
                        Step::Park => {
                            s.phase = Phase::Serving(h);
                            park(s, ctx)
                        }
                        Step::Close => finish_and_flush(h, s, ctx),
                    };
                }
                Phase::Flushing => return flush_then_close(s, ctx),
            }
        }
    }

    /// Admission, then the handler's lifecycle, each inside the connection's span.
    fn serve_connection(&self, conn: Accepted, ctx: &Ctx, span: &ConnSpan) {
        let Accepted { stream, mut peer } = conn;
        // Kept to the end: it holds the client's count under max_per_source.
        let Some(learnt) = span.in_scope(|| {
            self.admission
                .admit(&stream, &mut peer, &ctx.handle.control)
        }) else {
            return close(&stream, &peer);
        };
        if let Err(e) = self.apply_timeouts(&stream) {
            limited!(warn, "cannot set timeouts on connection from {peer}: {e}");
            return close(&stream, &peer);
        }
        let Some(mut handler) = lifecycle::make(&*self.factory, &peer, ctx) else {
            return close(&stream, &peer);
        };
        let mut req = Request::new(stream, peer, ctx.handle.clone(), self.options);
        #[cfg(feature = "proxy-protocol")]
        {
            req.proxy = learnt.proxy.clone();
        }
        span.in_scope(|| lifecycle::run(&mut handler, &mut req, ctx));
        drop(handler);
        close(&req.stream, &req.peer);
        drop(learnt);
    }
}
