//! A cheaply cloneable handle to an accepted stream socket, TCP or Unix.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::Addr;

/// An accepted connection: a TCP or Unix-domain stream socket.
///
/// Cloning is cheap (the clones share one socket, which is closed when the last one is dropped),
/// and both `Stream` and `&Stream` implement [`Read`] and [`Write`]. That is what lets a handler
/// hold a buffered reader and a buffered writer over one connection at the same time
/// ([`Request`](crate::Request)), and lets the server shut down the socket of a
/// connection that overstays a drain deadline or an idle timeout.
#[derive(Clone)]
pub struct Stream {
    inner: Arc<Inner>,
}

struct Inner {
    sock: Sock,
    /// What the server's reaper watches; `None` when the server enforces no activity limits,
    /// and then reads and writes touch nothing but the socket.
    activity: Option<Activity>,
    /// Set once the server has shut this socket down (idle or too slow), so it is counted once.
    cut: AtomicBool,
    /// Set while an event-mode connection waits, parked, for its next message: a drain closes
    /// these at once.
    parked: AtomicBool,
    /// The read and write timeouts as set through the `Stream`, in nanoseconds (0: none set
    /// here), for the timeout's message: the kernel reads them back rounded to its clock tick.
    timeouts_ns: [AtomicU64; 2],
    /// Bytes read and written, indexed by [`Direction`], when `activity` is off (it counts them
    /// itself otherwise, so a system call never pays for two counters).
    moved: [AtomicU64; 2],
    /// The TLS session, once the handshake has run: reads and writes then go through it.
    #[cfg(feature = "tls")]
    tls: OnceLock<Box<crate::tls::session::Session>>,
    /// Event mode: the socket is non-blocking and what it cannot take now waits here.
    outbox: OnceLock<Box<Outbox>>,
}

/// Event mode's output: a write never waits for the peer. What the socket cannot take now is
/// kept, in order, until the event loop sees it writable; a message handler's output is held
/// until the message is served, so that a call that ran out of input can be taken back whole.
struct Outbox {
    state: Mutex<OutState>,
    /// Set before every send and cleared once nothing is left: an event loop that sees it
    /// false on a writable event knows there is nothing to send (set first, so a send that
    /// fills the socket cannot be missed by an event that follows it).
    pending: AtomicBool,
}

#[derive(Default)]
struct OutState {
    /// Bytes for the socket (ciphertext under TLS), in order.
    wire: Vec<u8>,
    /// Plaintext written during a message, not yet released to `wire`.
    held: Vec<u8>,
    holding: bool,
}

/// Outbox buffers larger than this are freed once empty, so that a connection that sent one
/// large reply does not keep its buffer while it idles.
const KEEP_OUTBOX: usize = 16 * 1024;

/// How long a connection may keep its worker waiting on the peer: the idle timeout and the
/// minimum data rate of [`Builder`](crate::Builder), enforced by the server's reaper thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ActivityLimits {
    pub(crate) idle: Option<Duration>,
    pub(crate) min_rate: Option<MinDataRate>,
}

impl ActivityLimits {
    /// The defaults of stream servers; see [`Builder::idle_timeout`](crate::Builder::idle_timeout)
    /// and [`Builder::min_data_rate`](crate::Builder::min_data_rate) for why these values.
    pub(crate) const STREAM_DEFAULT: ActivityLimits = ActivityLimits {
        // No clock cuts a quiet client: pressure does, idlest first (`Control::evict`).
        idle: None,
        min_rate: Some(MinDataRate::DEFAULT),
    };

    /// Whether there is anything to enforce (and so any activity to track).
    pub(crate) fn is_on(&self) -> bool {
        self.idle.is_some() || self.min_rate.is_some()
    }

