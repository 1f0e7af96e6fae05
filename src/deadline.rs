//! Reads and writes bounded by one deadline for a whole handshake, so a client that trickles a
//! byte at a time cannot stretch it.
//!
//! Each call first tries the socket without blocking and waits with `poll` only when it would
//! block: an answer that is already there costs one system call, and the socket's own timeouts
//! are never touched (setting and clearing them cost four calls per connection).

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};

use crate::wait::{Polled, deadline_after, poll_until};

/// The flags of a send that must not wait. On Linux it also must not raise SIGPIPE when the peer
/// has gone (`MSG_NOSIGNAL`); other systems lack the flag, and there a Rust program ignores
/// SIGPIPE anyway (std's runtime sets it so before `main`), so the send fails with EPIPE.
#[cfg(target_os = "linux")]
pub(crate) const SEND_NOW: SendFlags = SendFlags::DONTWAIT.union(SendFlags::NOSIGNAL);
/// The flags of a send that must not wait (see the Linux version).
#[cfg(not(target_os = "linux"))]
pub(crate) const SEND_NOW: SendFlags = SendFlags::DONTWAIT;

/// Wraps a stream socket so that reads and writes fail with `TimedOut` once `deadline` passes.
pub(crate) struct DeadlineIo<'a, S> {
    sock: &'a S,
    /// `None`: a timeout too large to represent, i.e. none.
    deadline: Option<Instant>,
    /// We wrote since the last read: the peer must answer before there is anything to read,
    /// so the next read waits first instead of trying a read that would fail with EAGAIN.
    awaiting_answer: bool,
    /// The connection's TLS session, when a TLS handshake ran before: reads and writes then go
    /// through it, on this socket and under this deadline.
    #[cfg(feature = "tls")]
    tls: Option<&'a crate::tls::session::Session>,
    /// Reads under TLS fail with `WouldBlock` rather than wait (event mode, where the event
    /// loop does the waiting).
    #[cfg(feature = "tls")]
    reads_now: bool,
}

impl<'a, S: AsFd> DeadlineIo<'a, S> {
    pub(crate) fn new(sock: &'a S, timeout: Duration) -> DeadlineIo<'a, S> {
        DeadlineIo::until(sock, deadline_after(timeout))
    }

    /// Bounded by `deadline` (`None`: no deadline).
    pub(crate) fn until(sock: &'a S, deadline: Option<Instant>) -> DeadlineIo<'a, S> {
        DeadlineIo {
            sock,
            deadline,
            awaiting_answer: false,
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "tls")]
            reads_now: false,
        }
    }

    /// Reads of ciphertext that do not wait: `WouldBlock` when the socket has nothing.
    #[cfg(feature = "tls")]
    pub(crate) fn reads_now(mut self) -> Self {
        self.reads_now = true;
        self
    }

    /// Reads and writes through `tls`, if there is a session.
    #[cfg(feature = "tls")]
    pub(crate) fn with_tls(mut self, tls: Option<&'a crate::tls::session::Session>) -> Self {
        self.tls = tls;
        self
    }

    /// Waits until the socket is ready for `flags`, or fails once the deadline passes.
    fn wait(&self, flags: PollFlags) -> io::Result<()> {
        let mut fds = [PollFd::new(self.sock, flags)];
        match poll_until(&mut fds, self.deadline)? {
            Polled::Ready => Ok(()),
            Polled::TimedOut => Err(timed_out()),
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "handshake deadline passed")
}

impl<S: AsFd> DeadlineIo<'_, S> {
    /// Copies into `buf` what has already arrived, without consuming it or waiting; 0 when
    /// nothing has (or on any error: the caller only wants a look). Always 0 under TLS, where
    /// what has arrived is ciphertext.
    pub(crate) fn peek_ready(&self, buf: &mut [u8]) -> usize {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return 0;
        }
        rustix::net::recv(self.sock, buf, RecvFlags::DONTWAIT | RecvFlags::PEEK)
            .map_or(0, |(n, _)| n)
    }
}

impl<S: AsFd> DeadlineIo<'_, S> {
    /// Copies into `buf` what has arrived without consuming it, waiting (until the deadline)
    /// if nothing has; 0 at end of file.
    #[cfg_attr(not(feature = "proxy-protocol"), allow(dead_code))]
    pub(crate) fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match rustix::net::recv(self.sock, &mut *buf, RecvFlags::DONTWAIT | RecvFlags::PEEK) {
                Ok((n, _)) => return Ok(n),
                Err(Errno::AGAIN) => self.wait(PollFlags::IN)?,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl<S: AsFd> Read for DeadlineIo<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(t) = self.tls {
            return t.read(&*self, buf);
        }
        if std::mem::take(&mut self.awaiting_answer) {
            self.wait(PollFlags::IN)?;
        }
        loop {
            match rustix::net::recv(self.sock, &mut *buf, RecvFlags::DONTWAIT) {
                Ok((n, _)) => return Ok(n),
                Err(Errno::AGAIN) => self.wait(PollFlags::IN)?,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl<S: AsFd> Write for DeadlineIo<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(t) = self.tls {
            self.awaiting_answer = true;
            return t.write(&*self, buf);
        }
        loop {
            match rustix::net::send(self.sock, buf, SEND_NOW) {
                Ok(n) => {
                    self.awaiting_answer = true;
                    return Ok(n);
                }
                Err(Errno::AGAIN) => self.wait(PollFlags::OUT)?,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The socket under a TLS session during admission: each call bounded by the deadline.
#[cfg(feature = "tls")]
impl<S: AsFd> crate::tls::session::Raw for DeadlineIo<'_, S> {
    fn read_raw(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        loop {
            let spare = rustix::buffer::spare_capacity(&mut *buf);
            match rustix::net::recv(self.sock, spare, RecvFlags::DONTWAIT) {
                Ok((n, _)) => return Ok(n),
                Err(Errno::AGAIN) if self.reads_now => return Err(Errno::AGAIN.into()),
                Err(Errno::AGAIN) => self.wait(PollFlags::IN)?,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn write_raw(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match rustix::net::send(self.sock, buf, SEND_NOW) {
                Ok(n) => return Ok(n),
                Err(Errno::AGAIN) => self.wait(PollFlags::OUT)?,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
