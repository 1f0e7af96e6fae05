//! Listeners handed over the systemd way, and readiness messages.
//!
//! **Adoption.** A service manager (systemd socket activation, `systemd-socket-activate`), a
//! [prefork supervisor](crate::prefork) starting its workers, and an old supervisor starting its
//! replacement in a zero-downtime upgrade all pass listening sockets the same way: as
//! descriptors 3, 4, ... with `LISTEN_FDS=N`, `LISTEN_PID=<pid of the receiver>` and optionally
//! `LISTEN_FDNAMES=a:b`. One path adopts them: `adopt(`[`Inherited`]`)` on each server kind's
//! builder (for example [`Builder::adopt`](crate::Builder) for `TcpServer`), which checks that
//! the descriptor is the kind of socket asked for (`SO_DOMAIN`, `SO_TYPE`, and for streams
//! `SO_ACCEPTCONN`) and fails with [`Error::is_wrong_socket_kind`](crate::Error) when it is not.
//! An adopted Unix socket's file belongs to whoever bound it and is never removed by the server
//! that adopted it; an adopted listener is shared with other processes, so a drain stops
//! accepting on it without shutting it down (which would refuse clients for every process).
//!
//! **Readiness.** With [`Builder::sd_notify`](crate::Builder::sd_notify) (or under a prefork
//! supervisor) and `NOTIFY_SOCKET` set, the server sends `READY=1` (with a `STATUS=` stats line)
//! when its accept loop starts, `STOPPING=1` when a drain begins, and, when `WATCHDOG_USEC` is
//! set, `WATCHDOG=1` at half that interval, each ping with a fresh `STATUS=` line.
//!
//! The protocol is a few lines over `rustix` (already a dependency), so it needs no cargo
//! feature: `listenfd` does not check the socket's kind or address family, and `sd-notify`
//! cannot send to the descriptor a prefork worker reports through.
//!
//! The variables are not removed from the environment after reading: `std::env::remove_var`
//! is unsound while other threads may read the environment (it is `unsafe` in edition 2024), and
//! a library cannot know that they do not. They are harmless left in place: `LISTEN_PID` names
//! this process, so a child ignores `LISTEN_FDS`, and the descriptors are marked close-on-exec
//! when adopted. The prefork supervisor removes them from what its children inherit.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rustix::net::{AddressFamily, SocketType};

use crate::control::{Control, lock};
use crate::{Error, Result};

/// The first inherited descriptor (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// The variable by which a prefork supervisor gives a child the descriptor it reports its
/// readiness on (a connected datagram socket), instead of `NOTIFY_SOCKET`'s address.
pub(crate) const NOTIFY_FD_VAR: &str = "SOCKETSERVER_NOTIFY_FD";

/// Which inherited listener to adopt: by position among `LISTEN_FDS` (0 is descriptor 3) or by
/// its name in `LISTEN_FDNAMES` (systemd's `FileDescriptorName=`, `systemd-socket-activate
/// --fdname=`).
///
/// ```no_run
/// use socketserver::{Inherited, TcpServer, handler_fn};
///
/// let server = TcpServer::builder(|| handler_fn(|_req| Ok(())))
///     .adopt(Inherited::named("main"))?;
/// server.serve_forever();
/// # Ok::<(), socketserver::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
pub struct Inherited(Select);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Select {
    Index(usize),
    Name(String),
}

impl Inherited {
    /// The `index`-th inherited descriptor (descriptor `3 + index`).
    pub fn index(index: usize) -> Inherited {
        Inherited(Select::Index(index))
    }

    /// The inherited descriptor named `name` in `LISTEN_FDNAMES`.
    pub fn named(name: impl Into<String>) -> Inherited {
        Inherited(Select::Name(name.into()))
    }

    /// How many listeners this process inherited (`LISTEN_FDS`, when `LISTEN_PID` names this
    /// process), adopted or not; 0 when it was not started that way. The examples serve on an
    /// inherited listener when this is not 0 and bind their `--addr` otherwise.
    pub fn count() -> usize {
        lock(fds()).slots.len()
    }

