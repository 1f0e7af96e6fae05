//! The server core shared by every transport: the accept loop, dispatch (sync, a thread per
//! request, a worker pool), shutdown, the Python hooks, and closing.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::accept::{AcceptLoop, Backoff, Next, VerifyHook, wait};
use crate::control::{Control, Permit, lock};
use crate::dispatch::{Acceptor, Dispatch, Dispatcher, Run, Shared};
use crate::log_limit::limited;
use crate::recorder::{Event, Refusal};
use crate::stream::{ActivityLimits, Cut};
use crate::transport::socket::{SocketOptions, accept_queue_len};
use crate::transport::{
    Incoming, InetTransport, Listener, Service, StreamTransport, Tcp, Transport, UnixTransport,
};
use crate::wait::{Polled, deadline_after, poll_until};
use crate::worker::{Ctx, ErrorHook, panic_message};
use crate::{Addr, Handler, HandlerFailure, ServerHandle};
use rustix::event::{PollFd, PollFlags};

type ActionHook = Box<dyn Fn() + Send + Sync>;

/// Settings every server kind shares.
struct Common {
    dispatch: Run,
    block_on_close: bool,
    max_connections: Option<usize>,
    max_per_source: Option<usize>,
    reject_when_full: bool,
    poll_interval: Duration,
    stack_size: Option<usize>,
    activity: ActivityLimits,
    verify_request: Option<VerifyHook>,
    service_actions: Option<ActionHook>,
    handle_timeout: Option<ActionHook>,
    handle_error: Option<ErrorHook>,
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    sd_notify: bool,
}

/// Configures a server before it binds. Made by `TcpServer::builder(factory)` and its siblings;
/// finished by the transport's `bind` (or `from_listener` / `from_socket`).
///
/// ```no_run
/// use socketserver::{Dispatch, Handler, HandlerResult, Request, TcpServer};
/// # struct Echo;
/// # impl Handler for Echo { fn handle(&mut self, _: &mut Request) -> HandlerResult { Ok(()) } }
///
/// let server = TcpServer::builder(|| Echo)
///     .dispatch(Dispatch::Pool { workers: 16 })
///     .verify_request(|peer| peer.inet().is_some_and(|a| a.ip().is_loopback()))
///     .bind("127.0.0.1:9000")?;
/// server.serve_forever();
/// # Ok::<(), socketserver::Error>(())
/// ```
pub struct Builder<T: Transport> {
    pub(crate) service: T::Service,
    pub(crate) socket: SocketOptions,
    common: Common,
}

impl<T: Transport> Builder<T> {
    pub(crate) fn with_service(service: T::Service) -> Self {
        Builder {
            service,
            socket: SocketOptions::default(),
            common: Common {
                dispatch: Dispatch::default().into(),
                block_on_close: true,
                max_connections: None,
                max_per_source: None,
                reject_when_full: false,
                poll_interval: Duration::from_millis(500),
                stack_size: None,
                activity: ActivityLimits::default(),
                verify_request: None,
                service_actions: None,
                handle_timeout: None,
                handle_error: None,
                #[cfg(all(target_os = "linux", not(socketserver_portable)))]
                sd_notify: false,
            },
        }
    }

    /// How requests run: [`Dispatch::Sync`] (the default of datagram servers),
    /// [`Dispatch::Thread`] (the default of stream servers) or [`Dispatch::Pool`].
    pub fn dispatch(mut self, dispatch: Dispatch) -> Self {
        self.common.dispatch = dispatch.into();
        self
    }

    /// Event mode, set by the stream builders of message handlers.
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    pub(crate) fn run_events(mut self, workers: usize) -> Self {
        self.common.dispatch = Run::Event { workers };
        self
    }

    /// Whether closing (or dropping) the server waits for in-flight requests (Python's
    /// `block_on_close`, default true). False is Python's `daemon_threads = True`: close returns
    /// at once and the requests finish on their own.
    pub fn block_on_close(mut self, block: bool) -> Self {
        self.common.block_on_close = block;
        self
    }

