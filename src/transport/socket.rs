//! Creating and binding listening sockets with the options Python's servers expose.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

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
    if let (Some(v6), SocketAddr::V6(_)) = (o.only_v6, addr) {
        sock.set_only_v6(v6).map_err(fail)?;
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
    let sock = Socket::new(Domain::UNIX, ty, None).map_err(fail)?;
    sock.bind(&SockAddr::unix(path).map_err(fail)?)
        .map_err(fail)?;
    let meta = std::fs::symlink_metadata(path).map_err(fail)?;
    let owned = OwnedPath {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if ty == Type::STREAM {
        sock.listen(o.backlog()).map_err(fail)?;
    }
    sock.set_nonblocking(true).map_err(fail)?;
    Ok((sock, owned))
}

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
    let probe = Socket::new(Domain::UNIX, ty, None)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Ok(()) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "a server is still listening on this socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("removing stale socket file {}", path.display());
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}
