//! The handler lifecycle shared by every transport: make the handler, `setup` → `handle` →
//! `finish`, catch panics, count and report failures.

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use crate::buffered::Taken;
use crate::observe::ConnSpan;
use crate::recorder::Event;
use crate::worker::{Ctx, Severity, panic_message};
use crate::{
    Addr, DatagramHandler, DatagramRequest, Handler, HandlerError, HandlerFailure, HandlerResult,
    Next, Request, Stream,
};

/// The three steps of a handler, whatever the request type.
pub(crate) trait Lifecycle<R> {
    fn setup(&mut self, req: &mut R) -> HandlerResult;
    fn handle(&mut self, req: &mut R) -> HandlerResult;
    fn finish(&mut self, req: &mut R) -> HandlerResult;
}

impl<H: Handler> Lifecycle<Request> for H {
    fn setup(&mut self, req: &mut Request) -> HandlerResult {
        Handler::setup(self, req)
    }
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        Handler::handle(self, req)
    }
    /// `finish`, then `wfile` is flushed, as Python's `StreamRequestHandler.finish` does.
    fn finish(&mut self, req: &mut Request) -> HandlerResult {
        let finished = Handler::finish(self, req);
        let flushed = req.wfile.flush();
        finished?;
        Ok(flushed?)
    }
}

impl<H: DatagramHandler> Lifecycle<DatagramRequest> for H {
    fn setup(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        DatagramHandler::setup(self, req)
    }
    fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        DatagramHandler::handle(self, req)
    }
    fn finish(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        DatagramHandler::finish(self, req)
    }
}

/// Makes a handler with the factory; a panicking factory is reported like a panicking handler.
pub(crate) fn make<H>(
    factory: &(dyn Fn() -> H + Send + Sync),
    peer: &Addr,
    ctx: &Ctx,
) -> Option<H> {
    match catch_unwind(AssertUnwindSafe(factory)) {
        Ok(h) => Some(h),
        Err(p) => {
            ctx.control().record(Event::Panic);
            ctx.report(peer, "factory", HandlerFailure::Panic(panic_message(&*p)));
            None
        }
    }
}

/// Runs `setup`, then `handle` and `finish` (`finish` even when `handle` failed; neither when
/// `setup` failed). Returns true if all three succeeded.
///
/// Unwind safety: after `setup` panics, the handler and request are dropped unused; after
/// `handle` panics, only `finish` sees them (as in Python, whose `finish` runs in a `finally`),
/// and `finish` is written to clean up after a failed `handle`. State shared with other
/// connections is behind locks, which poison.
///
/// The request's duration is recorded here (`Stats::request_duration`), as each message's is
/// in [`message`]: the lifecycle is the one place every request passes, whatever the
/// transport and dispatch mode.
pub(crate) fn run<R: HasPeer, H: Lifecycle<R>>(h: &mut H, req: &mut R, ctx: &Ctx) -> bool {
    let started = Instant::now();
    let ok = run_steps(h, req, ctx);
    ctx.control().record(Event::Request {
        took: started.elapsed(),
    });
    ok
}

fn run_steps<R: HasPeer, H: Lifecycle<R>>(h: &mut H, req: &mut R, ctx: &Ctx) -> bool {
    if !setup(h, req, ctx) {
        return false;
    }
    let handled = step(h, req, ctx, "handle", H::handle).is_some();
    let finished = finish(h, req, ctx);
    handled && finished
}

/// Runs `setup` alone (event mode, where messages follow one by one); true if it succeeded.
pub(crate) fn setup<R: HasPeer, H: Lifecycle<R>>(h: &mut H, req: &mut R, ctx: &Ctx) -> bool {
    step(h, req, ctx, "setup", H::setup).is_some()
}

/// Runs `finish` alone; true if it succeeded.
pub(crate) fn finish<R: HasPeer, H: Lifecycle<R>>(h: &mut H, req: &mut R, ctx: &Ctx) -> bool {
    step(h, req, ctx, "finish", H::finish).is_some()
}

/// Event mode: serves one message with the handler's
/// [`handle_message`](crate::MessageHandler::handle_message) and flushes `wfile`. A failure or
/// a panic is reported like a failed `handle`, and closes the connection. Its duration is
/// recorded as one request's.
///
/// A call that read past the input that has arrived (its read found the non-blocking socket
/// empty) is taken back, whatever it returned: its input is unread again and what it wrote is
/// dropped, so it can run again, from the start of the message, once more input comes.
/// `Message(None)` then, with no failure reported; [`Served::TooLarge`] when the message
/// cannot fit in `rfile`'s limit at all.
pub(crate) fn message<H: Handler>(h: &mut H, req: &mut Request, ctx: &Ctx) -> Served {
    let started = Instant::now();
    req.rfile.begin_message();
    req.stream.hold_output();
    let served = serve_message(h, req, ctx);
    match req.rfile.end_message() {
        Taken::Whole => {
            ctx.control().record(Event::Request {
                took: started.elapsed(),
            });
            // A message is a unit: the silence before the next one is no slow request.
            req.stream.unit_done(req.rfile.buffer().len());
            if let Err(e) = req.stream.release_output() {
                read_failed(req, ctx, e);
                return Served::Next(Next::Close);
            }
            Served::Next(served.flatten().unwrap_or(Next::Close))
        }
        // It panicked after running out: not run again.
        _ if served.is_none() => Served::Next(Next::Close),
        starved => {
            req.wfile.discard();
            req.stream.discard_output();
            match starved {
                Taken::TooLarge => Served::TooLarge,
                _ => Served::Starved,
            }
        }
    }
}