    /// Takes the descriptor out of the process-wide set, checking it is a socket of `kind`.
    pub(crate) fn take(&self, kind: SocketKind) -> Result<OwnedFd> {
        let mut set = lock(fds());
        let index = match &self.0 {
            Select::Index(i) => *i,
            Select::Name(n) => set
                .names
                .iter()
                .position(|m| m == n)
                .ok_or_else(|| self.missing(&set))?,
        };
        if index >= set.slots.len() {
            return Err(self.missing(&set));
        }
        let fd = &mut set.slots[index];
        let Some(owned) = fd.take() else {
            return Err(Error::not_inherited(format!(
                "{self} was adopted already (each inherited socket is served once)"
            )));
        };
        match kind.check(&owned) {
            Ok(()) => Ok(owned),
            Err(e) => {
                let at = bound_to(&owned);
                // Not ours to close: put it back for whoever asks for the right kind.
                *fd = Some(owned);
                Err(e
                    .with_detail_prefix(&self.to_string())
                    .with_addr(at.as_ref()))
            }
        }
    }

    fn missing(&self, set: &Fds) -> Error {
        Error::not_inherited(format!(
            "no {self} among the {} inherited (LISTEN_FDS={}, LISTEN_FDNAMES={})",
            set.slots.len(),
            set.slots.len(),
            set.names.join(":")
        ))
    }
}

impl std::fmt::Display for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Select::Index(i) => write!(f, "inherited socket #{i} (fd {})", FIRST_FD + *i as i32),
            Select::Name(n) => write!(f, "inherited socket named {n:?}"),
        }
    }
}

/// The address a socket is bound to, for an error message; `None` if it is not a socket.
fn bound_to(fd: &OwnedFd) -> Option<crate::Addr> {
    let a = socket2::SockRef::from(fd).local_addr().ok()?;
    Some(match a.as_socket() {
        Some(inet) => crate::Addr::Inet(inet),
        None => crate::Addr::Unix(a.as_pathname().map(std::path::Path::to_path_buf)),
    })
}

/// The kinds of socket a server can adopt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SocketKind {
    Tcp,
    Udp,
    UnixStream,
    UnixDatagram,
}

impl SocketKind {
    fn describe(self) -> &'static str {
        match self {
            SocketKind::Tcp => "a listening TCP socket",
            SocketKind::Udp => "a UDP socket",
            SocketKind::UnixStream => "a listening Unix stream socket",
            SocketKind::UnixDatagram => "a Unix datagram socket",
        }
    }

    /// What `fd` is, as the error message names it.
    fn actual(fd: &OwnedFd) -> io::Result<String> {
        let ty = rustix::net::sockopt::socket_type(fd)?;
        let domain = rustix::net::sockopt::socket_domain(fd)?;
        let family = match domain {
            AddressFamily::INET => "IPv4",
            AddressFamily::INET6 => "IPv6",
            AddressFamily::UNIX => "Unix",
            _ => "other-family",
        };
        let ty = match ty {
            SocketType::STREAM if rustix::net::sockopt::socket_acceptconn(fd)? => {
                "listening stream"
            }
            SocketType::STREAM => "stream (not listening)",
            SocketType::DGRAM => "datagram",
            SocketType::SEQPACKET => "seqpacket",
            _ => "other-type",
        };
        Ok(format!("an {family} {ty} socket"))
    }

    fn check(self, fd: &OwnedFd) -> Result<()> {
        let wrong =
            |what: String| Error::wrong_socket_kind(format!("{what}, not {}", self.describe()));
        let ty = match rustix::net::sockopt::socket_type(fd) {
            Ok(ty) => ty,
            // ENOTSOCK: a pipe or a file.
            Err(e) => return Err(wrong(format!("not a socket ({e})"))),
        };
        let domain = rustix::net::sockopt::socket_domain(fd).map_err(io::Error::from)?;
        let inet = domain == AddressFamily::INET || domain == AddressFamily::INET6;
        let unix = domain == AddressFamily::UNIX;
        let stream = ty == SocketType::STREAM;
        let ok = match self {
            SocketKind::Tcp => inet && stream,
            SocketKind::Udp => inet && ty == SocketType::DGRAM,
            SocketKind::UnixStream => unix && stream,
            SocketKind::UnixDatagram => unix && ty == SocketType::DGRAM,
        };
        let listening =
            !stream || rustix::net::sockopt::socket_acceptconn(fd).map_err(io::Error::from)?;
        if ok && listening {
            return Ok(());
        }
        Err(wrong(Self::actual(fd)?))
    }
}

