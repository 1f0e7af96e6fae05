//! One server-side TLS session over an accepted socket: what a [`Stream`](crate::Stream) reads
//! and writes through once the handshake has run.
//!
//! A TLS session cannot be split into independent halves (reading may produce records to send,
//! a key update say, and every record takes the next sequence number), so the rustls state sits
//! behind a lock held only while bytes are copied or encrypted, never while the socket blocks.
//! Readers are serialised by the lock over the ciphertext read buffer, writers by the one over
//! the ciphertext write buffer, which is held until the records are on the wire, so records
//! leave in the order they were sealed. Lock order: `incoming`, `outgoing`, `conn` (a reader
//! that must answer the peer, a key update or an alert, drops `conn` and takes `outgoing`
//! first; writers never take `incoming`).
//!
//! The socket I/O itself is the caller's ([`Raw`]): a `Stream` passes its own accounted,
//! timed reads and writes, admission passes reads bounded by the handshake deadline, and event
//! mode passes reads that do not wait: a session then parks only once rustls holds no
//! plaintext and the socket has nothing (`WouldBlock`), since bytes rustls has already read
//! would never signal the connection again.

use std::io::{self, BufRead, Read, Write};
use std::sync::{Mutex, MutexGuard};

use rustls::pki_types::CertificateDer;
use rustls::{ProtocolVersion, ServerConnection, SupportedCipherSuite};

/// How ciphertext moves to and from the socket.
pub(crate) trait Raw {
    /// Appends what the socket has (blocking until something arrives) to the spare capacity of
    /// `buf`; 0 at end of file.
    fn read_raw(&self, buf: &mut Vec<u8>) -> io::Result<usize>;

    /// Writes some of `buf`, blocking until it can.
    fn write_raw(&self, buf: &[u8]) -> io::Result<usize>;
}

/// The most ciphertext read from the socket at once: one full TLS record and its header, so
/// that decrypting it never overflows rustls's plaintext buffer.
const READ_CHUNK: usize = 16 * 1024 + 256;

/// What was negotiated with the client: the protocol version, cipher suite, the server name it
/// asked for (SNI), the application protocol (ALPN) and its certificate chain, if it sent one.
///
/// From [`Stream::tls`](crate::Stream::tls) or [`Request::tls`](crate::Request::tls).
#[derive(Clone, Debug)]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub struct TlsInfo {
    version: Option<ProtocolVersion>,
    cipher_suite: Option<SupportedCipherSuite>,
    server_name: Option<String>,
    alpn: Option<Vec<u8>>,
    peer_certificates: Vec<CertificateDer<'static>>,
    resumed: bool,
}

impl TlsInfo {
    pub(crate) fn of(c: &ServerConnection) -> TlsInfo {
        TlsInfo {
            version: c.protocol_version(),
            cipher_suite: c.negotiated_cipher_suite(),
            server_name: c.server_name().map(str::to_owned),
            alpn: c.alpn_protocol().map(<[u8]>::to_vec),
            peer_certificates: c.peer_certificates().map(<[_]>::to_vec).unwrap_or_default(),
            resumed: matches!(c.handshake_kind(), Some(rustls::HandshakeKind::Resumed)),
        }
    }

    /// The protocol version, `TLSv1_3` or `TLSv1_2`.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// The cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub fn cipher_suite(&self) -> Option<SupportedCipherSuite> {
        self.cipher_suite
    }

    /// The host name the client asked for (SNI), if it sent one.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The application protocol agreed through ALPN, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The client's certificate chain, its own certificate first; empty when it sent none
    /// (which only a server with optional client certificates accepts). The chain was verified
    /// against the client CA bundle during the handshake.
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.peer_certificates
    }

    /// Whether the session was resumed (from a ticket or the session cache) rather than a full
    /// handshake.
    pub fn resumed(&self) -> bool {
        self.resumed
    }
}

/// A TLS session whose handshake is done.
pub(crate) struct Session {
    conn: Mutex<ServerConnection>,
    /// What was read and not yet taken; its lock serialises readers.
    incoming: Mutex<Incoming>,
    /// Sealed records on their way to the socket; its lock serialises writers.
    outgoing: Mutex<Vec<u8>>,
    info: TlsInfo,
}

