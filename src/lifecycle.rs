//! The handler lifecycle shared by every transport: make the handler, `setup` → `handle` →
//! `finish`, catch panics, count and report failures.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use crate::control::Counters;
use crate::observe::ConnSpan;
use crate::worker::{Ctx, Severity, panic_message};
use crate::{
    Addr, DatagramHandler, DatagramRequest, Handler, HandlerFailure, HandlerResult, Request, Stream,
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
    fn finish(&mut self, req: &mut Request) -> HandlerResult {
        Handler::finish(self, req)
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
            Counters::bump(&ctx.control().counters.panics);
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
/// This is where every request's duration is recorded (`Stats::request_duration`), whatever
/// the transport and dispatch mode: serving one message of an event-mode connection runs its
/// steps here too.
pub(crate) fn run<R: HasPeer, H: Lifecycle<R>>(h: &mut H, req: &mut R, ctx: &Ctx) -> bool {
    let started = Instant::now();
    let ok = run_steps(h, req, ctx);
    ctx.control().record_request(started.elapsed());
    ok
}

fn run_steps<R: HasPeer, H: Lifecycle<R>>(h: &mut H, req: &mut R, ctx: &Ctx) -> bool {
    if !step(h, req, ctx, "setup", H::setup) {
        return false;
    }
    let handled = step(h, req, ctx, "handle", H::handle);
    let finished = step(h, req, ctx, "finish", H::finish);
    handled && finished
}

/// Opens the observation of a connection from `peer` on its worker: its `tracing` span (a
/// no-op without the feature), entered around admission and the lifecycle.
pub(crate) fn open(peer: &Addr) -> ConnSpan {
    ConnSpan::open(peer)
}

/// Ends it: the bytes the connection moved through its `Stream` go into the server's totals,
/// and the span gets its close event with the duration and bytes.
pub(crate) fn closed(ctx: &Ctx, stream: &Stream, span: &ConnSpan) {
    let (read, written) = stream.bytes_moved();
    ctx.control().record_bytes(read, written);
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

fn step<R: HasPeer, H>(
    h: &mut H,
    req: &mut R,
    ctx: &Ctx,
    stage: &'static str,
    f: fn(&mut H, &mut R) -> HandlerResult,
) -> bool {
    let counters = &ctx.control().counters;
    let (failure, severity) = match catch_unwind(AssertUnwindSafe(|| f(h, req))) {
        Ok(Ok(())) => return true,
        Ok(Err(e)) => {
            let failure = HandlerFailure::Error(e);
            let severity = if req.was_cut() {
                // The cut's echo (end of file, a broken pipe): counted and logged by the cut.
                Severity::AfterCut
            } else if failure.is_timeout() {
                // The peer went quiet: not a fault of the handler.
                Counters::bump(&counters.timeouts);
                Severity::Timeout
            } else {
                Counters::bump(&counters.handler_errors);
                Severity::Failure
            };
            (failure, severity)
        }
        Err(p) => {
            Counters::bump(&counters.panics);
            (HandlerFailure::Panic(panic_message(&*p)), Severity::Failure)
        }
    };
    ctx.report_as(req.peer(), stage, failure, severity);
    false
}
