//! Creating and binding listening sockets with the options Python's servers expose.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::wait::{Polled, deadline_after, poll_until};
use crate::{Addr, Error, Result};

/// Socket options applied before `bind`.
#[derive(Clone, Debug, Default)]
pub(crate) struct SocketOptions {
    /// `None`: on for streams (as std does), off for datagrams (two UDP sockets with
    /// SO_REUSEADDR may bind the same port and split its traffic).
    pub reuse_address: Option<bool>,
    pub reuse_port: bool,
    pub only_v6: Option<bool>,
    /// `None`: the system maximum.
    pub backlog: Option<u32>,
    pub replace_stale: bool,
    /// Permission bits of a Unix socket file; `None`: what the umask gives.
    pub mode: Option<u32>,
}

impl SocketOptions {
    /// The backlog handed to `listen`. Linux and the BSDs clamp it to `somaxconn`, so asking for
    /// the largest value gets the system maximum (Python used 5 until 3.14).
    fn backlog(&self) -> i32 {
        self.backlog
            .map_or(i32::MAX, |b| b.min(i32::MAX as u32) as i32)
    }
}

/// Binds an IP socket of type `ty`; for streams also listens. On any error the socket is dropped
/// (closed) before returning, so a failed bind leaks no descriptor.
pub(crate) fn bind_inet(addr: SocketAddr, ty: Type, o: &SocketOptions) -> Result<Socket> {
    let at = Addr::Inet(addr);
    let fail = |e: io::Error| Error::bind(Some(&at), e);
    let sock = Socket::new(Domain::for_address(addr), ty, None).map_err(fail)?;
    if o.reuse_address.unwrap_or(ty == Type::STREAM) {
        sock.set_reuse_address(true).map_err(fail)?;
    }
    if o.reuse_port {
        sock.set_reuse_port(true).map_err(fail)?;
    }
    // Dual-stack unless told otherwise, whatever the system default (`bindv6only`): binding
    // `[::]` serves IPv4 clients too, as Go and Python's `create_server(dualstack_ipv6=True)`.
    if let SocketAddr::V6(_) = addr {
        sock.set_only_v6(o.only_v6.unwrap_or(false)).map_err(fail)?;
    }
    sock.bind(&addr.into()).map_err(fail)?;
    if ty == Type::STREAM {
        sock.listen(o.backlog()).map_err(fail)?;
    }
    sock.set_nonblocking(true).map_err(fail)?;
    Ok(sock)
}

