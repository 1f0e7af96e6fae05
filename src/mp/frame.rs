//! Python's `multiprocessing.connection` message framing: a 4-byte big-endian signed length,
//! then the payload; over 2 GiB − 1, the length is `-1` followed by an 8-byte big-endian one.
//! Every read is bounded by a maximum checked before anything is allocated.
//!
//! Only `send_bytes` / `recv_bytes` are provided: `send()` / `recv()` in Python pickle objects,
//! and unpickling data from the network is out of scope (and unsafe in Python too). The
//! handshake that precedes the messages lives with the other handshake, in `auth/mp.rs`.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::error::Kind;
use crate::log_limit::limited;
use crate::{Addr, Error, Result};

/// The default largest message [`MpConnection::recv_bytes`] accepts: 64 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The capacity of the process-wide [`MpBudget`] that every [`MpConnection`] draws on unless
/// given another: 256 MiB.
pub const DEFAULT_MP_BUDGET: usize = 256 * 1024 * 1024;

/// How much of a message is read (and taken from the budget) at a time.
const CHUNK: usize = 64 * 1024;

/// A budget of memory for messages being received, shared by the [`MpConnection`]s that draw
/// on it: the bytes of every partly received message are taken from it as they arrive (64 KiB
/// at a time) and given back when the message is complete or its read fails.
///
/// Without it, memory is bounded per message ([`MpConnection::with_max_message`]) but not
/// across connections: 32 authenticated clients, each sending 60 MiB of a declared 64 MiB
/// message and then nothing, held 2 GB. With it they hold at most the budget; a message that
/// finds no room is refused with an [`is_too_large`](Error::is_too_large) error (logged,
/// rate-limited), so the connection that sent it can be closed.
///
/// The budget never refuses the only message in flight, so one message up to `max_message`
/// always gets through, whatever the budget. Every connection draws on one process-wide budget
/// of [`DEFAULT_MP_BUDGET`] bytes unless [`MpConnection::with_budget`] gives it another; clones
/// share their budget.
///
/// ```
/// use socketserver::{MpBudget, MpConnection};
/// # let stream = std::io::Cursor::new(Vec::<u8>::new());
///
/// let budget = MpBudget::new(32 * 1024 * 1024); // shared by the connections given a clone
/// let conn = MpConnection::new(stream).with_budget(budget.clone());
/// assert_eq!(budget.in_use(), 0);
/// ```
#[derive(Clone)]
pub struct MpBudget {
    inner: Arc<BudgetInner>,
}

struct BudgetInner {
    capacity: usize,
    in_use: AtomicUsize,
}

impl MpBudget {
    /// A budget of `bytes`, shared by the connections given a clone of it.
    pub fn new(bytes: usize) -> MpBudget {
        MpBudget {
            inner: Arc::new(BudgetInner {
                capacity: bytes,
                in_use: AtomicUsize::new(0),
            }),
        }
    }

    /// The process-wide budget of [`DEFAULT_MP_BUDGET`] bytes that connections draw on by
    /// default.
    pub fn process_default() -> MpBudget {
        static DEFAULT: OnceLock<MpBudget> = OnceLock::new();
        DEFAULT
            .get_or_init(|| MpBudget::new(DEFAULT_MP_BUDGET))
            .clone()
    }

    /// The most bytes partly received messages may hold together.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// The bytes partly received messages hold now.
    pub fn in_use(&self) -> usize {
        self.inner.in_use.load(Ordering::Relaxed)
    }

    /// Takes `more` bytes for a message that already holds `held`: granted if they fit, or if
    /// no other message holds any.
    fn take(&self, held: usize, more: usize) -> bool {
        let capacity = self.inner.capacity;
        self.inner
            .in_use
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                let after = used.checked_add(more)?;
                (after <= capacity || used == held).then_some(after)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.inner.in_use.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl fmt::Debug for MpBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpBudget")
            .field("capacity", &self.capacity())
            .field("in_use", &self.in_use())
            .finish()
    }
}

