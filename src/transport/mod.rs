//! What differs between TCP, Unix-stream, UDP and Unix-datagram servers: how a request arrives
//! (the [`Listener`]) and how it is served (the [`Service`]). Everything else, the accept loop,
//! dispatch, shutdown and hooks, is the shared core in `server.rs`.

use std::io;
use std::marker::PhantomData;
use std::os::fd::BorrowedFd;

use crate::control::Control;
use crate::worker::Ctx;
use crate::{Addr, Stream};

pub(crate) mod datagram;
pub(crate) mod socket;
pub(crate) mod stream;

/// Where requests come from: a listening socket (one request per accepted connection) or a
/// datagram socket (one request per datagram). Internal: named by [`Transport`], implemented
/// only here.
#[doc(hidden)]
pub trait Listener: Send + Sync + 'static {
    /// One unit of work for a handler.
    type Request: Incoming;

    /// Whether its requests are connections (stream sockets) rather than datagrams.
    const STREAMS: bool;

    /// Takes the next request without blocking (`WouldBlock` when there is none).
    fn accept(&self, control: &Control) -> io::Result<Self::Request>;

    /// The descriptor to poll for readability.
    fn fd(&self) -> BorrowedFd<'_>;

    /// The bound address.
    fn local_addr(&self) -> Addr;
}

/// A request on its way from the acceptor to a worker. Internal.
#[doc(hidden)]
pub trait Incoming: Send + 'static {
    /// The client's address.
    fn peer(&self) -> &Addr;

    /// The connection's socket, for requests that have one (so a drain can cut it).
    fn stream(&self) -> Option<&Stream> {
        None
    }

    /// Drops the request without serving it (Python's `shutdown_request`).
    fn reject(self);
}

/// Serves one request on a worker thread: authentication, handler lifecycle, reply, close.
/// Internal.
#[doc(hidden)]
pub trait Service: Send + Sync + 'static {
    /// The request type it serves.
    type Request: Incoming;

    /// What an event-mode connection keeps between its messages.
    type Session: Send + 'static;

    /// Serves `req` to completion. Never panics: handler panics are caught and reported.
    fn serve(&self, req: Self::Request, ctx: &Ctx);

    /// Checks the configuration and readies the service once the dispatch limit is known
    /// (`parks`: for event mode ([`Builder::event`](crate::Builder::event)), whose connections wait for
    /// their messages on no thread).
    fn prepare(&mut self, limit: Option<usize>, parks: bool) -> crate::Result<()> {
        let _ = (limit, parks);
        Ok(())
    }

    /// Whether admission finds out who the client is (a PROXY header): the accept loop then
    /// counts nobody against `max_per_source` and leaves `verify_request` to admission.
    fn learns_client(&self) -> bool {
        false
    }

    /// Takes the `verify_request` hook to run it in admission, once the client is known;
    /// hands it back if the accept loop should run it (the default).
    fn take_verify(
        &mut self,
        hook: crate::admission::VerifyHook,
    ) -> Option<crate::admission::VerifyHook> {
        Some(hook)
    }

    /// Event mode: the session of a new connection, before any I/O; `None` for a request that
    /// cannot be served this way.
    fn session(&self, req: Self::Request, ctx: &Ctx) -> Option<Self::Session>;

    /// Event mode: the connection of `session` has input (or hung up): serves what it can
    /// without waiting for the peer. Never panics.
    fn resume(&self, session: &mut Self::Session, ctx: &Ctx) -> Step;

    /// Event mode: ends the connection (the handler's `finish`, if it was set up, then the
    /// close).
    fn end(&self, session: Self::Session, ctx: &Ctx);

    /// Event mode: called every few milliseconds; expires what waits on a deadline.
    fn tick(&self, ctx: &Ctx) {
        let _ = ctx;
    }
}

/// What an event-mode connection does after [`Service::resume`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Wait, parked, for more input.
    Park,
    /// Close it ([`Service::end`]).
    Close,
}

mod sealed {
    pub trait Sealed {}
}

/// A kind of server: which socket it listens on and which handler trait serves its requests.
///
/// Sealed: the implementations are [`Tcp`], [`Unix`], [`Udp`] and [`UnixDatagram`], which name the
/// server types [`TcpServer`](crate::TcpServer), [`UnixStreamServer`](crate::UnixStreamServer),
/// [`UdpServer`](crate::UdpServer) and [`UnixDatagramServer`](crate::UnixDatagramServer).
pub trait Transport: sealed::Sealed + Send + Sync + Sized + 'static {
    /// The listening socket.
    type Listener: Listener;
    /// What serves each request.
    type Service: Service<Request = <Self::Listener as Listener>::Request>;
}

/// Marks a transport whose requests are connections (TCP, Unix streams): these take
/// [`Handler`](crate::Handler)s, authentication and per-connection timeouts.
pub trait StreamTransport: Transport<Service = stream::StreamService<Self::Handler>> {
    /// The handler type serving each connection.
    type Handler: crate::Handler;
}

/// Marks a transport whose requests are datagrams (UDP, Unix datagrams): these take
/// [`DatagramHandler`](crate::DatagramHandler)s.
pub trait DatagramTransport: Transport<Service = datagram::DatagramService<Self::Handler>> {
    /// The handler type serving each datagram.
    type Handler: crate::DatagramHandler;
}

/// Marks a transport over IP (TCP, UDP): these have the IP socket options,
/// [`reuse_address`](crate::Builder::reuse_address), [`reuse_port`](crate::Builder::reuse_port)
/// and [`only_v6`](crate::Builder::only_v6).
///
/// Sealed: implemented by [`Tcp`] and [`Udp`] only.
pub trait InetTransport: Transport + sealed::Sealed {}

/// Marks a Unix-domain transport (Unix streams, Unix datagrams): these bind a socket file, and
/// have [`socket_mode`](crate::Builder::socket_mode) and
/// [`replace_stale`](crate::Builder::replace_stale).
///
/// Sealed: implemented by [`Unix`] and [`UnixDatagram`] only.
pub trait UnixTransport: Transport + sealed::Sealed {}

macro_rules! transport {
    ($(#[$doc:meta])* $name:ident, $listener:ty, $service:ident, $bound:path, $kind:ident,
     $family:ident) => {
        $(#[$doc])*
        pub struct $name<H>(PhantomData<fn() -> H>);
        impl<H> sealed::Sealed for $name<H> {}
        impl<H: $bound> Transport for $name<H> {
            type Listener = $listener;
            type Service = $service<H>;
        }
        impl<H: $bound> $kind for $name<H> {
            type Handler = H;
        }
        impl<H: $bound> $family for $name<H> {}
    };
}

use datagram::DatagramService;
use stream::StreamService;

transport!(
    /// TCP over IPv4 or IPv6: [`TcpServer`](crate::TcpServer).
    Tcp, stream::TcpAcceptor, StreamService, crate::Handler, StreamTransport, InetTransport
);
transport!(
    /// Unix-domain stream sockets: [`UnixStreamServer`](crate::UnixStreamServer).
    Unix, stream::UnixAcceptor, StreamService, crate::Handler, StreamTransport, UnixTransport
);
transport!(
    /// UDP over IPv4 or IPv6: [`UdpServer`](crate::UdpServer).
    Udp, datagram::DatagramSocket, DatagramService, crate::DatagramHandler, DatagramTransport,
    InetTransport
);
transport!(
    /// Unix-domain datagram sockets: [`UnixDatagramServer`](crate::UnixDatagramServer).
    UnixDatagram, datagram::DatagramSocket, DatagramService, crate::DatagramHandler,
    DatagramTransport, UnixTransport
);