/// The inherited descriptors not adopted yet, read once per process.
struct Fds {
    slots: Vec<Option<OwnedFd>>,
    names: Vec<String>,
}

fn fds() -> &'static Mutex<Fds> {
    static FDS: OnceLock<Mutex<Fds>> = OnceLock::new();
    FDS.get_or_init(|| Mutex::new(read_listen_fds()))
}

/// Whether `LISTEN_PID` names this process: the descriptors passed with it are ours.
pub(crate) fn listen_pid_is_me() -> bool {
    std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id())
}

/// How many descriptors `LISTEN_FDS` passes to this process (0 unless `LISTEN_PID` names it).
fn listen_fds_count() -> usize {
    match std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        Some(n) if listen_pid_is_me() => n,
        _ => 0,
    }
}

/// The descriptor [`NOTIFY_FD_VAR`] names, checked against the `listen_fds` listeners passed
/// from descriptor 3 on: one descriptor has one owner, so a number among them (or below 3, or
/// not a number) is an error that says so, not a second claim on a listener.
fn notify_fd(var: Option<&str>, listen_fds: usize) -> std::result::Result<Option<RawFd>, String> {
    let Some(v) = var else {
        return Ok(None);
    };
    let fd: RawFd = v
        .trim()
        .parse()
        .map_err(|_| format!("{NOTIFY_FD_VAR}={v:?} is not a descriptor number"))?;
    let listeners = FIRST_FD..FIRST_FD.saturating_add(listen_fds.min(RawFd::MAX as usize) as RawFd);
    if fd < FIRST_FD {
        return Err(format!(
            "{NOTIFY_FD_VAR}={fd}: descriptors below {FIRST_FD} are stdin, stdout and stderr"
        ));
    }
    if listeners.contains(&fd) {
        return Err(format!(
            "{NOTIFY_FD_VAR}={fd} is one of the {listen_fds} listeners LISTEN_FDS passes \
             (descriptors {}..={}): one descriptor cannot be both",
            listeners.start,
            listeners.end - 1
        ));
    }
    Ok(Some(fd))
}

/// Reads `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES` and claims the descriptors.
fn read_listen_fds() -> Fds {
    let var = |n| std::env::var(n).ok();
    let n = listen_fds_count();
    let mut names: Vec<String> = var("LISTEN_FDNAMES")
        .map(|s| s.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    names.resize(n, "unknown".to_owned());
    let slots = (0..n)
        .map(|i| claim_inherited(FIRST_FD + i as RawFd))
        .collect();
    if n > 0 {
        log::debug!("inherited {n} socket(s): {}", names.join(", "));
    }
    Fds { slots, names }
}

/// Takes ownership of a descriptor this process inherited by protocol (`LISTEN_FDS`, or
/// [`NOTIFY_FD_VAR`]) and marks it close-on-exec; `None` if it is not open.
#[allow(unsafe_code)]
pub(crate) fn claim_inherited(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: `fcntl(F_GETFD)` only reads the flags of a descriptor number and fails with EBADF
    // if it is not open; it touches no memory. If it is open, `from_raw_fd` requires that the
    // descriptor be owned by no one else. The protocol hands it to this process for exactly this
    // use, nothing in this crate opens it otherwise, and each number is claimed at most once:
    // `LISTEN_FDS` descriptors by `read_listen_fds`, run once per process behind a `OnceLock`,
    // the notify descriptor by `Notifier::from_env`, likewise, and never one of the
    // `LISTEN_FDS` numbers (`notify_fd` refuses those). The one way to break it is
    // another library of the same process also claiming `LISTEN_FDS` (libsystemd's
    // `sd_listen_fds`, `listenfd`): as with systemd's own API, only one part of a program may.
    unsafe {
        if libc::fcntl(fd, libc::F_GETFD) < 0 {
            return None;
        }
        let owned = OwnedFd::from_raw_fd(fd);
        let _ = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC);
        Some(owned)
    }
}