/// Bytes read from the socket and not yet taken by a reader.
#[derive(Default)]
struct Incoming {
    /// Ciphertext not yet given to rustls.
    cipher: Vec<u8>,
    /// Plaintext decrypted for a look ([`Session::peek_now`]) and not yet read: readers take it
    /// before anything else.
    peeked: Vec<u8>,
    /// The last read of the socket returned less than it had room for: the socket had nothing
    /// more then, and whatever arrives since signals the connection anew.
    socket_emptied: bool,
}

impl Incoming {
    /// Reads the socket into `cipher`, noting whether that emptied it.
    fn read_socket(&mut self, raw: &impl Raw) -> io::Result<usize> {
        self.cipher.reserve_exact(READ_CHUNK);
        let room = self.cipher.capacity() - self.cipher.len();
        let n = raw.read_raw(&mut self.cipher)?;
        self.socket_emptied = n < room;
        Ok(n)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data is a byte buffer or rustls's state, left consistent between calls.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Session {
    /// A session over a connection that finished its handshake, with any bytes already read
    /// past it (early application data) still inside `conn`; `emptied`: the handshake's last
    /// read left the socket empty.
    pub(crate) fn new(conn: ServerConnection, emptied: bool) -> Session {
        let info = TlsInfo::of(&conn);
        Session {
            conn: Mutex::new(conn),
            incoming: Mutex::new(Incoming {
                socket_emptied: emptied,
                ..Incoming::default()
            }),
            outgoing: Mutex::new(Vec::new()),
            info,
        }
    }

    pub(crate) fn info(&self) -> &TlsInfo {
        &self.info
    }

    /// Reads plaintext into `buf`.
    pub(crate) fn read(&self, raw: &impl Raw, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.read_with(raw, |r| r.read(buf))
    }

    /// Appends plaintext to the spare capacity of `buf`, never zeroing it (see
    /// `Stream::read_spare`).
    pub(crate) fn read_spare(&self, raw: &impl Raw, buf: &mut Vec<u8>) -> io::Result<usize> {
        let room = buf.capacity() - buf.len();
        if room == 0 {
            return Ok(0);
        }
        self.read_with(raw, |r| {
            let chunk = r.fill_buf()?;
            let n = chunk.len().min(room);
            buf.extend_from_slice(&chunk[..n]);
            r.consume(n);
            Ok(n)
        })
    }

    /// Event mode, on parking: gives back the buffers that are empty (a parked connection then
    /// holds none: the ciphertext buffer alone reserves a whole record).
    pub(crate) fn park(&self) {
        let mut incoming = lock(&self.incoming);
        if incoming.cipher.is_empty() {
            incoming.cipher = Vec::new();
        }
        if incoming.peeked.is_empty() {
            incoming.peeked = Vec::new();
        }
        drop(incoming);
        if let Ok(mut out) = self.outgoing.try_lock()
            && out.is_empty()
        {
            *out = Vec::new();
        }
    }

    /// Whether everything the client sent has been read and taken: the last read emptied the
    /// socket, no ciphertext waits for rustls and no plaintext for a reader. A connection may
    /// park then without asking the socket again (the next byte signals it).
    pub(crate) fn drained(&self) -> bool {
        let incoming = lock(&self.incoming);
        incoming.socket_emptied
            && incoming.cipher.is_empty()
            && incoming.peeked.is_empty()
            && matches!(
                lock(&self.conn).reader().fill_buf(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            )
    }

    /// Event mode, during admission after the handshake: decrypts what has arrived, through a
    /// `raw` whose reads do not wait, until `max` bytes of plaintext are there or nothing more
    /// is, and tells whether `whole` holds of them, without consuming them (the next read gets
    /// them). End of file, or a failure the next read would report, counts as whole: that read
    /// must run to see it.
    pub(crate) fn peek_now(
        &self,
        raw: &impl Raw,
        max: usize,
        whole: impl Fn(&[u8]) -> bool,
    ) -> bool {
        let mut incoming = lock(&self.incoming);
        loop {
            if incoming.peeked.len() >= max {
                return true;
            }
            let mut conn = lock(&self.conn);
            let had = incoming.peeked.len();
            incoming.peeked.resize(max, 0);
            let read = conn.reader().read(&mut incoming.peeked[had..]);
            incoming.peeked.truncate(had + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return true,
            }
            if incoming.cipher.is_empty() {
                drop(conn);
                match incoming.read_socket(raw) {
                    Ok(0) => return true,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if incoming.cipher.is_empty() {
                            // Parking: the record's worth of room is not kept.
                            incoming.cipher = Vec::new();
                        }
                        return whole(&incoming.peeked);
                    }
                    Err(_) => return true,
                }
                conn = lock(&self.conn);
            }
            let Ok(used) = conn.read_tls(&mut &incoming.cipher[..]) else {
                return true;
            };
            incoming.cipher.drain(..used);
            let processed = conn.process_new_packets();
            let answer = conn.wants_write();
            drop(conn);
            if processed.is_err() || (answer && self.flush(raw).is_err()) {
                return true;
            }
        }
    }

    /// Runs `take` on the plaintext once some has arrived (or the peer closed), reading and
    /// decrypting records until then.
    fn read_with(
        &self,
        raw: &impl Raw,
        mut take: impl FnMut(&mut dyn BufRead) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut incoming = lock(&self.incoming);
        if !incoming.peeked.is_empty() {
            let mut peeked = &incoming.peeked[..];
            let before = peeked.len();
            let result = take(&mut peeked);
            let used = before - peeked.len();
            incoming.peeked.drain(..used);
            return result;
        }
        loop {
            let mut conn = lock(&self.conn);
            match take(&mut conn.reader()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed the socket without `close_notify`: end of file, as Python's
                // `ssl` (`suppress_ragged_eofs`) and most servers treat it. Protocols whose
                // messages carry their own length see a truncated message either way.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                other => return other,
            }
            if incoming.cipher.is_empty() {
                drop(conn);
                if incoming.read_socket(raw)? == 0 {
                    let mut conn = lock(&self.conn);
                    conn.read_tls(&mut io::empty())?;
                    // Any complete record left is processed; a partial one is lost.
                    let _ = conn.process_new_packets();
                    continue;
                }
                conn = lock(&self.conn);
            }
            let used = conn.read_tls(&mut &incoming.cipher[..])?;
            incoming.cipher.drain(..used);
            let processed = conn.process_new_packets();
            let answer = conn.wants_write();
            drop(conn);
            if answer {
                self.flush(raw)?;
            }
            processed.map_err(tls_error)?;
        }
    }

    /// Seals `buf` into records and writes them in as few system calls as the socket allows:
    /// a buffered writer's whole buffer leaves as one write, not a record per byte.
    pub(crate) fn write(&self, raw: &impl Raw, buf: &[u8]) -> io::Result<usize> {
        let mut out = lock(&self.outgoing);
        let n = {
            let mut conn = lock(&self.conn);
            let n = conn.writer().write(buf)?;
            drain(&mut conn, &mut out)?;
            n
        };
        send(raw, &mut out)?;
        Ok(n)
    }

    /// Like [`write`](Self::write), for several buffers sealed together.
    pub(crate) fn write_vectored(
        &self,
        raw: &impl Raw,
        bufs: &[io::IoSlice<'_>],
    ) -> io::Result<usize> {
        let mut out = lock(&self.outgoing);
        let n = {
            let mut conn = lock(&self.conn);
            let n = conn.writer().write_vectored(bufs)?;
            drain(&mut conn, &mut out)?;
            n
        };
        send(raw, &mut out)?;
        Ok(n)
    }

    /// Sends whatever rustls has queued (an alert, a key update, session tickets).
    pub(crate) fn flush(&self, raw: &impl Raw) -> io::Result<()> {
        let mut out = lock(&self.outgoing);
        drain(&mut lock(&self.conn), &mut out)?;
        send(raw, &mut out)
    }

    /// Queues `close_notify` and sends it with whatever else is queued. Skipped when a writer
    /// is in the middle of a write (the connection is being torn down under it).
    pub(crate) fn close_notify(&self, raw: &impl Raw) -> io::Result<()> {
        let Ok(mut out) = self.outgoing.try_lock() else {
            return Ok(());
        };
        {
            let mut conn = lock(&self.conn);
            conn.send_close_notify();
            drain(&mut conn, &mut out)?;
        }
        send(raw, &mut out)
    }
}

/// Moves the sealed records out of rustls.
fn drain(conn: &mut ServerConnection, out: &mut Vec<u8>) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

/// Writes all of `out` to the socket and empties it (also on failure: the records cannot be
/// sent again, the session is over).
fn send(raw: &impl Raw, out: &mut Vec<u8>) -> io::Result<()> {
    let mut sent = 0;
    let result = loop {
        if sent == out.len() {
            break Ok(());
        }
        match raw.write_raw(&out[sent..]) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    out.clear();
    result
}