/// The identity of a socket file we created, so that on close we unlink only our own file and
/// never a newer server's.
#[derive(Debug)]
pub(crate) struct OwnedPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl OwnedPath {
    /// Takes over the socket file at `path` as it is now: a prefork supervisor that an upgrade
    /// handed the socket to removes its file when it exits, as the one that bound it would have.
    #[cfg(feature = "signals")]
    pub(crate) fn take_over(path: &Path) -> io::Result<OwnedPath> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(OwnedPath {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Drop for OwnedPath {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.dev() == self.dev
            && m.ino() == self.ino
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            log::warn!("cannot remove socket file {}: {e}", self.path.display());
        }
    }
}

/// Binds a Unix-domain socket of type `ty` on `path`; for streams also listens. With
/// `replace_stale`, a socket file that nothing listens on any more (left by a crashed run) is
/// removed first; a live one is never touched.
pub(crate) fn bind_unix(path: &Path, ty: Type, o: &SocketOptions) -> Result<(Socket, OwnedPath)> {
    let at = Addr::Unix(Some(path.to_path_buf()));
    let fail = |e: io::Error| Error::bind(Some(&at), e);
    if o.replace_stale {
        remove_stale(path, ty).map_err(fail)?;
    }
    if let Some(mode) = o.mode
        && mode & !0o7777 != 0
    {
        return Err(Error::config(format!(
            "socket mode {mode:#o} for {at} has bits beyond 0o7777"
        )));
    }
    let sock = Socket::new(Domain::UNIX, ty, None).map_err(fail)?;
    if let Some(mode) = o.mode {
        // Linux creates the file with the socket's own mode (less the umask): set it first, so
        // that the file is never, even for an instant, more open than asked. (Where fchmod on
        // a socket fails or is ignored, the chmod below still sets the mode before `listen`.)
        // (`as _`: the raw mode is u16 on some systems; `mode` was checked to fit 0o7777.)
        let _ = rustix::fs::fchmod(&sock, rustix::fs::Mode::from_raw_mode(mode as _));
    }
    sock.bind(&SockAddr::unix(path).map_err(fail)?)
        .map_err(fail)?;
    let meta = std::fs::symlink_metadata(path).map_err(fail)?;
    let owned = OwnedPath {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if let Some(mode) = o.mode {
        // Exactly `mode`, whatever the umask took away; before `listen`, so no client
        // connects in between. (On error, `owned` removes the file.)
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    }
    if ty == Type::STREAM {
        sock.listen(o.backlog()).map_err(fail)?;
    }
    sock.set_nonblocking(true).map_err(fail)?;
    Ok((sock, owned))
}

/// How long the stale-socket probe waits for its connection to be accepted or refused. Linux
/// answers at once, even for a full backlog; other systems may take a moment.
const STALE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

fn remove_stale(path: &Path, ty: Type) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "path exists and is not a socket; not replacing it",
        ));
    }
    // Never a blocking connect: a live server whose backlog is full would hold it forever.
    let probe = Socket::new(Domain::UNIX, ty, None)?;
    probe.set_nonblocking(true)?;
    let live = |why: &str| {
        io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("a server is still listening on this socket{why}"),
        )
    };
    let mut connected = probe.connect(&SockAddr::unix(path)?);
    if let Err(e) = &connected
        && e.raw_os_error() == Some(libc::EINPROGRESS)
    {
        // Not Linux (which answers at once): wait for the verdict, a while.
        let mut fds = [PollFd::new(&probe, PollFlags::OUT)];
        if poll_until(&mut fds, deadline_after(STALE_PROBE_TIMEOUT))? == Polled::TimedOut {
            // Neither accepted nor refused in time: it may be alive, so it is left alone.
            return Err(live(" (or did not answer in time)"));
        }
        connected = match probe.take_error()? {
            None => Ok(()),
            Some(e) => Err(e),
        };
    }
    match connected {
        Ok(()) => Err(live("")),
        // Linux answers a full backlog with EAGAIN: alive, only busy.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(live(" (its backlog is full)")),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!(
                "removing stale socket file {}",
                Addr::Unix(Some(path.into()))
            );
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

/// How many connections wait in a TCP listener's accept queue (`TCP_INFO`'s `tcpi_unacked`,
/// which for a listening socket is the queue's length, as `ss -lt` shows in Recv-Q). `None`
/// where it cannot be told: a Unix-domain listener, or a system without Linux's `TCP_INFO`.
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[allow(unsafe_code)]
pub(crate) fn accept_queue_len(fd: std::os::fd::BorrowedFd<'_>) -> Option<u32> {
    use std::os::fd::AsRawFd;
    // `struct tcp_info` of the kernel's uapi: eight one-byte fields, then `tcpi_rto`,
    // `tcpi_ato`, `tcpi_snd_mss`, `tcpi_rcv_mss`, `tcpi_unacked` as u32s (offset 24, index 6).
    // The kernel writes as much as it has and no more than `len`; 64 words hold any version.
    let mut info = [0u32; 64];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `fd` is borrowed, so it stays open for the call. `info` is a live, aligned,
    // writable buffer of exactly `len` bytes: the kernel writes at most `len` bytes into it and
    // stores the length written in `len`. It holds plain integers, for which every bit pattern
    // is a valid value, so whatever the kernel writes leaves it valid.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize >= 7 * 4).then_some(info[6])
}

/// Without Linux's `TCP_INFO` the queue's length cannot be told.
#[cfg(not(all(target_os = "linux", not(socketserver_portable))))]
pub(crate) fn accept_queue_len(_fd: std::os::fd::BorrowedFd<'_>) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn a_socket_file_is_created_with_the_sockets_own_mode() {
        // What bind_unix relies on to leave no moment with a wider mode: on Linux, bind creates
        // the file with the mode set on the socket beforehand (less the umask).
        let path = std::env::temp_dir().join(format!("ss-fchmod-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        rustix::fs::fchmod(&sock, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
        sock.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    #[test]
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    fn the_accept_queue_length_counts_connections_not_yet_accepted() {
        use std::os::fd::AsFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(accept_queue_len(listener.as_fd()), Some(0));
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        assert_eq!(accept_queue_len(listener.as_fd()), Some(3));
        drop(listener.accept().unwrap());
        assert_eq!(accept_queue_len(listener.as_fd()), Some(2));
        // Not a TCP socket: unknown, not zero.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(accept_queue_len(a.as_fd()), None);
        drop(clients);
    }
}
