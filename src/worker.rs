//! What every worker shares, whichever transport and dispatch mode it serves: the server's
//! handle and Python's `handle_error` hook ([`Ctx`]), and turning a caught panic into a message.
//!
//! It sits below the accept loop, the transports and the lifecycle, so that all three can use
//! it without importing each other.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::control::Control;
use crate::log_limit::limited;
use crate::{Addr, HandlerFailure, ServerHandle};

/// Python's `handle_error`, as a hook.
pub(crate) type ErrorHook = Box<dyn Fn(&Addr, &HandlerFailure) + Send + Sync>;

/// What a worker needs besides the service: the server handle and the error hook.
pub struct Ctx {
    pub(crate) handle: ServerHandle,
    pub(crate) handle_error: Option<ErrorHook>,
}

impl Ctx {
    pub(crate) fn control(&self) -> &Control {
        &self.handle.control
    }

    /// Python's `handle_error`: the hook if one is set, else a log line with the peer address.
    pub(crate) fn report(&self, peer: &Addr, stage: &str, failure: HandlerFailure) {
        self.report_as(peer, stage, failure, Severity::Failure)
    }

    /// [`report`](Self::report), with the default log line's level chosen by `severity`.
    pub(crate) fn report_as(
        &self,
        peer: &Addr,
        stage: &str,
        failure: HandlerFailure,
        severity: Severity,
    ) {
        match &self.handle_error {
            Some(hook) => {
                if let Err(p) = catch_unwind(AssertUnwindSafe(|| hook(peer, &failure))) {
                    limited!(
                        error,
                        "handle_error hook panicked ({}) on {stage}() {failure} from {peer}",
                        panic_message(&*p)
                    );
                }
            }
            None => match severity {
                Severity::Failure => {
                    limited!(error, "{stage}() failed for request from {peer}: {failure}")
                }
                Severity::Timeout => limited!(
                    info,
                    "{}; connection closed",
                    failure.describe_timeout(peer)
                ),
                Severity::AfterCut => limited!(
                    debug,
                    "{stage}() after the server cut the connection from {peer}: {failure}"
                ),
                Severity::PeerGone => {
                    limited!(debug, "{stage}(): {peer} went away mid-request: {failure}")
                }
            },
        }
    }
}

/// How bad a handler's failure is, for the default report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Severity {
    /// An error or a panic of the handler: logged as an error.
    Failure,
    /// A read or write timeout: the peer went quiet, logged at info.
    Timeout,
    /// Anything after the server cut the connection (already logged with its reason): debug.
    AfterCut,
    /// The client reset or hung up mid-request: debug.
    PeerGone,
}

/// The message of a caught panic, whatever its payload.
pub(crate) fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_owned()
    }
}
