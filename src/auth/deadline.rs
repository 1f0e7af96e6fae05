//! Reads and writes bounded by one deadline for a whole handshake, so a client that trickles a
//! byte at a time cannot stretch it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::Stream;

/// A socket whose per-call timeouts can be set.
pub(crate) trait Timeouts {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

macro_rules! timeouts {
    ($($t:ty),*) => {$(
        impl Timeouts for $t {
            fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                <$t>::set_read_timeout(self, t)
            }
            fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                <$t>::set_write_timeout(self, t)
            }
        }
    )*};
}

timeouts!(Stream, TcpStream, UnixStream);

/// Wraps a socket so that every read and write fails with `TimedOut` once `deadline` passes.
pub(crate) struct DeadlineIo<'a, S> {
    sock: &'a S,
    deadline: Instant,
}

impl<'a, S: Timeouts> DeadlineIo<'a, S>
where
    &'a S: Read + Write,
{
    pub(crate) fn new(sock: &'a S, timeout: Duration) -> DeadlineIo<'a, S> {
        DeadlineIo {
            sock,
            deadline: Instant::now() + timeout,
        }
    }

    fn left(&self) -> io::Result<Duration> {
        match self.deadline.checked_duration_since(Instant::now()) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            )),
        }
    }

    /// Clears the timeouts this wrapper set, leaving the socket blocking without limit.
    pub(crate) fn finish(self) -> io::Result<()> {
        self.sock.set_read_timeout(None)?;
        self.sock.set_write_timeout(None)
    }
}

fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "handshake deadline passed")
    } else {
        e
    }
}

impl<'a, S: Timeouts> Read for DeadlineIo<'a, S>
where
    &'a S: Read + Write,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.set_read_timeout(Some(self.left()?))?;
        let mut s = self.sock;
        s.read(buf).map_err(timed_out)
    }
}

impl<'a, S: Timeouts> Write for DeadlineIo<'a, S>
where
    &'a S: Read + Write,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.set_write_timeout(Some(self.left()?))?;
        let mut s = self.sock;
        s.write(buf).map_err(timed_out)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