    /// Caps concurrent requests in [`Dispatch::Thread`] mode. At the cap the server stops
    /// accepting (the excess waits in the kernel backlog), unless
    /// [`reject_when_full`](Self::reject_when_full) is set. Pool mode is capped by its workers.
    ///
    /// Default: what the system lets this process have, with headroom: the fewest of the
    /// connections its descriptor limit (`RLIMIT_NOFILE`) allows, and of the threads its
    /// memory-map limit (`vm.max_map_count`, four mappings per thread) and task limits
    /// (`kernel.pid_max`, `kernel.threads-max`, `RLIMIT_NPROC`) allow. Without a cap, a crowd of
    /// idle clients would spawn threads until spawning fails and connections are dropped. The
    /// server logs the value and its reason when it starts;
    /// [`ServerHandle::max_connections`](crate::ServerHandle::max_connections) reports it.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.common.max_connections = Some(max);
        self
    }

    /// At the connection cap, accept and close new connections at once (counted in
    /// [`Stats::limit_rejected`](crate::Stats::limit_rejected)) instead of leaving them in the
    /// backlog. Sheds load quickly when clients can retry elsewhere. Thread mode only: a pool
    /// always leaves the excess in the backlog.
    pub fn reject_when_full(mut self, reject: bool) -> Self {
        self.common.reject_when_full = reject;
        self
    }

    /// How often `serve_forever` calls the `service_actions` hook when idle (Python's
    /// `poll_interval`, default 0.5 s). Without that hook the loop never wakes needlessly.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.common.poll_interval = interval;
        self
    }

    /// Stack size of request threads and pool workers (default: Rust's, 2 MiB of address space;
    /// only touched pages cost memory).
    pub fn thread_stack_size(mut self, bytes: usize) -> Self {
        self.common.stack_size = Some(bytes);
        self
    }

    /// Python's `verify_request`: called on the accepting thread with each client's address
    /// (in event mode, the worker that accepted it, while no other accepts);
    /// returning false closes the connection (or drops the datagram) without running a handler.
    /// With `proxy_protocol` (cargo feature `proxy-protocol`) it is called after the PROXY header, on the
    /// connection's worker, with the client the header names.
    pub fn verify_request(mut self, hook: impl Fn(&Addr) -> bool + Send + Sync + 'static) -> Self {
        self.common.verify_request = Some(Box::new(hook));
        self
    }

    /// Python's `service_actions`: called on the serving thread once per loop pass, at least
    /// every [`poll_interval`](Self::poll_interval).
    pub fn service_actions(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.common.service_actions = Some(Box::new(hook));
        self
    }

    /// Python's `handle_timeout`: called when [`Server::handle_request`] times out.
    pub fn handle_timeout(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.common.handle_timeout = Some(Box::new(hook));
        self
    }

    /// Python's `handle_error`: called on the request's thread when a handler returns an error
    /// or panics, with the client's address. The default logs it at error level.
    pub fn handle_error(
        mut self,
        hook: impl Fn(&Addr, &HandlerFailure) + Send + Sync + 'static,
    ) -> Self {
        self.common.handle_error = Some(Box::new(hook));
        self
    }

    /// Sends systemd readiness messages when the environment asks for them (`NOTIFY_SOCKET`
    /// set, as under a `Type=notify` unit): `READY=1` with a `STATUS=` stats line when
    /// [`serve_forever`](Server::serve_forever) starts, `STOPPING=1` when a drain begins, and
    /// `WATCHDOG=1` with a fresh status line at half of `WATCHDOG_USEC` when that is set. Without
    /// `NOTIFY_SOCKET` it does nothing. Default false: a library sends nothing unasked. See
    /// [`Inherited`](crate::Inherited) for the other half of systemd's protocol. Linux only.
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    #[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
    pub fn sd_notify(mut self, notify: bool) -> Self {
        self.common.sd_notify = notify;
        self
    }

    /// The idle timeout and minimum data rate, which the reaper enforces (stream servers only).
    pub(crate) fn activity_mut(&mut self) -> &mut ActivityLimits {
        &mut self.common.activity
    }

    pub(crate) fn tracks_activity(&self) -> bool {
        self.common.activity.is_on()
    }

    /// Starts a server on a bound listener: the worker pool, the idle reaper.
    pub(crate) fn build(mut self, listener: T::Listener) -> crate::Result<Server<T>> {
        let c = self.common;
        let set_limit = c.dispatch.limit(c.max_connections);
        if set_limit == Some(0) || c.max_per_source == Some(0) {
            return Err(crate::Error::config(
                "workers, max_connections and max_per_source must be at least 1",
            ));
        }
        // The handshake cap follows what the user set: a derived thread-mode cap of thousands
        // would let as many silent connections sit in admission.
        let parks = c.dispatch.parks();
        #[cfg(all(target_os = "linux", not(socketserver_portable)))]
        if c.dispatch == (Run::Event { workers: 0 }) {
            return Err(crate::Error::config("workers must be at least 1"));
        }
        self.service.prepare(set_limit, parks)?;
        // Behind a PROXY header the client is known only in admission, which then runs
        // verify_request itself.
        let verify_request = c.verify_request.and_then(|h| self.service.take_verify(h));
        let learns_client = self.service.learns_client();
        let limit = match (c.dispatch, set_limit) {
            (Run::Thread, None) => default_max_connections(),
            #[cfg(all(target_os = "linux", not(socketserver_portable)))]
            (Run::Event { .. }, None) => default_event_connections(),
            _ => set_limit,
        };
        let local = listener.local_addr();
        let listening =
            listening_duplicate(listener.fd()).map_err(|e| crate::Error::io(Some(&local), e))?;
        let control = Control::new(local.clone(), limit, c.max_per_source, listening)
            .map_err(|e| crate::Error::io(Some(&local), e))?;
        let shared = Arc::new(Shared {
            service: self.service,
            ctx: Ctx {
                handle: ServerHandle { control },
                handle_error: c.handle_error,
            },
        });
        let dispatcher = Dispatcher::start(c.dispatch, c.stack_size, shared.clone())
            .map_err(|e| crate::Error::io(Some(&local), e))?;
        let reaper = match c.activity.is_on() {
            true => Some(
                IdleReaper::start(shared.ctx.handle.control.clone(), c.activity)
                    .map_err(|e| crate::Error::io(Some(&local), e))?,
            ),
            false => None,
        };
        let accept = AcceptLoop {
            listener,
            control: shared.ctx.handle.control.clone(),
            verify_request,
            learns_client,
            reject_when_full: c.reject_when_full && c.dispatch == Run::Thread,
        };
        let server = Server {
            accept: Some(Arc::new(accept)),
            shared,
            dispatcher: Some(dispatcher),
            reaper,
            block_on_close: c.block_on_close,
            poll_interval: c.poll_interval,
            service_actions: c.service_actions,
            handle_timeout: c.handle_timeout,
            #[cfg(all(target_os = "linux", not(socketserver_portable)))]
            readiness: OnceLock::new(),
        };
        #[cfg(all(target_os = "linux", not(socketserver_portable)))]
        if c.sd_notify {
            server.enable_readiness();
        }
        Ok(server)
    }
}