/// What one message being received holds of a budget; given back when dropped, however the
/// read ends.
struct Reservation<'a> {
    budget: &'a MpBudget,
    held: usize,
}

impl Reservation<'_> {
    fn grow(&mut self, more: usize) -> bool {
        let granted = self.budget.take(self.held, more);
        if granted {
            self.held += more;
        }
        granted
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

/// A framed connection speaking `multiprocessing.connection`'s message format: a 4-byte
/// big-endian length, or `-1` and an 8-byte length for messages over 2 GiB − 1, then the bytes.
///
/// It wraps any stream: a [`TcpStream`](std::net::TcpStream) from
/// [`mp_connect`](crate::mp_connect), a server's [`Request::stream`](crate::Request::stream)
/// after the [`Auth::multiprocessing`](crate::Auth::multiprocessing) handshake, a Unix socket.
/// Messages are raw bytes, as Python's `send_bytes` / `recv_bytes` see them. Python's
/// `send` / `recv` pickle objects; unpickling is not provided (it runs arbitrary code from the
/// peer), so agree on a format of your own (JSON, bincode, ...) and send it as bytes.
///
/// A client (Python: `Listener(("127.0.0.1", 6000), authkey=b"secret")` on the other end):
///
/// ```no_run
/// use socketserver::{MpConnection, mp_connect};
/// use std::time::Duration;
///
/// let mut conn = mp_connect("127.0.0.1:6000", b"secret", Duration::from_secs(5))?;
/// conn.send_bytes(b"hello")?;
/// let reply = conn.recv_bytes()?;
/// # Ok::<(), socketserver::Error>(())
/// ```
///
/// A server handler, for a server built with
/// `.auth(Auth::multiprocessing(b"secret".to_vec()))`; Python's
/// `Client(("127.0.0.1", 6000), authkey=b"secret")` talks to it:
///
/// ```
/// use socketserver::{Handler, HandlerResult, MpConnection, Request};
///
/// struct Echo;
///
/// impl Handler for Echo {
///     fn handle(&mut self, req: &mut Request) -> HandlerResult {
///         let mut conn = MpConnection::new(req.stream());
///         loop {
///             match conn.recv_bytes() {
///                 Ok(m) => conn.send_bytes(&m)?,
///                 // The client closed the connection between messages.
///                 Err(e) if e.is_eof() => return Ok(()),
///                 Err(e) => return Err(e.into()),
///             }
///         }
///     }
/// }
/// ```
#[derive(Debug)]
pub struct MpConnection<S> {
    pub(crate) stream: S,
    max_message: usize,
    budget: MpBudget,
    pub(crate) peer: Option<Addr>,
}

impl<S: Read + Write> MpConnection<S> {
    /// Frames `stream`, accepting messages up to [`DEFAULT_MAX_MESSAGE`] bytes, received within
    /// the process-wide [`MpBudget`].
    pub fn new(stream: S) -> Self {
        MpConnection {
            stream,
            max_message: DEFAULT_MAX_MESSAGE,
            budget: MpBudget::process_default(),
            peer: None,
        }
    }

    /// Receives messages within `budget`, shared with the other connections given a clone of
    /// it, instead of the process-wide one.
    pub fn with_budget(mut self, budget: MpBudget) -> Self {
        self.budget = budget;
        self
    }

    /// The budget this connection receives messages within.
    pub fn budget(&self) -> &MpBudget {
        &self.budget
    }

    /// Sets the largest message `recv_bytes` accepts; a longer length prefix is an error, found
    /// before anything is allocated.
    pub fn with_max_message(mut self, max: usize) -> Self {
        self.max_message = max;
        self
    }

    /// Names the peer in errors.
    pub fn with_peer(mut self, peer: Addr) -> Self {
        self.peer = Some(peer);
        self
    }

    /// The largest message `recv_bytes` accepts.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, mutably. Reading or writing it directly breaks the framing.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> S {
        self.stream
    }

    fn io_err(&self, e: io::Error) -> Error {
        Error::io(self.peer.as_ref(), e)
    }

    /// Sends one message (Python's `send_bytes`).
    pub fn send_bytes(&mut self, buf: &[u8]) -> Result<()> {
        let r = write_frame(&mut self.stream, buf);
        r.map_err(|e| self.io_err(e))
    }

    /// Receives one message (Python's `recv_bytes`).
    ///
    /// A length over the maximum is an [`is_too_large`](Error::is_too_large) error, found
    /// before anything is allocated; so is a message that finds no room left in the connection's
    /// [`MpBudget`] as it arrives. A negative length other than `-1`, or end of file inside
    /// a message, an [`is_bad_message`](Error::is_bad_message) one. End of file where a message
    /// would start (the peer closed the connection, Python's `EOFError`) is an
    /// [`is_io`](Error::is_io) error whose [`io_error`](Error::io_error) has kind
    /// [`UnexpectedEof`](io::ErrorKind::UnexpectedEof). After any error the connection is out
    /// of step and should be dropped.
    pub fn recv_bytes(&mut self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.recv_bytes_into(&mut v)?;
        Ok(v)
    }

    /// Receives one message into `buf` (cleared first), reusing its allocation.
    pub fn recv_bytes_into(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        let limits = Limits {
            max: self.max_message,
            budget: Some(&self.budget),
            peer: self.peer.as_ref(),
        };
        let r = read_frame(&mut self.stream, buf, limits);
        r.map_err(|e| e.with_addr(self.peer.as_ref()))
    }
}