    /// How often the reaper looks: a quarter of the shortest limit, between 10 ms and 1 s, so a
    /// connection is cut at most a quarter (and never more than a second) late.
    pub(crate) fn tick(&self) -> Duration {
        let shortest = [self.idle, self.min_rate.map(|r| r.grace)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(Duration::from_secs(1));
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

/// The minimum rate at which a client must send a request it has started, once a grace period
/// has passed: Apache's `mod_reqtimeout` `MinRate`, Kestrel's `MinRequestBodyDataRate`. Set with
/// [`Builder::min_data_rate`](crate::Builder::min_data_rate).
///
/// A request is in progress from the first byte that arrives after the end of the last unit
/// until the end of this one: a unit ends with a line read whole by `rfile`'s line reads, a
/// message served by a [`MessageHandler`](crate::MessageHandler), or any write by the server
/// (its reply). Only time the handler spends blocked reading (or, in event mode, the
/// connection spends parked) counts, not time it spends computing. The client
/// is cut when that time exceeds `grace` plus one second per `bytes_per_second` bytes received
/// (the rate averaged over the request, after the grace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinDataRate {
    /// Bytes per second the client must average once the grace period is over (0: any rate).
    pub bytes_per_second: u64,
    /// How long a request may take before the rate applies.
    pub grace: Duration,
}

impl MinDataRate {
    /// 500 bytes per second after 10 s: `mod_reqtimeout`'s `MinRate=500` (Apache's default
    /// configuration), with a grace between Kestrel's 5 s and Apache's 20 s. A request line
    /// trickled a byte every few seconds (Slowloris) is cut after 10 s; any real client, even
    /// on a 2G link, sends faster than 500 bytes per second.
    pub const DEFAULT: MinDataRate = MinDataRate {
        bytes_per_second: 500,
        grace: Duration::from_secs(10),
    };

    /// `bytes_per_second` after `grace`.
    pub const fn new(bytes_per_second: u64, grace: Duration) -> MinDataRate {
        MinDataRate {
            bytes_per_second,
            grace,
        }
    }

    /// How long the server may wait for a request of `bytes` bytes so far.
    fn allowance(&self, bytes: u64) -> Duration {
        let per_byte = match self.bytes_per_second {
            0 => return Duration::MAX,
            r => Duration::try_from_secs_f64(bytes as f64 / r as f64).unwrap_or(Duration::MAX),
        };
        self.grace.saturating_add(per_byte)
    }
}

/// Why the reaper cut a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Blocked on the peer (reading or writing) with no byte moving for the idle timeout.
    Idle(Duration),
    /// A request in progress arrived slower than the minimum data rate.
    TooSlow {
        bytes: u64,
        waited: Duration,
        rate: MinDataRate,
    },
}

/// Counters that reads and writes update (atomics, no lock, no clock: a handful of uncontended
/// atomic additions per system call), and the reaper's view of them.
struct Activity {
    /// Threads blocked in a read (or write) through this stream right now.
    reading: AtomicU32,
    writing: AtomicU32,
    /// Bytes read and written so far.
    read: AtomicU64,
    written: AtomicU64,
    /// `read` when the server last wrote: bytes past it are the request in progress. Set by
    /// every write, so that a request sent right after a reply is timed from its first byte.
    request_start: AtomicU64,
    /// What the reaper saw at its last look; only the reaper locks it.
    watch: Mutex<Watch>,
}

#[derive(Default)]
struct Watch {
    read: u64,
    written: u64,
    request_start: u64,
    /// How long the connection has been blocked on its peer with no byte moving.
    stalled: Duration,
    /// Time spent blocked reading since the request in progress began.
    waited: Duration,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            reading: AtomicU32::new(0),
            writing: AtomicU32::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            request_start: AtomicU64::new(0),
            watch: Mutex::new(Watch::default()),
        }
    }

    /// One look by the reaper, `elapsed` after its previous one: what the connection did
    /// meanwhile, and whether it broke a limit. Time counts against the peer only while a read
    /// or write is blocked on it, never while the handler computes.
    fn check(&self, elapsed: Duration, limits: &ActivityLimits) -> Option<Cut> {
        // Only the reaper locks it, and never panics holding it.
        let mut w = self.watch.lock().unwrap_or_else(|e| e.into_inner());
        let reading = self.reading.load(Ordering::Relaxed) > 0;
        let writing = self.writing.load(Ordering::Relaxed) > 0;
        let read = self.read.load(Ordering::Relaxed);
        let written = self.written.load(Ordering::Relaxed);
        let request_start = self.request_start.load(Ordering::Relaxed);
        if written != w.written || request_start != w.request_start {
            // Our reply, or the end of a unit the handler read (a line, a message), ended the
            // request that was in progress.
            w.waited = Duration::ZERO;
        }
        w.request_start = request_start;
        if read != w.read || written != w.written || !(reading || writing) {
            w.stalled = Duration::ZERO;
        } else {
            w.stalled = w.stalled.saturating_add(elapsed);
        }
        let request = read.saturating_sub(request_start);
        if reading && request > 0 {
            w.waited = w.waited.saturating_add(elapsed);
        }
        w.read = read;
        w.written = written;
        if let Some(idle) = limits.idle
            && w.stalled > idle
        {
            return Some(Cut::Idle(idle));
        }
        match limits.min_rate {
            Some(rate) if request > 0 && w.waited > rate.allowance(request) => Some(Cut::TooSlow {
                bytes: request,
                waited: w.waited,
                rate,
            }),
            _ => None,
        }
    }
}