/// The IP socket options: TCP and UDP builders only. A Unix-domain builder has none of these
/// (its socket file's permissions say who may connect):
///
/// ```compile_fail
/// use socketserver::{UnixStreamServer, handler_fn};
///
/// let builder = UnixStreamServer::builder(|| handler_fn(|_req| Ok(()))).reuse_port(true);
/// ```
///
/// ```compile_fail
/// use socketserver::{UnixDatagramServer, datagram_fn};
///
/// let builder = UnixDatagramServer::builder(|| datagram_fn(|_req| Ok(()))).only_v6(true);
/// ```
impl<T: InetTransport> Builder<T> {
    /// Sets `SO_REUSEADDR` before binding. Default: on for TCP, as `std` does (a restarted
    /// server can bind while old connections linger in TIME_WAIT; Python's `TCPServer` defaults
    /// to off); off for UDP, where it would let a second server bind the same port and take
    /// part of its traffic.
    pub fn reuse_address(mut self, reuse: bool) -> Self {
        self.socket.reuse_address = Some(reuse);
        self
    }

    /// Sets `SO_REUSEPORT` before binding, so several servers can share a port (default false).
    pub fn reuse_port(mut self, reuse: bool) -> Self {
        self.socket.reuse_port = reuse;
        self
    }

    /// Restricts an IPv6 socket to IPv6 (`IPV6_V6ONLY`). Default false, whatever the system's
    /// setting: a server bound to `[::]:PORT` serves IPv4 clients too, and reports them with
    /// their IPv4 address (`127.0.0.1:5000`, not `[::ffff:127.0.0.1]:5000`).
    pub fn only_v6(mut self, only: bool) -> Self {
        self.socket.only_v6 = Some(only);
        self
    }
}

/// The socket file's settings: Unix-domain builders only. An IP builder has none of these:
///
/// ```compile_fail
/// use socketserver::{TcpServer, handler_fn};
///
/// let builder = TcpServer::builder(|| handler_fn(|_req| Ok(()))).socket_mode(0o660);
/// ```
///
/// ```compile_fail
/// use socketserver::{UdpServer, datagram_fn};
///
/// let builder = UdpServer::builder(|| datagram_fn(|_req| Ok(()))).replace_stale(true);
/// ```
impl<T: UnixTransport> Builder<T> {
    /// If the path holds a socket that nothing listens on any more (a crashed run's), remove
    /// it before binding. A live socket or any other file is never removed. Default false.
    pub fn replace_stale(mut self, replace: bool) -> Self {
        self.socket.replace_stale = replace;
        self
    }