pub(crate) fn write_frame<W: Write>(w: &mut W, buf: &[u8]) -> io::Result<()> {
    let n = buf.len();
    if n > 0x7fff_ffff {
        let mut header = [0u8; 12];
        header[..4].copy_from_slice(&(-1i32).to_be_bytes());
        header[4..].copy_from_slice(&(n as u64).to_be_bytes());
        w.write_all(&header)?;
        w.write_all(buf)
    } else if n > 16384 {
        w.write_all(&(n as i32).to_be_bytes())?;
        w.write_all(buf)
    } else {
        // One write for header and payload, as Python does (bpo-20540): no Nagle stall.
        let mut frame = Vec::with_capacity(4 + n);
        frame.extend_from_slice(&(n as i32).to_be_bytes());
        frame.extend_from_slice(buf);
        w.write_all(&frame)
    }
}

/// Reads until `buf` is full or the stream ends; returns how many bytes arrived.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn truncated(detail: String) -> Error {
    Error::new(Kind::BadMessage).with_detail(detail)
}

/// What bounds one message read.
pub(crate) struct Limits<'a> {
    /// The largest message accepted.
    pub max: usize,
    /// What the bytes of a partly received message are taken from; `None` for messages too
    /// small to matter (the handshake's).
    pub budget: Option<&'a MpBudget>,
    /// Who sends, for the log line of a refused message.
    pub peer: Option<&'a Addr>,
}

impl Limits<'_> {
    /// Bounded by `max` alone.
    pub(crate) fn max(max: usize) -> Limits<'static> {
        Limits {
            max,
            budget: None,
            peer: None,
        }
    }
}

