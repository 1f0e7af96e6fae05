//! The accept loop's steps: take a connection under the limit, then the checks it passes
//! before dispatch (`verify_request`, `max_per_source`). The serving thread runs them in
//! `Server::serve_forever`; in event mode the workers run them too, when the listener is ready
//! in their epoll set (see `dispatch/event.rs`), so no thread hands connections over.

use std::io;
use std::os::fd::BorrowedFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;

use crate::Addr;
use crate::control::{Control, Permit};
use crate::dispatch::{Acceptor, Job, Taken};
use crate::log_limit::limited;
use crate::recorder::{Event, Refusal};
use crate::transport::{Incoming, Listener};
pub(crate) use crate::wait::Backoff;
use crate::wait::{Polled, poll_until};
use crate::worker::panic_message;

/// Python's `verify_request`.
pub(crate) type VerifyHook = Box<dyn Fn(&Addr) -> bool + Send + Sync>;

pub(crate) enum Next<R> {
    Request(R, Permit),
    Shutdown,
    Timeout,
}

pub(crate) enum Wake {
    Ready,
    Shutdown,
    Timeout,
}

/// Waits for `fd` (if given) to be readable, for a shutdown request, or for `deadline`.
pub(crate) fn wait(
    fd: Option<BorrowedFd<'_>>,
    control: &Control,
    deadline: Option<Instant>,
) -> Wake {
    let waker = PollFd::from_borrowed_fd(control.shutdown.waker_fd(), PollFlags::IN);
    let mut fds = match fd {
        Some(fd) => vec![waker, PollFd::from_borrowed_fd(fd, PollFlags::IN)],
        None => vec![waker],
    };
    match poll_until(&mut fds, deadline) {
        Ok(Polled::TimedOut) => Wake::Timeout,
        Ok(Polled::Ready) if !fds[0].revents().is_empty() => Wake::Shutdown,
        Ok(Polled::Ready) => Wake::Ready,
        Err(e) => {
            log::error!("poll failed: {e}; retrying");
            thread::sleep(Backoff::FIRST);
            Wake::Ready
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::Interrupted
    ) {
        return true;
    }
    // accept(2) on Linux: pending network errors are passed on by accept; treat them as EAGAIN.
    let errno = Errno::from_io_error(e);
    [
        Errno::PROTO,
        Errno::NETDOWN,
        Errno::NOPROTOOPT,
        Errno::HOSTDOWN,
        Errno::HOSTUNREACH,
        Errno::OPNOTSUPP,
        Errno::NETUNREACH,
        Errno::TIMEDOUT,
    ]
    .iter()
    .any(|t| errno == Some(*t))
}

/// A listener and what a connection must pass before dispatch.
pub(crate) struct AcceptLoop<L> {
    pub(crate) listener: L,
    pub(crate) control: Arc<Control>,
    pub(crate) verify_request: Option<VerifyHook>,
    /// Admission finds the client (PROXY header) and counts it under `max_per_source`.
    pub(crate) learns_client: bool,
    pub(crate) reject_when_full: bool,
}

impl<L: Listener> AcceptLoop<L> {
    /// Waits for a free slot, then for a request. `Timeout` when `deadline` passes first.
    pub(crate) fn next(
        &self,
        deadline: Option<Instant>,
        backoff: &mut Backoff,
    ) -> Next<L::Request> {
        let control = &self.control;
        let permit = if self.reject_when_full {
            None
        } else {
            match control.acquire(deadline) {
                Some(p) => Some(p),
                None if control.shutdown.requested() => return Next::Shutdown,
                None => return Next::Timeout,
            }
        };
        loop {
            if control.shutdown.requested() {
                return Next::Shutdown;
            }
            let err = match self.listener.accept(control) {
                Ok(req) => {
                    backoff.reset();
                    self.accepted(&req);
                    let permit = match permit {
                        Some(p) => p,
                        None => match control.limits.try_acquire() {
                            Some(p) => p,
                            None => {
                                control.record(Event::Refused(Refusal::Limit));
                                log::debug!("connection limit reached: closing {}", req.peer());
                                req.reject();
                                continue;
                            }
                        },
                    };
                    return Next::Request(req, permit);
                }
                // A drain shut the listener down after asking us to stop: not a failure.
                Err(_) if control.shutdown.requested() => return Next::Shutdown,
                Err(e) => e,
            };
            let pause = match err.kind() {
                io::ErrorKind::WouldBlock => None,
                io::ErrorKind::Interrupted => continue,
                _ if is_transient(&err) => {
                    self.skipped(&err);
                    continue;
                }
                _ => Some(Instant::now() + self.failed(&err, backoff)),
            };
            let (fd, until) = match pause {
                // Out of descriptors, the listener stays readable: wait on the waker only.
                Some(p) => (None, Some(deadline.map_or(p, |d| d.min(p)))),
                None => (Some(self.listener.fd()), deadline),
            };
            match wait(fd, control, until) {
                Wake::Shutdown => return Next::Shutdown,
                Wake::Timeout if deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Next::Timeout;
                }
                Wake::Timeout | Wake::Ready => {}
            }
        }
    }

    /// An accept error that retrying at once cannot fix: counted and logged; how long to wait
    /// before the next try.
    fn failed(&self, err: &io::Error, backoff: &mut Backoff) -> Duration {
        let control = &self.control;
        control.record(Event::AcceptError);
        let delay = backoff.next();
        if backoff.failures() == 1 {
            log::warn!(
                "accept on {} failed: {err}; retrying with backoff",
                control.local_addr
            );
        } else {
            log::debug!("accept failed again: {err}; next try in {delay:?}");
        }
        delay
    }

    fn accepted(&self, req: &L::Request) {
        self.control.record(Event::Accepted {
            peer: Some(req.peer()),
        });
    }

    fn skipped(&self, err: &io::Error) {
        self.control.record(Event::AcceptError);
        log::debug!("accept on {}: {err}; skipped", self.control.local_addr);
    }

    /// `verify_request` and `max_per_source`: the request with its ticket, or `None` when it
    /// was refused (counted, logged and closed).
    pub(crate) fn admit(&self, req: L::Request, permit: Permit) -> Option<Job<L::Request>> {
        let control = &self.control;
        if let Some(verify) = &self.verify_request {
            let ok = catch_unwind(AssertUnwindSafe(|| verify(req.peer()))).unwrap_or_else(|p| {
                log::error!("verify_request hook panicked: {}", panic_message(&*p));
                false
            });
            if !ok {
                control.record(Event::Refused(Refusal::Verify));
                log::debug!("verify_request rejected {}", req.peer());
                req.reject();
                return None;
            }
        }
        // Connections count against max_per_source by IP address; datagrams do not.
        let source = req
            .stream()
            .and(req.peer().inet())
            .filter(|_| !self.learns_client)
            .map(|a| a.ip().to_canonical());
        let Some(ticket) = control.register(req.stream().cloned(), source) else {
            control.record(Event::Refused(Refusal::PerSource));
            limited!(
                warn,
                "{} already has {} connections open (max_per_source): closing {}",
                source.map_or_else(String::new, |ip| ip.to_string()),
                control.limits.max_per_source().unwrap_or_default(),
                req.peer()
            );
            req.reject();
            return None;
        };
        Some((req, permit, ticket))
    }
}

impl<L: Listener> Acceptor<L::Request> for AcceptLoop<L> {
    fn fd(&self) -> BorrowedFd<'_> {
        self.listener.fd()
    }

    fn try_next(&self, permit: Permit) -> Taken<Job<L::Request>> {
        let control = &self.control;
        if control.shutdown.requested() {
            return Taken::Stop;
        }
        match self.listener.accept(control) {
            Ok(req) => {
                self.accepted(&req);
                match self.admit(req, permit) {
                    Some(job) => Taken::Job(job),
                    None => Taken::Refused,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Taken::Empty,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Taken::Refused,
            // A drain shut the listener down after asking the loops to stop: the end.
            Err(_) if control.shutdown.requested() => Taken::Stop,
            Err(e) if is_transient(&e) => {
                self.skipped(&e);
                Taken::Refused
            }
            // Out of descriptors, say: the listener stays readable, so wait before the next try.
            Err(e) => Taken::Failed(e),
        }
    }

    fn failed(&self, err: &io::Error, backoff: &mut Backoff) -> Duration {
        AcceptLoop::failed(self, err, backoff)
    }
}