    /// The permission bits of the socket file, such as `0o660` to let only the owner and its
    /// group connect (connecting needs write permission). Set before any client can connect,
    /// and exactly, whatever the umask. By default the file gets what the process's umask
    /// leaves of `0o777`. Bits beyond `0o7777` are refused when binding.
    pub fn socket_mode(mut self, mode: u32) -> Self {
        self.socket.mode = Some(mode);
        self
    }
}

/// The listen backlog: stream builders only. A datagram socket does not listen:
///
/// ```compile_fail
/// use socketserver::{UdpServer, datagram_fn};
///
/// let builder = UdpServer::builder(|| datagram_fn(|_req| Ok(()))).backlog(128);
/// ```
impl<T: StreamTransport> Builder<T> {
    /// The listen backlog; by default the system maximum (`somaxconn`), not Python's old 5.
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.socket.backlog = Some(backlog);
        self
    }
}

/// The cap per client address: TCP builders only. Unix-domain clients are local processes that
/// the socket file's permissions already select, and datagram sources can be forged:
///
/// ```compile_fail
/// use socketserver::{UdpServer, datagram_fn};
///
/// let builder = UdpServer::builder(|| datagram_fn(|_req| Ok(()))).max_per_source(16);
/// ```
///
/// ```compile_fail
/// use socketserver::{UnixStreamServer, handler_fn};
///
/// let builder = UnixStreamServer::builder(|| handler_fn(|_req| Ok(()))).max_per_source(16);
/// ```
impl<H: Handler> Builder<Tcp<H>> {
    /// Caps the connections one client IP address may have open at once, so that one client
    /// cannot take every slot under [`max_connections`](Self::max_connections) (or every
    /// worker). A connection over the cap is closed at once, logged (rate-limited) and counted
    /// in [`Stats::per_source_rejected`](crate::Stats::per_source_rejected). IPv4-mapped IPv6
    /// addresses count as their IPv4 address.
    ///
    /// Default: no per-source cap, as in nginx (`limit_conn`), OpenSSH
    /// (`PerSourceMaxStartups`) and Go's `net/http`. A default cap would silently refuse
    /// clients wherever many share one address: users behind a NAT, a load balancer or
    /// reverse proxy in front of the server, a load test from one host. Set it when clients
    /// reach the server directly; 16 is a common choice.
    pub fn max_per_source(mut self, max: usize) -> Self {
        self.common.max_per_source = Some(max);
        self
    }
}

/// Thread mode's cap when the user set none: derived from the system's limits, and logged
/// with its reason, since it decides when clients start waiting in the backlog.
fn default_max_connections() -> Option<usize> {
    let derived = crate::limits::SystemLimits::read().max_connections()?;
    log::info!(
        "max_connections {} (thread mode default: {}); Builder::max_connections changes it",
        derived.max,
        derived.reason
    );
    Some(derived.max)
}

/// Event mode's cap when the user set none: what the descriptor limit allows.
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
fn default_event_connections() -> Option<usize> {
    let derived = crate::limits::SystemLimits::read().max_event_connections()?;
    log::info!(
        "max_connections {} (event mode default: {}); Builder::max_connections changes it",
        derived.max,
        derived.reason
    );
    Some(derived.max)
}

/// For a listening (stream) socket, a duplicate that a drain can shut down while
/// `serve_forever` holds the original; `None` for a datagram socket, which has no backlog to
/// refuse.
fn listening_duplicate(fd: BorrowedFd<'_>) -> io::Result<Option<std::os::fd::OwnedFd>> {
    // rustix reads SO_ACCEPTCONN on Linux only; elsewhere a stream socket handed to a server
    // is taken to be listening.
    #[cfg(target_os = "linux")]
    let listening = rustix::net::sockopt::socket_acceptconn(fd)?;
    #[cfg(not(target_os = "linux"))]
    let listening = socket2::SockRef::from(&fd).r#type()? == socket2::Type::STREAM;
    if listening {
        Ok(Some(fd.try_clone_to_owned()?))
    } else {
        Ok(None)
    }
}