/// Python's `_recv_bytes`, stricter: a negative length other than `-1` is an error (Python
/// reads it as an empty message), and so is a length over `max`, before anything is allocated.
/// End of file before the first byte of a message is an I/O error of kind `UnexpectedEof`
/// (Python's `EOFError`); end of file inside a message is a bad message (Python's
/// "got end of file during message").
pub(crate) fn read_frame<R: Read>(r: &mut R, buf: &mut Vec<u8>, limits: Limits<'_>) -> Result<()> {
    buf.clear();
    let mut header = [0u8; 4];
    match read_full(r, &mut header).map_err(|e| Error::io(None, e))? {
        4 => {}
        0 => {
            return Err(Error::io(
                None,
                io::Error::new(io::ErrorKind::UnexpectedEof, "end of file before a message"),
            ));
        }
        n => {
            return Err(truncated(format!(
                "length prefix truncated: {n} of 4 bytes"
            )));
        }
    }
    let size = match i32::from_be_bytes(header) {
        -1 => {
            let mut long = [0u8; 8];
            match read_full(r, &mut long).map_err(|e| Error::io(None, e))? {
                8 => u64::from_be_bytes(long),
                n => {
                    return Err(truncated(format!(
                        "8-byte length truncated: {n} of 8 bytes"
                    )));
                }
            }
        }
        n if n < 0 => {
            return Err(Error::new(Kind::BadMessage)
                .with_detail(format!("bad message length: negative length {n}")));
        }
        n => n as u64,
    };
    let max = limits.max;
    if size > max as u64 {
        return Err(Error::new(Kind::TooLarge).with_detail(format!(
            "bad message length: {size} bytes, more than the maximum of {max}"
        )));
    }
    let size = size as usize;
    let mut reservation = limits.budget.map(|budget| Reservation { budget, held: 0 });
    // Grow as bytes arrive, a chunk at a time, each taken from the budget before it is read:
    // a lying length prefix costs no more memory than what was sent, and all the connections
    // together hold no more than the budget.
    while buf.len() < size {
        let chunk = (size - buf.len()).min(CHUNK);
        if let Some(res) = &mut reservation
            && !res.grow(chunk)
        {
            let budget = res.budget;
            let e = Error::new(Kind::TooLarge).with_detail(format!(
                "no room for a message of {size} bytes after {} of them: the {} bytes of the \
                 in-flight budget are held by messages being received",
                buf.len(),
                budget.capacity()
            ));
            let from = limits
                .peer
                .map(|p| format!(" from {p}"))
                .unwrap_or_default();
            limited!(warn, "message{from} refused: {e}");
            return Err(e);
        }
        buf.reserve(chunk);
        let got = r
            .take(chunk as u64)
            .read_to_end(buf)
            .map_err(|e| Error::io(None, e))?;
        if got < chunk {
            return Err(truncated(format!(
                "message truncated: {} of {size} bytes",
                buf.len()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_match_python_layout() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"hello").unwrap();
        assert_eq!(wire, b"\x00\x00\x00\x05hello");
        write_frame(&mut wire, b"").unwrap();
        let mut c = MpConnection::new(io::Cursor::new(wire));
        assert_eq!(c.recv_bytes().unwrap(), b"hello");
        assert_eq!(c.recv_bytes().unwrap(), b"");
        let e = c.recv_bytes().unwrap_err();
        assert_eq!(e.io_error().unwrap().kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.is_io());
    }

    #[test]
    fn long_length_form_is_read() {
        // Python sends -1 and an 8-byte length only over 2 GiB - 1, but reads it for any size.
        let wire = b"\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x03abc".to_vec();
        let mut c = MpConnection::new(io::Cursor::new(wire));
        assert_eq!(c.recv_bytes().unwrap(), b"abc");
    }

    #[test]
    fn bad_lengths_are_rejected_without_allocating() {
        let mut buf = Vec::new();
        let mut c = MpConnection::new(io::Cursor::new(b"\xff\xff\xff\xfe".to_vec()));
        assert!(c.recv_bytes_into(&mut buf).unwrap_err().is_bad_message());
        let huge = [&[0xffu8; 4][..], &u64::MAX.to_be_bytes()].concat();
        let mut c = MpConnection::new(io::Cursor::new(huge));
        assert!(c.recv_bytes_into(&mut buf).unwrap_err().is_too_large());
        let mut c =
            MpConnection::new(io::Cursor::new(b"\x00\x00\x01\x00".to_vec())).with_max_message(255);
        assert!(c.recv_bytes_into(&mut buf).unwrap_err().is_too_large());
        assert_eq!(buf.capacity(), 0);
    }
}