impl Activity {
    /// How long the connection has waited on its peer between units (nothing of a request in
    /// progress, no reply waiting to be read), as of the reaper's last look; `None` if it is
    /// doing something: computing, sending, or in the middle of a request.
    fn idleness(&self) -> Option<Duration> {
        let reading = self.reading.load(Ordering::Relaxed) > 0;
        let writing = self.writing.load(Ordering::Relaxed) > 0;
        let read = self.read.load(Ordering::Relaxed);
        let request_start = self.request_start.load(Ordering::Relaxed);
        if !reading || writing || read > request_start {
            return None;
        }
        let w = self.watch.lock().unwrap_or_else(|e| e.into_inner());
        // Seen waiting, with nothing moving, over at least one look of the reaper: a client
        // that has just connected (its first bytes may be on their way) is not idle yet.
        (w.stalled > Duration::ZERO).then_some(w.stalled)
    }
}

/// Which way a timed-out call went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Read = 0,
    Write = 1,
}

/// What a read or write through a [`Stream`] fails with when the socket's own timeout
/// (`SO_RCVTIMEO` / `SO_SNDTIMEO`) expires: an `io::Error` of kind `TimedOut` (not the
/// `WouldBlock` the OS reports, which reads as "try again") that says what happened.
#[derive(Debug)]
pub(crate) struct StreamTimeout {
    pub(crate) direction: Direction,
    /// The socket's timeout, when it could be read back.
    pub(crate) after: Option<Duration>,
}

impl fmt::Display for StreamTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.direction, self.after) {
            (Direction::Read, Some(t)) => write!(f, "no data for {t:?} (read timeout)"),
            (Direction::Read, None) => f.write_str("no data within the read timeout"),
            (Direction::Write, Some(t)) => {
                write!(f, "peer read nothing for {t:?} (write timeout)")
            }
            (Direction::Write, None) => f.write_str("peer read nothing within the write timeout"),
        }
    }
}

impl std::error::Error for StreamTimeout {}

/// The largest write handed to the kernel in one call when activity is tracked: a blocking
/// write returns only once all of it is queued, so this bounds how much the peer must read
/// before the reaper sees progress (64 KiB per idle timeout, about 1 KiB/s at the default:
/// a slow reader is fine, one that reads nothing is not).
const WRITE_CHUNK: usize = 64 * 1024;