/// A server: a bound socket, a handler factory, and a dispatch mode.
///
/// Name it by its transport: [`TcpServer`](crate::TcpServer),
/// [`UnixStreamServer`](crate::UnixStreamServer), [`UdpServer`](crate::UdpServer),
/// [`UnixDatagramServer`](crate::UnixDatagramServer). They share everything documented here;
/// only how they bind differs.
///
/// The socket is bound and listening once the server exists (Python's `bind_and_activate`), so
/// clients can connect before [`serve_forever`](Self::serve_forever) starts. Dropping the server
/// is Python's `server_close`: see [`close`](Self::close).
pub struct Server<T: Transport> {
    /// The listener and the checks before dispatch; shared with event workers while they
    /// accept.
    accept: Option<Arc<AcceptLoop<T::Listener>>>,
    shared: Arc<Shared<T::Service>>,
    dispatcher: Option<Dispatcher<T::Service>>,
    reaper: Option<IdleReaper>,
    block_on_close: bool,
    poll_interval: Duration,
    service_actions: Option<ActionHook>,
    handle_timeout: Option<ActionHook>,
    /// Readiness messages (`READY=1`, ...), when asked for and the environment names a socket.
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    readiness: OnceLock<Option<crate::systemd::Readiness>>,
}

impl<T: Transport> Server<T> {
    /// A handle to this server, for other threads: shutdown, drain, counters.
    pub fn handle(&self) -> ServerHandle {
        self.shared.ctx.handle.clone()
    }

    /// The address the server is bound to (for IP, with the real port when bound to port 0).
    pub fn local_addr(&self) -> &Addr {
        &self.control().local_addr
    }

    /// Asks `serve_forever` to return; see [`ServerHandle::shutdown`].
    pub fn shutdown(&self) {
        self.control().request_shutdown();
    }

    /// A snapshot of the server's counters.
    pub fn stats(&self) -> crate::Stats {
        self.control().stats()
    }

    /// The cap on requests in flight; see [`ServerHandle::max_connections`].
    pub fn max_connections(&self) -> Option<usize> {
        self.control().limits.max_connections()
    }

    fn control(&self) -> &Arc<Control> {
        &self.shared.ctx.handle.control
    }

    /// Turns readiness messages on (see [`Builder::sd_notify`]); false if the environment
    /// names no notify socket.
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    pub(crate) fn enable_readiness(&self) -> bool {
        self.readiness
            .get_or_init(|| crate::systemd::Readiness::new(self.control()))
            .is_some()
    }

    /// The listener was inherited and other processes may accept on it too: a drain leaves it
    /// listening.
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    pub(crate) fn mark_adopted(&self) {
        self.control().shutdown.set_shared_listener();
    }

    /// Serves requests until [`shutdown`](ServerHandle::shutdown) is called, from any thread.
    ///
    /// It returns within milliseconds of the request (the accept loop waits on the socket and a
    /// wake-up pipe, not on a timer), and returns at once if shutdown was requested before it
    /// started. After it returns, the server can serve again, unless a drain
    /// ([`shutdown_graceful`](ServerHandle::shutdown_graceful)) closed its listener: then it
    /// returns at once. Accept errors never end it: those that retrying cannot fix (out of
    /// descriptors) are logged and retried with backoff.
    pub fn serve_forever(&self) {
        let Some(accept) = &self.accept else {
            return;
        };
        let control = self.control();
        if control.shutdown.listener_closed() {
            return;
        }
        let _serving = control.shutdown.serving(true);
        #[cfg(all(target_os = "linux", not(socketserver_portable)))]
        if let Some(Some(r)) = self.readiness.get() {
            r.serving();
        }
        // Event mode: the workers accept, while permits are free; this thread waits for the end.
        #[cfg(all(target_os = "linux", not(socketserver_portable)))]
        let workers = self.dispatcher.as_ref().and_then(|d| {
            let acceptor: Arc<dyn Acceptor<_>> = accept.clone();
            d.workers_accept(acceptor)
        });
        #[cfg(not(all(target_os = "linux", not(socketserver_portable))))]
        let workers: Option<()> = None;
        let mut backoff = Backoff::default();
        while !control.shutdown.requested() {
            if let Some(hook) = &self.service_actions
                && let Err(p) = catch_unwind(AssertUnwindSafe(hook))
            {
                log::error!("service_actions hook panicked: {}", panic_message(&*p));
            }
            let deadline = self
                .service_actions
                .as_ref()
                .and_then(|_| deadline_after(self.poll_interval));
            control.shutdown.set_accepting(true);
            if workers.is_some() {
                wait(None, control, deadline);
                control.shutdown.set_accepting(false);
                continue;
            }
            let next = accept.next(deadline, &mut backoff);
            control.shutdown.set_accepting(false);
            if let Next::Request(req, permit) = next {
                self.process(req, permit, &mut backoff);
            }
        }
        // The listener leaves the workers' set first; then this thread takes the backlog.
        #[cfg(all(target_os = "linux", not(socketserver_portable)))]
        drop(workers);
        if control.shutdown.backlog_wanted() {
            self.take_backlog(accept, &mut backoff);
        }
    }

