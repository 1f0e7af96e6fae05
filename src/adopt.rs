//! Serving on an inherited listener: the one adoption path of systemd socket activation,
//! prefork workers and zero-downtime upgrades (see [`Inherited`]).

use std::os::fd::OwnedFd;

use crate::systemd::{Inherited, SocketKind};
use crate::transport::{Tcp, Udp, Unix, UnixDatagram};
use crate::{Builder, DatagramHandler, Handler, Result, Server};

/// Marks what `serve` built as sharing its listener with other processes.
fn adopted<T: crate::transport::Transport>(server: Result<Server<T>>) -> Result<Server<T>> {
    let server = server?;
    server.mark_adopted();
    Ok(server)
}

#[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
impl<H: Handler> Builder<Tcp<H>> {
    /// Serves on a listening TCP socket this process inherited (`LISTEN_FDS`: systemd socket
    /// activation, a prefork supervisor (`socketserver::prefork`), an upgrade). Fails with
    /// [`Error::is_not_inherited`](crate::Error::is_not_inherited) if there is no such socket
    /// and [`Error::is_wrong_socket_kind`](crate::Error::is_wrong_socket_kind) if it is not a
    /// listening TCP socket. Other processes may accept on the same socket, so a drain stops
    /// this server accepting without closing the socket for them.
    pub fn adopt(self, which: Inherited) -> Result<Server<Tcp<H>>> {
        let fd = which.take(SocketKind::Tcp)?;
        adopted(self.from_listener(fd.into()))
    }
}

#[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
impl<H: Handler> Builder<Unix<H>> {
    /// Serves on a listening Unix stream socket this process inherited; see
    /// [`Builder::adopt`](Builder#method.adopt) for TCP. The socket file belongs to whoever
    /// bound it and is never removed by this server.
    pub fn adopt(self, which: Inherited) -> Result<Server<Unix<H>>> {
        let fd = which.take(SocketKind::UnixStream)?;
        adopted(self.from_listener(OwnedFd::into(fd)))
    }
}

#[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
impl<H: DatagramHandler> Builder<Udp<H>> {
    /// Serves on a UDP socket this process inherited; see
    /// [`Builder::adopt`](Builder#method.adopt) for TCP.
    pub fn adopt(self, which: Inherited) -> Result<Server<Udp<H>>> {
        let fd = which.take(SocketKind::Udp)?;
        adopted(self.from_socket(fd.into()))
    }
}

#[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
impl<H: DatagramHandler> Builder<UnixDatagram<H>> {
    /// Serves on a Unix datagram socket this process inherited; its socket file is left alone.
    pub fn adopt(self, which: Inherited) -> Result<Server<UnixDatagram<H>>> {
        let fd = which.take(SocketKind::UnixDatagram)?;
        adopted(self.from_socket(fd.into()))
    }
}