/// What became of a message in event mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    /// It was served; the handler wants this next.
    Next(Next),
    /// It needs input that has not come: taken back, to run again when it does.
    Starved,
    /// It needs more input than `rfile` may hold: it can never be served.
    TooLarge,
}

/// The call itself: `None` if it failed (reported), `Some(None)` if it ran out of input
/// (not reported: it runs again).
fn serve_message<H: Handler>(h: &mut H, req: &mut Request, ctx: &Ctx) -> Option<Option<Next>> {
    let serve = |h: &mut H, req: &mut Request| -> Result<Option<Next>, HandlerError> {
        // Event mode takes only message handlers (`Builder::event`'s bound).
        let m = h
            .as_message_handler()
            .ok_or("event mode serves message handlers only")?;
        let next = m.handle_message(req);
        if req.rfile.starved() {
            return Ok(None);
        }
        let next = next?;
        req.wfile.flush()?;
        Ok(Some(next))
    };
    step(h, req, ctx, "handle_message", serve)
}

/// Event mode: a read between messages failed (a reset, a corrupt TLS record). Reported and
/// counted as the handler's own read failing would be in the other modes.
pub(crate) fn read_failed(req: &mut Request, ctx: &Ctx, e: std::io::Error) {
    step(&mut (), req, ctx, "handle_message", |_, _| {
        Err::<(), HandlerError>(e.into())
    });
}

/// Opens the observation of a connection from `peer` on its worker: its `tracing` span (a
/// no-op without the feature), entered around admission and the lifecycle (around each step,
/// and each message, in event mode).
pub(crate) fn open(peer: &Addr) -> ConnSpan {
    ConnSpan::open(peer)
}

/// Ends it: the bytes the connection moved through its `Stream` go into the server's totals,
/// and the span gets its close event with the duration and bytes.
pub(crate) fn closed(ctx: &Ctx, stream: &Stream, span: &ConnSpan) {
    let (read, written) = stream.bytes_moved();
    ctx.control().record(Event::Bytes { read, written });
    span.close(read, written);
}

/// Requests know their peer, for the error report.
pub(crate) trait HasPeer {
    fn peer(&self) -> &Addr;

    /// Whether the server cut the connection (idle timeout, minimum data rate): the handler's
    /// failure is then the cut's echo (a broken pipe), already logged and counted.
    fn was_cut(&self) -> bool {
        false
    }
}

impl HasPeer for Request {
    fn peer(&self) -> &Addr {
        &self.peer
    }

    fn was_cut(&self) -> bool {
        self.stream.was_cut()
    }
}

impl HasPeer for DatagramRequest {
    fn peer(&self) -> &Addr {
        self.peer_addr()
    }
}

fn step<R: HasPeer, H, T>(
    h: &mut H,
    req: &mut R,
    ctx: &Ctx,
    stage: &'static str,
    f: impl FnOnce(&mut H, &mut R) -> Result<T, HandlerError>,
) -> Option<T> {
    let control = ctx.control();
    let (failure, severity) = match catch_unwind(AssertUnwindSafe(|| f(h, req))) {
        Ok(Ok(t)) => return Some(t),
        Ok(Err(e)) => {
            let failure = HandlerFailure::Error(e);
            let severity = if req.was_cut() {
                // The cut's echo (end of file, a broken pipe): counted and logged by the cut.
                Severity::AfterCut
            } else if failure.is_disconnect() {
                // The client reset or left mid-request (a health check, a killed client): not
                // the handler's failure, and not worth more than a debug line.
                Severity::PeerGone
            } else if failure.is_timeout() {
                // The peer went quiet: not a fault of the handler.
                control.record(Event::Timeout);
                Severity::Timeout
            } else {
                control.record(Event::HandlerError);
                Severity::Failure
            };
            (failure, severity)
        }
        Err(p) => {
            control.record(Event::Panic);
            (HandlerFailure::Panic(panic_message(&*p)), Severity::Failure)
        }
    };
    ctx.report_as(req.peer(), stage, failure, severity);
    None
}