    /// At the start of a drain: serves the connections already queued in the backlog, then
    /// closes the listener. A load balancer has handed those over and sent their requests;
    /// closing the listener with them queued would reset them, and the balancer cannot retry
    /// a request it has sent. What connects after the close is refused, and retried elsewhere.
    fn take_backlog(&self, accept: &AcceptLoop<T::Listener>, backoff: &mut Backoff) {
        let control = self.control();
        while !control.shutdown.listener_closed() {
            let Ok(req) = accept.listener.accept(control) else {
                break;
            };
            // Through the recorder, as the accept loop counts: the metrics facade, tracing and
            // prefork's `max_requests` see these too.
            control.record(Event::Accepted {
                peer: Some(req.peer()),
            });
            match control.limits.try_acquire() {
                Some(permit) => {
                    self.process(req, permit, backoff);
                }
                None => {
                    control.record(Event::Refused(Refusal::Limit));
                    req.reject();
                }
            }
        }
        control.shutdown.stop_listening(&control.local_addr);
    }

    /// Serves until SIGINT (Ctrl-C) or SIGTERM, then drains: Python's `serve_forever` ended by
    /// `KeyboardInterrupt`, made graceful. Returns how the drain went.
    ///
    /// The first signal stops accepting at once (new clients are refused, see
    /// [`shutdown_graceful`](ServerHandle::shutdown_graceful)) and lets in-flight requests
    /// finish for up to `grace`; a second one cuts everything still running at once, and
    /// closing the server then no longer waits for handlers. If `serve_forever` ends another
    /// way (a [`shutdown`](ServerHandle::shutdown) from a handler, say), the same drain follows.
    /// Either way the server cannot serve again: drop it.
    ///
    /// The signals are handled only while this runs; when it returns they do what they did
    /// before (by default, terminate the process). It may run for several servers at once,
    /// on different threads: each signal reaches all of them. Requires the `signals` cargo
    /// feature (on by default). Fails only if the signal handling cannot be set up (out of
    /// descriptors, or no thread can be started).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use socketserver::{TcpServer, handler_fn};
    ///
    /// fn main() -> socketserver::Result<()> {
    ///     let server = TcpServer::bind("127.0.0.1:9000", || handler_fn(|_req| Ok(())))?;
    ///     let report = server.serve_until_signal(Duration::from_secs(5))?;
    ///     eprintln!("{} finished, {} cut", report.finished, report.cut);
    ///     Ok(())
    /// }
    /// ```
    #[cfg(feature = "signals")]
    #[cfg_attr(docsrs, doc(cfg(feature = "signals")))]
    pub fn serve_until_signal(&self, grace: Duration) -> crate::Result<crate::DrainReport> {
        let control = self.control();
        let fail = |e| crate::Error::io(Some(&control.local_addr), e);
        let watch = crate::signals::Watch::install().map_err(fail)?;
        thread::scope(|scope| {
            let watcher = thread::Builder::new()
                .name("socketserver-signals".into())
                .spawn_scoped(scope, || watch.run(control, grace))
                .map_err(fail)?;
            self.serve_forever();
            let report = control.drain(grace, crate::control::CUT_WAIT);
            watch.stop();
            let _ = watcher.join();
            Ok(report)
        })
    }

    /// Python's `handle_request`: waits up to `timeout` (forever with `None`) for one request
    /// and dispatches it; on timeout calls the `handle_timeout` hook. Returns whether the
    /// request was dispatched: false on timeout, when a shutdown is pending, and for a request
    /// that `verify_request` or `max_per_source` rejected (it still counts as the one request
    /// handled).
    pub fn handle_request(&self, timeout: Option<Duration>) -> bool {
        let Some(accept) = &self.accept else {
            return false;
        };
        if self.control().shutdown.listener_closed() {
            return false;
        }
        let _serving = self.control().shutdown.serving(false);
        let deadline = timeout.and_then(deadline_after);
        match accept.next(deadline, &mut Backoff::default()) {
            Next::Request(req, permit) => self.process(req, permit, &mut Backoff::default()),
            Next::Timeout => {
                if let Some(hook) = &self.handle_timeout
                    && let Err(p) = catch_unwind(AssertUnwindSafe(hook))
                {
                    log::error!("handle_timeout hook panicked: {}", panic_message(&*p));
                }
                false
            }
            Next::Shutdown => false,
        }
    }

