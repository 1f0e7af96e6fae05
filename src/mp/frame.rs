//! Python's `multiprocessing.connection` message framing: a 4-byte big-endian signed length,
//! then the payload; over 2 GiB − 1, the length is `-1` followed by an 8-byte big-endian one.
//! Every read is bounded by a maximum checked before anything is allocated.
//!
//! Only `send_bytes` / `recv_bytes` are provided: `send()` / `recv()` in Python pickle objects,
//! and unpickling data from the network is out of scope (and unsafe in Python too). The
//! handshake that precedes the messages lives with the other handshake, in `auth/mp.rs`.

use std::io::{self, Read, Write};

use crate::error::Kind;
use crate::{Addr, Error, Result};

/// The default largest message [`MpConnection::recv_bytes`] accepts: 64 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024 * 1024;

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
    pub(crate) peer: Option<Addr>,
}

impl<S: Read + Write> MpConnection<S> {
    /// Frames `stream`, accepting messages up to [`DEFAULT_MAX_MESSAGE`] bytes.
    pub fn new(stream: S) -> Self {
        MpConnection {
            stream,
            max_message: DEFAULT_MAX_MESSAGE,
            peer: None,
        }
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
    /// before anything is allocated; a negative length other than `-1`, or end of file inside
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
        let r = read_frame(&mut self.stream, buf, self.max_message);
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

/// Python's `_recv_bytes`, stricter: a negative length other than `-1` is an error (Python
/// reads it as an empty message), and so is a length over `max`, before anything is allocated.
/// End of file before the first byte of a message is an I/O error of kind `UnexpectedEof`
/// (Python's `EOFError`); end of file inside a message is a bad message (Python's
/// "got end of file during message").
pub(crate) fn read_frame<R: Read>(r: &mut R, buf: &mut Vec<u8>, max: usize) -> Result<()> {
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
    if size > max as u64 {
        return Err(Error::new(Kind::TooLarge).with_detail(format!(
            "bad message length: {size} bytes, more than the maximum of {max}"
        )));
    }
    let size = size as usize;
    // Grow as bytes arrive, so a lying length prefix costs no more memory than what was sent.
    buf.reserve(size.min(64 * 1024));
    let got = r
        .take(size as u64)
        .read_to_end(buf)
        .map_err(|e| Error::io(None, e))?;
    if got < size {
        return Err(truncated(format!(
            "message truncated: {got} of {size} bytes"
        )));
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