/// Where readiness messages go: `NOTIFY_SOCKET`'s address, or a prefork supervisor's
/// descriptor.
pub(crate) struct Notifier {
    sock: UnixDatagram,
    to: Option<socket2::SockAddr>,
}

impl Notifier {
    /// The process's notifier, if its environment names one; made once.
    pub(crate) fn get() -> Option<Arc<Notifier>> {
        static N: OnceLock<Option<Arc<Notifier>>> = OnceLock::new();
        N.get_or_init(|| match Notifier::from_env() {
            Ok(n) => n.map(Arc::new),
            Err(e) => {
                log::error!("cannot send readiness messages: {e}");
                None
            }
        })
        .clone()
    }

    fn from_env() -> io::Result<Option<Notifier>> {
        // Like LISTEN_FDS, the descriptor is for the process LISTEN_PID names: a child that
        // inherited the variables would claim whatever has that number in it.
        if listen_pid_is_me() {
            let var = std::env::var(NOTIFY_FD_VAR).ok();
            let fd = notify_fd(var.as_deref(), listen_fds_count()).map_err(io::Error::other)?;
            if let Some(fd) = fd.and_then(claim_inherited) {
                return Ok(Some(Notifier {
                    sock: UnixDatagram::from(fd),
                    to: None,
                }));
            }
        }
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let bytes = path.as_bytes();
        // A leading `@` names the abstract namespace: a NUL byte in the address.
        let to = match bytes.strip_prefix(b"@") {
            Some(name) => [&[0u8][..], name].concat(),
            None => bytes.to_vec(),
        };
        let to = socket2::SockAddr::unix(OsStr::from_bytes(&to))?;
        Ok(Some(Notifier {
            sock: UnixDatagram::unbound()?,
            to: Some(to),
        }))
    }

    /// Sends one message (`READY=1`, `STATUS=...`); failures are logged, not returned: a
    /// manager that stopped listening must not stop the server.
    pub(crate) fn send(&self, msg: &str) {
        let sent = match &self.to {
            None => self.sock.send(msg.as_bytes()),
            Some(to) => socket2::SockRef::from(&self.sock).send_to(msg.as_bytes(), to),
        };
        if let Err(e) = sent {
            crate::log_limit::limited!(warn, "cannot send {msg:?} to the service manager: {e}");
        }
    }

    /// The watchdog interval (`WATCHDOG_USEC`, for this process per `WATCHDOG_PID` if set).
    pub(crate) fn watchdog() -> Option<Duration> {
        if let Some(pid) = std::env::var("WATCHDOG_PID").ok()
            && pid.parse::<u32>().ok() != Some(std::process::id())
        {
            return None;
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec))
    }
}

/// One server's readiness reporting: `READY=1` once, `STOPPING=1` on drain, watchdog pings
/// and status lines from a thread of its own until dropped.
pub(crate) struct Readiness {
    notifier: Arc<Notifier>,
    control: Weak<Control>,
    ready_sent: Mutex<bool>,
    pinger: Mutex<Option<Pinger>>,
}

struct Pinger {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

impl Readiness {
    /// Readiness for the server of `control`, if the environment names a notify socket.
    pub(crate) fn new(control: &Arc<Control>) -> Option<Readiness> {
        let notifier = Notifier::get()?;
        let n = notifier.clone();
        control
            .drain
            .on_drain(Box::new(move || n.send("STOPPING=1")));
        Some(Readiness {
            notifier,
            control: Arc::downgrade(control),
            ready_sent: Mutex::new(false),
            pinger: Mutex::new(None),
        })
    }