    /// Verifies and dispatches one request. False if it was not dispatched.
    fn process(
        &self,
        req: <T::Listener as Listener>::Request,
        permit: Permit,
        backoff: &mut Backoff,
    ) -> bool {
        let (Some(accept), Some(dispatcher)) = (&self.accept, &self.dispatcher) else {
            return false;
        };
        let Some(job) = accept.admit(req, permit) else {
            return false;
        };
        if let Err(e) = dispatcher.dispatch(job) {
            let control = self.control();
            control.record(Event::AcceptError);
            limited!(error, "{e}; connection closed");
            let delay = backoff.next();
            wait(None, control, Some(Instant::now() + delay));
            return false;
        }
        true
    }

    /// Python's `server_close`: releases the socket (and removes a Unix socket's file), stops
    /// the worker pool, and, with `block_on_close` (the default), waits for every in-flight
    /// request to finish. Dropping the server does the same.
    pub fn close(self) {}

    fn close_inner(&mut self) {
        drop(self.accept.take());
        // After a second Ctrl-C (`cut_now`), what is still running has been cut and given its
        // second: the process is on its way out and must not wait for a handler that ignores it.
        let join = self.block_on_close && !self.control().drain.cut_requested();
        if let Some(dispatcher) = self.dispatcher.take() {
            dispatcher.close(join);
        }
        if join {
            self.control().wait_idle(None, false);
        }
        drop(self.reaper.take());
    }
}

impl<T: Transport> Drop for Server<T> {
    fn drop(&mut self) {
        self.close_inner();
    }
}

impl<T: Transport> AsFd for Server<T> {
    /// The listening (or datagram) socket, Python's `fileno()`.
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.accept {
            Some(a) => a.listener.fd(),
            None => unreachable!("the listener is only taken when the server is dropped"),
        }
    }
}

impl<T: Transport> fmt::Debug for Server<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", self.local_addr())
            .finish_non_exhaustive()
    }
}

