//! A cheaply cloneable handle to an accepted stream socket, TCP or Unix.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Addr;

/// An accepted connection: a TCP or Unix-domain stream socket.
///
/// Cloning is cheap (the clones share one socket, which is closed when the last one is dropped),
/// and both `Stream` and `&Stream` implement [`Read`] and [`Write`]. That is what lets a handler
/// hold a buffered reader and a buffered writer over one connection at the same time
/// ([`StreamRequest`](crate::StreamRequest)), and lets the server shut down the socket of a
/// connection that overstays a drain deadline or an idle timeout.
#[derive(Clone)]
pub struct Stream {
    inner: Arc<Inner>,
}

struct Inner {
    sock: Sock,
    /// Milliseconds since [`clock_base`] at the last read or write; 0 when not tracked.
    last_active: AtomicU64,
    track_activity: bool,
    /// Set once the server has shut this socket down (idle timeout), so it is counted once.
    cut: AtomicBool,
}

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// The peer process of a Unix-domain connection, as the kernel reports it (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// Process ID of the peer when it connected; 0 when the peer is in a PID namespace this
    /// process cannot see (a client outside the server's container, say).
    pub pid: i32,
    /// Effective user ID of the peer.
    pub uid: u32,
    /// Effective group ID of the peer.
    pub gid: u32,
}

/// `getsockopt(SO_PEERCRED)` into libc's `ucred`. (rustix's version stores the pid in a
/// `NonZeroI32`, which the kernel's pid 0 for a peer in another PID namespace would make
/// undefined behaviour.)
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<Credentials> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `fd` is borrowed, so it stays open for the call. `cred` is a live, aligned,
    // writable `ucred`, and `len` is its exact size: the kernel writes at most `len` bytes into
    // it and stores the length written in `len`. All three fields are plain integers, for which
    // every bit pattern is a valid value, so whatever the kernel writes is a valid `ucred`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Credentials {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds on a process-wide monotonic clock, never 0.
pub(crate) fn now_millis() -> u64 {
    Instant::now().duration_since(clock_base()).as_millis() as u64 + 1
}

impl Stream {
    fn new(sock: Sock, track_activity: bool) -> Stream {
        let last_active = if track_activity { now_millis() } else { 0 };
        Stream {
            inner: Arc::new(Inner {
                sock,
                last_active: AtomicU64::new(last_active),
                track_activity,
                cut: AtomicBool::new(false),
            }),
        }
    }

    pub(crate) fn tcp(s: TcpStream, track_activity: bool) -> Stream {
        Stream::new(Sock::Tcp(s), track_activity)
    }

    pub(crate) fn unix(s: UnixStream, track_activity: bool) -> Stream {
        Stream::new(Sock::Unix(s), track_activity)
    }

    /// The TCP socket, if this is a TCP connection. Reads and writes made on it directly do not
    /// count as activity for [`Builder::idle_timeout`](crate::Builder::idle_timeout); only those
    /// through the `Stream` do.
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match &self.inner.sock {
            Sock::Tcp(s) => Some(s),
            Sock::Unix(_) => None,
        }
    }

    /// The Unix-domain socket, if this is a Unix-domain connection. As with
    /// [`as_tcp`](Self::as_tcp), direct reads and writes do not count as activity for the idle
    /// timeout.
    pub fn as_unix(&self) -> Option<&UnixStream> {
        match &self.inner.sock {
            Sock::Unix(s) => Some(s),
            Sock::Tcp(_) => None,
        }
    }

    /// The address of the remote end.
    pub fn peer_addr(&self) -> io::Result<Addr> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.peer_addr().map(Addr::Inet),
            Sock::Unix(s) => s.peer_addr().map(|a| Addr::from_unix(&a)),
        }
    }

    /// The address of the local end.
    pub fn local_addr(&self) -> io::Result<Addr> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.local_addr().map(Addr::Inet),
            Sock::Unix(s) => s.local_addr().map(|a| Addr::from_unix(&a)),
        }
    }

    /// Sets how long a read may block (`SO_RCVTIMEO`); `None` blocks forever. A read that times
    /// out fails with `WouldBlock` or `TimedOut`.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets how long a write may block (`SO_SNDTIMEO`); `None` blocks forever.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// The current read timeout.
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.read_timeout(),
            Sock::Unix(s) => s.read_timeout(),
        }
    }

    /// Disables Nagle's algorithm (`TCP_NODELAY`) on TCP; Unix sockets have nothing to disable,
    /// so this succeeds without effect there.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.set_nodelay(nodelay),
            Sock::Unix(_) => Ok(()),
        }
    }

    /// Shuts down the read half, the write half or both. Every clone sees it: a read blocked in
    /// another thread returns end-of-file.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        }
    }

    /// The credentials of the peer process of a Unix-domain connection, where the OS provides
    /// them (Linux, Android); `None` for TCP.
    pub fn peer_credentials(&self) -> Option<Credentials> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Sock::Unix(s) = &self.inner.sock {
            return peer_cred(s.as_fd()).ok();
        }
        None
    }

    /// Milliseconds (on [`now_millis`]'s clock) of the last read or write, if tracked.
    pub(crate) fn last_active(&self) -> Option<u64> {
        self.inner
            .track_activity
            .then(|| self.inner.last_active.load(Ordering::Relaxed))
    }

    /// Marks the socket as cut by the server; true the first time only.
    pub(crate) fn mark_cut(&self) -> bool {
        !self.inner.cut.swap(true, Ordering::Relaxed)
    }

    #[inline]
    fn touch(&self) {
        if self.inner.track_activity {
            self.inner
                .last_active
                .store(now_millis(), Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Stream");
        if let Ok(a) = self.peer_addr() {
            d.field("peer", &a);
        }
        d.finish_non_exhaustive()
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match &self.inner.sock {
            Sock::Tcp(s) => (&*s).read(buf),
            Sock::Unix(s) => (&*s).read(buf),
        }?;
        self.touch();
        Ok(n)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let n = match &self.inner.sock {
            Sock::Tcp(s) => (&*s).read_vectored(bufs),
            Sock::Unix(s) => (&*s).read_vectored(bufs),
        }?;
        self.touch();
        Ok(n)
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &self.inner.sock {
            Sock::Tcp(s) => (&*s).write(buf),
            Sock::Unix(s) => (&*s).write(buf),
        }?;
        self.touch();
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = match &self.inner.sock {
            Sock::Tcp(s) => (&*s).write_vectored(bufs),
            Sock::Unix(s) => (&*s).write_vectored(bufs),
        }?;
        self.touch();
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