/// Writes a formatted message with one `write_all`, so that it leaves in one segment:
/// `write!` would otherwise hand each formatted piece to the socket on its own, and with
/// Nagle's algorithm on, the second small segment waits for the peer's delayed ACK (40 ms).
pub(crate) fn write_fmt_once<W: Write + ?Sized>(
    w: &mut W,
    args: fmt::Arguments<'_>,
) -> io::Result<()> {
    if let Some(s) = args.as_str() {
        return w.write_all(s.as_bytes());
    }
    let mut text = String::new();
    fmt::write(&mut text, args)
        .map_err(|_| io::Error::other("a formatting trait implementation returned an error"))?;
    w.write_all(text.as_bytes())
}

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// The peer process of a Unix-domain connection, as the kernel reports it (`SO_PEERCRED`).
/// Linux only.
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
#[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
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
#[cfg(all(target_os = "linux", not(socketserver_portable)))]
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
        Stream {
            inner: Arc::new(Inner {
                sock,
                activity: track_activity.then(Activity::new),
                cut: AtomicBool::new(false),
                parked: AtomicBool::new(false),
                timeouts_ns: [AtomicU64::new(0), AtomicU64::new(0)],
                moved: [AtomicU64::new(0), AtomicU64::new(0)],
                #[cfg(feature = "tls")]
                tls: OnceLock::new(),
                outbox: OnceLock::new(),
            }),
        }
    }

    pub(crate) fn tcp(s: TcpStream, track_activity: bool) -> Stream {
        Stream::new(Sock::Tcp(s), track_activity)
    }

    pub(crate) fn unix(s: UnixStream, track_activity: bool) -> Stream {
        Stream::new(Sock::Unix(s), track_activity)
    }

    /// The TCP socket, if this is a TCP connection. Reads and writes made on it directly are
    /// invisible to [`Builder::idle_timeout`](crate::Builder::idle_timeout) and
    /// [`Builder::min_data_rate`](crate::Builder::min_data_rate) (only those through the
    /// `Stream` count), and a timeout there fails with the OS's bare `WouldBlock`.
    ///
    /// `None` on a TLS connection (feature `tls`): bytes written there would bypass the
    /// session, in plaintext.
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        #[cfg(feature = "tls")]
        if self.inner.tls.get().is_some() {
            return None;
        }
        match &self.inner.sock {
            Sock::Tcp(s) => Some(s),
            Sock::Unix(_) => None,
        }
    }

    /// The Unix-domain socket, if this is a Unix-domain connection. As with
    /// [`as_tcp`](Self::as_tcp), direct reads and writes are invisible to the idle timeout and
    /// the minimum data rate. `None` on a TLS connection, as for `as_tcp`.
    pub fn as_unix(&self) -> Option<&UnixStream> {
        #[cfg(feature = "tls")]
        if self.inner.tls.get().is_some() {
            return None;
        }
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

    /// Sets how long a read may block (`SO_RCVTIMEO`); `None` blocks forever. A read through the
    /// `Stream` that times out fails with an `io::Error` of kind `TimedOut` saying "no data for
    /// 30s" (the OS's `WouldBlock` would read as "try again"); `socketserver::Error::from(e)`
    /// turns it into an error whose [`is_timeout`](crate::Error::is_timeout) is true.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }?;
        self.remember_timeout(Direction::Read, t);
        Ok(())
    }

    /// Sets how long a write may block (`SO_SNDTIMEO`); `None` blocks forever. A write that
    /// times out fails with kind `TimedOut`, like a read.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }?;
        self.remember_timeout(Direction::Write, t);
        Ok(())
    }

    fn remember_timeout(&self, direction: Direction, t: Option<Duration>) {
        let ns = t.map_or(0, |t| u64::try_from(t.as_nanos()).unwrap_or(u64::MAX));
        self.inner.timeouts_ns[direction as usize].store(ns, Ordering::Relaxed);
    }

    /// The timeout of `direction` as it was set, else as the kernel reports it.
    fn timeout_of(&self, direction: Direction) -> Option<Duration> {
        match self.inner.timeouts_ns[direction as usize].load(Ordering::Relaxed) {
            0 => match direction {
                Direction::Read => self.read_timeout(),
                Direction::Write => self.write_timeout(),
            }
            .ok()
            .flatten(),
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// The current read timeout.
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.read_timeout(),
            Sock::Unix(s) => s.read_timeout(),
        }
    }

    /// The current write timeout.
    pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.write_timeout(),
            Sock::Unix(s) => s.write_timeout(),
        }
    }

    /// Disables Nagle's algorithm (`TCP_NODELAY`) on TCP; Unix sockets have nothing to disable,
    /// so this succeeds without effect there. Accepted TCP connections start with it on; see
    /// [`Builder::nodelay`](crate::Builder::nodelay).
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

    /// The credentials of the peer process of a Unix-domain connection (`SO_PEERCRED`);
    /// `None` for TCP. Linux only.
    #[cfg(all(target_os = "linux", not(socketserver_portable)))]
    #[cfg_attr(docsrs, doc(cfg(target_os = "linux")))]
    pub fn peer_credentials(&self) -> Option<Credentials> {
        if let Sock::Unix(s) = &self.inner.sock {
            return peer_cred(s.as_fd()).ok();
        }
        None
    }

    /// One look by the reaper (see [`Activity::check`]); `None` for an untracked stream.
    pub(crate) fn check_activity(&self, elapsed: Duration, limits: &ActivityLimits) -> Option<Cut> {
        self.inner.activity.as_ref()?.check(elapsed, limits)
    }

    /// A unit of input (a line, a message) has been read whole, `unconsumed` bytes of what
    /// was read already after it: the minimum data rate judges only the unit in progress, so
    /// the silence before the next one is not a slow request.
    pub(crate) fn unit_done(&self, unconsumed: usize) {
        if let Some(a) = &self.inner.activity {
            let read = a.read.load(Ordering::Relaxed);
            a.request_start
                .store(read.saturating_sub(unconsumed as u64), Ordering::Relaxed);
        }
    }

    /// How long the connection has been idle between units, for the pressure policy (see
    /// [`Activity::idleness`]); `None` when it is busy or untracked, or already cut.
    pub(crate) fn idleness(&self) -> Option<Duration> {
        // Output still queued for it (event mode) is work, not idleness.
        if self.was_cut() || self.wants_writable() {
            return None;
        }
        self.inner.activity.as_ref()?.idleness()
    }

    /// Bytes read and written through this stream (and its clones) so far.
    pub(crate) fn bytes_moved(&self) -> (u64, u64) {
        match &self.inner.activity {
            Some(a) => (
                a.read.load(Ordering::Relaxed),
                a.written.load(Ordering::Relaxed),
            ),
            None => (
                self.inner.moved[0].load(Ordering::Relaxed),
                self.inner.moved[1].load(Ordering::Relaxed),
            ),
        }
    }

    /// Marks the socket as cut by the server; true the first time only.
    pub(crate) fn mark_cut(&self) -> bool {
        !self.inner.cut.swap(true, Ordering::Relaxed)
    }

    /// Whether the server has cut this connection (idle or too slow): the handler's failures
    /// after that are the cut's echo, already reported.
    pub(crate) fn was_cut(&self) -> bool {
        self.inner.cut.load(Ordering::Relaxed)
    }

    /// Runs one read or write system call, counting it for the reaper when tracked, and turns
    /// the socket timeout's `WouldBlock` into a `TimedOut` that says so.
    #[inline]
    fn io(
        &self,
        direction: Direction,
        call: impl FnOnce(&Sock) -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.counted(direction, call)
            .map_err(|e| self.timed_out(e, direction))
    }

    /// [`io`](Self::io) without the timeout's translation, for calls that do not wait.
    #[inline]
    fn counted(
        &self,
        direction: Direction,
        call: impl FnOnce(&Sock) -> io::Result<usize>,
    ) -> io::Result<usize> {
        match &self.inner.activity {
            None => {
                let result = call(&self.inner.sock);
                if let Ok(n) = result {
                    self.inner.moved[direction as usize].fetch_add(n as u64, Ordering::Relaxed);
                }
                result
            }
            Some(a) => {
                let (blocked, moved) = match direction {
                    Direction::Read => (&a.reading, &a.read),
                    Direction::Write => (&a.writing, &a.written),
                };
                blocked.fetch_add(1, Ordering::Relaxed);
                let result = call(&self.inner.sock);
                if let Ok(n) = result {
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    if direction == Direction::Write {
                        let read = a.read.load(Ordering::Relaxed);
                        a.request_start.store(read, Ordering::Relaxed);
                    }
                }
                blocked.fetch_sub(1, Ordering::Relaxed);
                result
            }
        }
    }

    /// On a blocking socket, `WouldBlock` can only be the socket timeout expiring.
    #[cold]
    fn timed_out(&self, e: io::Error, direction: Direction) -> io::Error {
        if e.kind() != io::ErrorKind::WouldBlock || self.inner.outbox.get().is_some() {
            return e;
        }
        let nonblocking = rustix::fs::fcntl_getfl(self)
            .map_or(true, |f| f.contains(rustix::fs::OFlags::NONBLOCK));
        if nonblocking {
            return e;
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            StreamTimeout {
                direction,
                after: self.timeout_of(direction),
            },
        )
    }

    /// At most [`WRITE_CHUNK`] bytes of `buf` when activity is tracked.
    #[inline]
    fn chunk<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        match &self.inner.activity {
            Some(_) if buf.len() > WRITE_CHUNK => &buf[..WRITE_CHUNK],
            _ => buf,
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

impl Stream {
    /// Like [`read_spare`](Self::read_spare), without waiting (`MSG_DONTWAIT`): `WouldBlock`
    /// when the socket has nothing.
    pub(crate) fn recv_spare_nonblocking(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(t) = self.inner.tls.get() {
            return t.read_spare(
                &Plain {
                    stream: self,
                    now: true,
                },
                buf,
            );
        }
        self.recv_spare_nonblocking_plain(buf)
    }

    /// Event mode, on parking: a TLS session gives back its empty buffers.
    pub(crate) fn park_buffers(&self) {
        #[cfg(feature = "tls")]
        if let Some(t) = self.inner.tls.get() {
            t.park();
        }
    }

    /// Whether a read of `n` bytes into `room` left nothing to read: a short read of the socket
    /// proves it empty, but under TLS rustls may hold decrypted records no new byte will
    /// signal, so the session tells.
    pub(crate) fn read_emptied(&self, n: usize, room: usize) -> bool {
        #[cfg(feature = "tls")]
        if let Some(t) = self.inner.tls.get() {
            return t.drained();
        }
        n < room
    }

    /// [`recv_spare_nonblocking`](Self::recv_spare_nonblocking) on the socket itself.
    fn recv_spare_nonblocking_plain(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        use rustix::net::{RecvFlags, recv};
        self.counted(Direction::Read, |sock| {
            let fd = match sock {
                Sock::Tcp(s) => s.as_fd(),
                Sock::Unix(s) => s.as_fd(),
            };
            recv(fd, rustix::buffer::spare_capacity(buf), RecvFlags::DONTWAIT)
                .map(|(n, _)| n)
                .map_err(io::Error::from)
        })
    }

    /// Marks an event-mode connection as parked (waiting for its next message, on no thread)
    /// or not. A parked connection counts as blocked on its peer for the idle timeout and the
    /// minimum data rate, as a thread blocked in a read would.
    pub(crate) fn set_parked(&self, parked: bool) {
        if self.inner.parked.swap(parked, Ordering::SeqCst) == parked {
            return;
        }
        if let Some(a) = &self.inner.activity {
            match parked {
                true => a.reading.fetch_add(1, Ordering::Relaxed),
                false => a.reading.fetch_sub(1, Ordering::Relaxed),
            };
        }
    }

    /// Whether the connection is parked (see [`set_parked`](Self::set_parked)).
    pub(crate) fn is_parked(&self) -> bool {
        self.inner.parked.load(Ordering::SeqCst)
    }

    /// Reads into the spare capacity of `buf`, appending, without initialising it first.
    ///
    /// A `std::io::BufReader` over any reader but std's own sockets and files zeroes its whole
    /// buffer on the first fill (stable Rust has no way to read into uninitialised memory
    /// through `Read`), which makes every page of an idle connection's buffer resident. Read
    /// directly, only the pages the kernel writes to are touched.
    pub(crate) fn read_spare(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(t) = self.inner.tls.get() {
            return t.read_spare(&self.plain(), buf);
        }
        self.read_spare_plain(buf)
    }

    /// [`read_spare`](Self::read_spare) on the socket itself, under TLS too.
    #[inline]
    fn read_spare_plain(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        self.io(Direction::Read, |sock| {
            let fd = match sock {
                Sock::Tcp(s) => s.as_fd(),
                Sock::Unix(s) => s.as_fd(),
            };
            rustix::io::read(fd, rustix::buffer::spare_capacity(buf)).map_err(io::Error::from)
        })
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(t) = self.inner.tls.get() {
            return t.read(&self.plain(), buf);
        }
        self.io(Direction::Read, |sock| match sock {
            Sock::Tcp(s) => (&*s).read(buf),
            Sock::Unix(s) => (&*s).read(buf),
        })
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(t) = self.inner.tls.get() {
            let first = bufs.iter_mut().find(|b| !b.is_empty());
            return first.map_or(Ok(0), |b| t.read(&self.plain(), b));
        }
        self.io(Direction::Read, |sock| match sock {
            Sock::Tcp(s) => (&*s).read_vectored(bufs),
            Sock::Unix(s) => (&*s).read_vectored(bufs),
        })
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.hold(buf) {
            return Ok(buf.len());
        }
        #[cfg(feature = "tls")]
        if let Some(t) = self.inner.tls.get() {
            return t.write(&self.plain(), buf);
        }
        self.write_plain(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if let Some(b) = bufs.iter().find(|b| !b.is_empty())
            && self.hold(b)
        {
            return Ok(b.len());
        }
        #[cfg(feature = "tls")]
        if let Some(t) = self.inner.tls.get() {
            return t.write_vectored(&self.plain(), bufs);
        }
        self.write_vectored_plain(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn write_fmt(&mut self, args: fmt::Arguments<'_>) -> io::Result<()> {
        write_fmt_once(self, args)
    }
}

impl Stream {
    /// A write on the socket itself, under TLS too.
    #[inline]
    fn write_plain(&self, buf: &[u8]) -> io::Result<usize> {
        if let Some(o) = self.inner.outbox.get() {
            return self.queue(o, buf);
        }
        let buf = self.chunk(buf);
        self.io(Direction::Write, |sock| match sock {
            Sock::Tcp(s) => (&*s).write(buf),
            Sock::Unix(s) => (&*s).write(buf),
        })
    }

    fn write_vectored_plain(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.inner.outbox.get().is_some() {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return self.write_plain(first);
        }
        if self.inner.activity.is_some()
            && bufs.iter().map(|b| b.len()).sum::<usize>() > WRITE_CHUNK
        {
            // Partial writes are allowed: the first non-empty slice, chunked.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return self.write_plain(first);
        }
        self.io(Direction::Write, |sock| match sock {
            Sock::Tcp(s) => (&*s).write_vectored(bufs),
            Sock::Unix(s) => (&*s).write_vectored(bufs),
        })
    }
}

/// Appends to a queue in steps of [`KEEP_OUTBOX`], not by doubling: what a connection holds
/// stays close to what it has queued, which the event loop bounds.
fn queue_bytes(wire: &mut Vec<u8>, buf: &[u8]) {
    let want = wire.len() + buf.len();
    if want > wire.capacity() {
        wire.reserve_exact(want.next_multiple_of(KEEP_OUTBOX) - wire.len());
    }
    wire.extend_from_slice(buf);
}

/// Event mode's non-blocking output (see [`Outbox`]).
impl Stream {
    /// Event mode: makes the socket non-blocking and every write through the stream queue
    /// what the socket cannot take now, instead of waiting.
    pub(crate) fn set_queued(&self) -> io::Result<()> {
        rustix::io::ioctl_fionbio(self, true)?;
        let _ = self.inner.outbox.set(Box::new(Outbox {
            state: Mutex::new(OutState::default()),
            pending: AtomicBool::new(false),
        }));
        Ok(())
    }

    fn out_state(o: &Outbox) -> std::sync::MutexGuard<'_, OutState> {
        o.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `buf` back while a message is served; false when nothing is held.
    fn hold(&self, buf: &[u8]) -> bool {
        let Some(o) = self.inner.outbox.get() else {
            return false;
        };
        let mut st = Stream::out_state(o);
        if st.holding {
            st.held.extend_from_slice(buf);
        }
        st.holding
    }

    /// Sends what it can of `buf` now, after whatever is already queued, and queues the rest.
    fn queue(&self, o: &Outbox, buf: &[u8]) -> io::Result<usize> {
        let mut st = Stream::out_state(o);
        if !st.wire.is_empty() {
            queue_bytes(&mut st.wire, buf);
            return Ok(buf.len());
        }
        o.pending.store(true, Ordering::SeqCst);
        let sent = match self.send_now(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                o.pending.store(false, Ordering::SeqCst);
                return Err(e);
            }
        };
        if sent < buf.len() {
            queue_bytes(&mut st.wire, &buf[sent..]);
        } else {
            o.pending.store(false, Ordering::SeqCst);
        }
        Ok(buf.len())
    }

    /// One send that does not wait (and raises no SIGPIPE), counted.
    fn send_now(&self, buf: &[u8]) -> io::Result<usize> {
        use rustix::net::send;
        loop {
            let r = self.counted(Direction::Write, |sock| {
                let fd = match sock {
                    Sock::Tcp(s) => s.as_fd(),
                    Sock::Unix(s) => s.as_fd(),
                };
                send(fd, buf, crate::deadline::SEND_NOW).map_err(io::Error::from)
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    /// Event mode: starts holding the output of a message (see [`release_output`]).
    ///
    /// [`release_output`]: Self::release_output
    pub(crate) fn hold_output(&self) {
        if let Some(o) = self.inner.outbox.get() {
            Stream::out_state(o).holding = true;
        }
    }

    /// Event mode: the message is served; what it wrote goes out (through TLS, if any).
    pub(crate) fn release_output(&self) -> io::Result<()> {
        let Some(o) = self.inner.outbox.get() else {
            return Ok(());
        };
        let mut held = {
            let mut st = Stream::out_state(o);
            st.holding = false;
            std::mem::take(&mut st.held)
        };
        let result = if held.is_empty() {
            Ok(())
        } else {
            (&*self).write_all(&held)
        };
        if held.capacity() <= KEEP_OUTBOX {
            held.clear();
            let mut st = Stream::out_state(o);
            if st.held.capacity() == 0 {
                st.held = held;
            }
        }
        result
    }

    /// Event mode: the message is taken back (it needs input that has not come): what it
    /// wrote is dropped, unsent.
    pub(crate) fn discard_output(&self) {
        if let Some(o) = self.inner.outbox.get() {
            let mut st = Stream::out_state(o);
            st.holding = false;
            st.held.clear();
        }
    }

    /// Event mode: sends what is queued, as far as the socket takes it now. The bytes still
    /// queued after it (0: all sent).
    pub(crate) fn flush_output(&self) -> io::Result<usize> {
        let Some(o) = self.inner.outbox.get() else {
            return Ok(0);
        };
        let mut st = Stream::out_state(o);
        if st.wire.is_empty() {
            return Ok(0);
        }
        o.pending.store(true, Ordering::SeqCst);
        let mut sent = 0;
        let result = loop {
            if sent == st.wire.len() {
                break Ok(());
            }
            match self.send_now(&st.wire[sent..]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        st.wire.drain(..sent);
        if st.wire.is_empty() {
            if st.wire.capacity() > KEEP_OUTBOX {
                st.wire = Vec::new();
            }
            o.pending.store(false, Ordering::SeqCst);
        }
        result.map(|()| st.wire.len())
    }

    /// Event mode: whether output waits for the socket (or a send is under way), so that a
    /// writable event has something to do. No lock: one atomic load.
    pub(crate) fn wants_writable(&self) -> bool {
        self.inner
            .outbox
            .get()
            .is_some_and(|o| o.pending.load(Ordering::SeqCst))
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

    fn write_fmt(&mut self, args: fmt::Arguments<'_>) -> io::Result<()> {
        write_fmt_once(self, args)
    }
}

/// The socket under a TLS session, with the `Stream`'s accounting and timeouts; its reads wait
/// for the peer unless `now` (event mode, where `WouldBlock` parks the connection).
#[cfg(feature = "tls")]
struct Plain<'a> {
    stream: &'a Stream,
    now: bool,
}

#[cfg(feature = "tls")]
impl crate::tls::session::Raw for Plain<'_> {
    fn read_raw(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self.now {
            true => self.stream.recv_spare_nonblocking_plain(buf),
            false => self.stream.read_spare_plain(buf),
        }
    }

    fn write_raw(&self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write_plain(buf)
    }
}

#[cfg(feature = "tls")]
impl Stream {
    /// The socket under this stream's TLS session, reads waiting for the peer.
    fn plain(&self) -> Plain<'_> {
        Plain {
            stream: self,
            now: false,
        }
    }
}

#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
impl Stream {
    /// What was negotiated on this connection, if it is a TLS one (feature `tls`): version,
    /// cipher suite, SNI, ALPN, the client's certificates.
    pub fn tls(&self) -> Option<&crate::TlsInfo> {
        self.inner.tls.get().map(|t| t.info())
    }

    /// Moves a session whose handshake is done into the stream.
    pub(crate) fn set_tls(&self, session: crate::tls::session::Session) {
        let _ = self.inner.tls.set(Box::new(session));
    }

    /// The TLS session, for the admission stages that follow the handshake.
    pub(crate) fn tls_session(&self) -> Option<&crate::tls::session::Session> {
        self.inner.tls.get().map(|b| &**b)
    }

    /// Sends `close_notify` on a TLS connection, without blocking: the server finished with it
    /// cleanly. (A socket too full to take it is one the peer is not reading anyway.)
    pub(crate) fn close_notify(&self) {
        struct NoWait<'a>(&'a Stream);
        impl crate::tls::session::Raw for NoWait<'_> {
            fn read_raw(&self, _: &mut Vec<u8>) -> io::Result<usize> {
                Ok(0)
            }
            fn write_raw(&self, buf: &[u8]) -> io::Result<usize> {
                if let Some(o) = self.0.inner.outbox.get() {
                    // After what is queued, in order.
                    return self.0.queue(o, buf);
                }
                rustix::net::send(self.0, buf, crate::deadline::SEND_NOW).map_err(io::Error::from)
            }
        }
        if let Some(t) = self.inner.tls.get()
            && !self.was_cut()
            && let Err(e) = t.close_notify(&NoWait(self))
        {
            log::debug!("close_notify not sent: {e}");
        }
    }
}