/// Shuts down connections that keep their worker waiting on the peer too long: blocked with no
/// byte moving for the idle timeout, or sending a request slower than the minimum data rate.
/// It reads counters that each `Stream` keeps with atomics (see `Stream::check_activity`), so
/// the cost on the data path is a few uncontended atomic additions per system call.
struct IdleReaper {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl IdleReaper {
    /// Also the pressure policy's: woken by a newcomer that finds the server full, it closes
    /// the idlest connections, as many as newcomers wait ([`Control::evict`]).
    fn start(control: Arc<Control>, limits: ActivityLimits) -> io::Result<IdleReaper> {
        let tick = limits.tick();
        let c = control.clone();
        c.limits.pressure.watched.store(true, Ordering::Relaxed);
        let thread = thread::Builder::new()
            .name("socketserver-idle".into())
            .spawn(move || {
                let p = &c.limits.pressure;
                let mut last = Instant::now();
                let mut state = lock(&p.state);
                while !state.stop {
                    let next = last + tick;
                    if !state.wanted {
                        let wait = next.saturating_duration_since(Instant::now());
                        state = p
                            .wake
                            .wait_timeout(state, wait)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    let wanted = std::mem::take(&mut state.wanted);
                    drop(state);
                    if wanted {
                        relieve(&c, next);
                    }
                    let now = Instant::now();
                    if now >= next {
                        let elapsed = now - last;
                        last = now;
                        c.cut_where(|s| {
                            let Some(cut) = s.check_activity(elapsed, &limits) else {
                                return false;
                            };
                            if !s.mark_cut() {
                                return false;
                            }
                            report_cut(&c, s, cut);
                            true
                        });
                    }
                    // Still full: keep watching for newcomers after the tick. (Asked before the
                    // lock: `acquire` takes the slots' lock, then this one.)
                    let full = c.limits.is_full();
                    state = lock(&p.state);
                    state.wanted |= full;
                }
            })?;
        Ok(IdleReaper {
            control,
            thread: Some(thread),
        })
    }
}

/// The longest the reaper waits on the listener for a newcomer before it looks at its own
/// stop flag again.
const PRESSURE_LOOK: Duration = Duration::from_millis(50);

/// How long the pressure policy of a worker sharing its listener with other processes watches
/// the queue before it sheds a client for a newcomer: long enough to see a sibling with room
/// take from it on a loaded machine, short beside a client's patience. A server alone on its
/// listener sheds at once.
const PRESSURE_GRACE: Duration = Duration::from_millis(200);

/// The pressure policy, while the server is full (the accept loop waits for a slot): each
/// newcomer that queues in the backlog gets an idle connection shed for it, at once. Returns
/// when the server is no longer full, when it stops, or when the reaper's tick is due.
fn relieve(c: &Control, tick_due: Instant) {
    let Some(listener) = c.shutdown.listener_dup() else {
        return;
    };
    loop {
        let stopped = lock(&c.limits.pressure.state).stop;
        if stopped || c.shutdown.requested() || !c.limits.is_full() {
            return;
        }
        let now = Instant::now();
        if now >= tick_due {
            return;
        }
        let mut fds = [PollFd::new(&listener, PollFlags::IN)];
        if !matches!(
            poll_until(&mut fds, Some(now + PRESSURE_LOOK.min(tick_due - now))),
            Ok(Polled::Ready)
        ) {
            continue;
        }
        if c.shutdown.listener_is_shared() && !unclaimed(&listener) {
            continue;
        }
        if !c.evict(1, |s, idle| report_eviction(c, s, idle)) {
            // Nobody idle, or the one shed is still leaving. Who is idle changes only at the
            // reaper's looks; a slot freed (the one shed gone) or another newcomer wakes this.
            // (A slot freed just before the wait is missed, harmlessly: the newcomer takes it
            // without the reaper, which stays here until a newcomer or its look.)
            let mut state = lock(&c.limits.pressure.state);
            if !state.stop && !std::mem::take(&mut state.wanted) {
                let left = tick_due.saturating_duration_since(Instant::now());
                let _ = c.limits.pressure.wake.wait_timeout(state, left);
            }
        }
    }
}

/// Whether the newcomers queued on a listener that other processes accept from too (prefork's
/// workers share one) are left there: a sibling with room takes them, and shedding a client
/// for one would cut it for nothing. They are left if the queue stays, without shrinking, for
/// [`PRESSURE_GRACE`]; a queue that shrinks or empties is being taken from. Where its length
/// cannot be read (a Unix-domain listener), still queued at the end is taken as left.
fn unclaimed(listener: &OwnedFd) -> bool {
    let mut last = accept_queue_len(listener.as_fd());
    let end = Instant::now() + PRESSURE_GRACE;
    while Instant::now() < end {
        thread::sleep(PRESSURE_GRACE / 10);
        let now = accept_queue_len(listener.as_fd());
        match (last, now) {
            (Some(before), Some(now)) if now == 0 || now < before => return false,
            _ => last = now,
        }
    }
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    matches!(
        poll_until(&mut fds, Some(Instant::now())),
        Ok(Polled::Ready)
    )
}

/// Says which idle connection the pressure policy closed.
fn report_eviction(control: &Control, s: &crate::Stream, idle: Duration) {
    let peer = s
        .peer_addr()
        .map_or_else(|_| "a peer that has gone".to_owned(), |a| a.to_string());
    limited!(
        info,
        "closed idle connection from {peer} (idle {idle:?}): the server is at max_connections \
         ({}) with clients waiting, and sheds the idlest first",
        control.limits.max_connections().unwrap_or_default()
    );
}

/// Counts a cut by its reason and says which peer it was and why.
fn report_cut(control: &Control, s: &crate::Stream, cut: Cut) {
    let peer = s
        .peer_addr()
        .map_or_else(|_| "a peer that has gone".to_owned(), |a| a.to_string());
    match cut {
        Cut::Idle(idle) => {
            control.record(Event::IdleClosed);
            limited!(
                info,
                "closed connection from {peer}: nothing sent or read for {idle:?} (idle timeout)"
            );
        }
        Cut::TooSlow {
            bytes,
            waited,
            rate,
        } => {
            control.record(Event::SlowClosed);
            limited!(
                info,
                "closed connection from {peer}: {bytes} bytes of a request in {waited:.1?}, under \
                 the minimum of {} bytes/s after {:?}",
                rate.bytes_per_second,
                rate.grace
            );
        }
    }
}

impl Drop for IdleReaper {
    fn drop(&mut self) {
        let p = &self.control.limits.pressure;
        p.watched.store(false, Ordering::Relaxed);
        lock(&p.state).stop = true;
        p.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