    /// The accept loop is about to serve: `READY=1` with a status line (once), and the watchdog
    /// pings start.
    pub(crate) fn serving(&self) {
        let mut sent = lock(&self.ready_sent);
        if *sent {
            return;
        }
        *sent = true;
        let Some(control) = self.control.upgrade() else {
            return;
        };
        self.notifier
            .send(&format!("READY=1\nSTATUS={}", status_line(&control)));
        let every = Notifier::watchdog().map(|w| w / 2);
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (s, n, c) = (stop.clone(), self.notifier.clone(), self.control.clone());
        let spawned = thread::Builder::new()
            .name("socketserver-notify".into())
            .spawn(move || ping(&s, &n, &c, every));
        match spawned {
            Ok(thread) => *lock(&self.pinger) = Some(Pinger { stop, thread }),
            Err(e) => log::warn!("cannot start the watchdog thread: {e}"),
        }
    }
}

/// Until `stop`: `WATCHDOG=1` every `every` (when the watchdog is on) and a status line, at
/// least every 5 s.
fn ping(
    stop: &(Mutex<bool>, Condvar),
    n: &Notifier,
    control: &Weak<Control>,
    every: Option<Duration>,
) {
    let tick = every.unwrap_or(Duration::from_secs(5));
    let mut stopped = lock(&stop.0);
    loop {
        stopped = stop
            .1
            .wait_timeout(stopped, tick)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        if *stopped {
            return;
        }
        let Some(c) = control.upgrade() else { return };
        let status = format!("STATUS={}", status_line(&c));
        match every {
            Some(_) => n.send(&format!("WATCHDOG=1\n{status}")),
            None => n.send(&status),
        }
    }
}

/// The stats line of `STATUS=`.
fn status_line(c: &Control) -> String {
    let s = c.stats();
    let state = if c.drain.is_draining() {
        "draining"
    } else {
        "serving"
    };
    format!(
        "{state} on {}: {} active, {} accepted, {} rejected, {} handler errors, {} panics",
        c.local_addr, s.active, s.accepted, s.rejected, s.handler_errors, s.panics
    )
}

impl Drop for Readiness {
    fn drop(&mut self) {
        if let Some(p) = lock(&self.pinger).take() {
            *lock(&p.stop.0) = true;
            p.stop.1.notify_all();
            let _ = p.thread.join();
        }
    }
}

/// Every inherited socket not adopted yet, with its name: what a prefork supervisor passes on
/// to its workers.
#[cfg(feature = "signals")]
pub(crate) fn take_all() -> Vec<(OwnedFd, String)> {
    let mut set = lock(fds());
    let names = set.names.clone();
    set.slots
        .iter_mut()
        .zip(names)
        .filter_map(|(fd, name)| fd.take().map(|fd| (fd, name)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    #[test]
    fn the_notify_descriptor_never_aliases_a_listener() {
        assert_eq!(notify_fd(None, 2), Ok(None));
        assert_eq!(notify_fd(Some("7"), 2), Ok(Some(7)));
        assert_eq!(notify_fd(Some("5"), 2), Ok(Some(5)));
        assert_eq!(notify_fd(Some("3"), 0), Ok(Some(3)));
        for (v, n, says) in [
            ("3", 1, "one of the 1 listeners"),
            ("4", 2, "descriptors 3..=4"),
            ("2", 0, "below 3"),
            ("x", 0, "not a descriptor number"),
            ("", 0, "not a descriptor number"),
        ] {
            let e = notify_fd(Some(v), n).unwrap_err();
            assert!(
                e.contains(says) && e.contains(NOTIFY_FD_VAR),
                "{v} {n}: {e}"
            );
        }
    }

    #[test]
    fn a_socket_of_another_kind_is_refused_with_what_it_is() {
        let udp: OwnedFd = UdpSocket::bind("127.0.0.1:0").unwrap().into();
        let e = SocketKind::Tcp.check(&udp).unwrap_err();
        assert!(e.is_wrong_socket_kind(), "{e}");
        assert!(e.to_string().contains("IPv4 datagram"), "{e}");
        assert!(SocketKind::Udp.check(&udp).is_ok());
        let tcp: OwnedFd = TcpListener::bind("127.0.0.1:0").unwrap().into();
        assert!(SocketKind::Tcp.check(&tcp).is_ok());
        assert!(SocketKind::UnixStream.check(&tcp).is_err());
        let file: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let e = SocketKind::Tcp.check(&file).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }
}
