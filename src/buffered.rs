//! `rfile` and `wfile`, Python's names for the buffered reader and writer of a
//! [`Request`](crate::Request): line reads bounded by a maximum length, and
//! formatted writes that leave in one piece.

use std::fmt;
use std::io::{self, BufRead, BufWriter, IoSlice, IoSliceMut, Read, Write};

use crate::error::Kind;
use crate::stream::write_fmt_once;
use crate::{Addr, Error, Result, Stream};

/// The buffered reader of a [`Request`](crate::Request) (Python's `rfile`).
///
/// Its line reads, [`read_line`](Self::read_line), [`read_until`](Self::read_until) and
/// [`lines`](Self::lines), stop at [`StreamOptions::max_line`](crate::StreamOptions::max_line)
/// bytes (64 KiB by default) with an error whose [`is_too_large`](Error::is_too_large) is true,
/// so a client that sends one endless line costs 64 KiB, not all the server's memory. They are
/// inherent methods, so they are the ones `s.rfile.read_line(..)` and
/// `for line in s.rfile.lines()` call even with [`BufRead`] in scope. Their errors are this
/// crate's [`Error`], carrying the peer address: [`is_timeout`](Error::is_timeout) for a read
/// timeout, and `?` turns them into a [`HandlerError`](crate::HandlerError).
///
/// ```
/// use std::io::Write;
/// use socketserver::{Handler, HandlerResult, Request};
///
/// struct Upper;
///
/// impl Handler for Upper {
///     fn handle(&mut self, s: &mut Request) -> HandlerResult {
///         for line in s.rfile.lines() {
///             writeln!(s.wfile, "{}", line?.to_uppercase())?;
///         }
///         Ok(())
///     }
/// }
/// ```
///
/// It also reads like any reader ([`Read`]; [`fill_buf`](Self::fill_buf) and
/// [`consume`](Self::consume) as in [`BufRead`]), and `&mut RFile` is a [`BufRead`] for code that
/// takes one, whose own `read_line` and `lines` are std's, unbounded.
pub struct RFile {
    inner: ReadBuffer,
    max_line: usize,
    peer: Addr,
}

/// How a message served in event mode ended, for its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// It read what it needed.
    Whole,
    /// It needed bytes that have not arrived: its input is unread again.
    Starved,
    /// It needed more than [`RFile::message_limit`] bytes: it can never be whole here.
    TooLarge,
}

impl RFile {
    pub(crate) fn new(stream: Stream, capacity: usize, max_line: usize, peer: Addr) -> RFile {
        RFile {
            inner: ReadBuffer::new(stream, capacity),
            max_line,
            peer,
        }
    }

    /// The client a PROXY header named, for the errors that name the peer.
    pub(crate) fn set_peer(&mut self, peer: Addr) {
        self.peer = peer;
    }

    /// Reads up to and including the next `byte` (or to end of file) and appends it to `buf`;
    /// returns how many bytes it appended, 0 at end of file.
    ///
    /// A line longer than [`max_line`](Self::max_line) bytes, counting `byte`, fails with an
    /// [`is_too_large`](Error::is_too_large) error once `max_line` bytes have been appended; the
    /// rest of the line stays unread (close the connection: it may never end).
    pub fn read_until(&mut self, byte: u8, buf: &mut Vec<u8>) -> Result<usize> {
        let mut taken = 0;
        loop {
            let available = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(Some(&self.peer), e)),
            };
            if available.is_empty() {
                return Ok(taken);
            }
            let window = &available[..available.len().min(self.max_line - taken)];
            if let Some(i) = window.iter().position(|&b| b == byte) {
                buf.extend_from_slice(&window[..=i]);
                self.inner.consume(i + 1);
                // A line is a unit: what follows it starts the next one.
                let unconsumed = self.inner.buffer().len();
                self.inner.stream.unit_done(unconsumed);
                return Ok(taken + i + 1);
            }
            let n = window.len();
            buf.extend_from_slice(window);
            self.inner.consume(n);
            taken += n;
            if taken >= self.max_line {
                return Err(Error::new(Kind::TooLarge)
                    .with_addr(Some(&self.peer))
                    .with_detail(format!("line longer than {} bytes", self.max_line)));
            }
        }
    }

    /// Reads a line, its `\n` included, and appends it to `buf`; returns how many bytes it
    /// appended, 0 at end of file. Bounded like [`read_until`](Self::read_until); a line that is
    /// not UTF-8 fails with an [`is_bad_message`](Error::is_bad_message) error. On any error
    /// `buf` is left as it was.
    pub fn read_line(&mut self, buf: &mut String) -> Result<usize> {
        let mut bytes = std::mem::take(buf).into_bytes();
        let start = bytes.len();
        let mut result = self.read_until(b'\n', &mut bytes);
        if result.is_ok() && std::str::from_utf8(&bytes[start..]).is_err() {
            result = Err(Error::new(Kind::BadMessage)
                .with_addr(Some(&self.peer))
                .with_detail("line is not valid UTF-8"));
        }
        if result.is_err() {
            bytes.truncate(start);
        }
        // Valid either way: a String's bytes, followed by nothing or by checked UTF-8.
        *buf = String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        result
    }

    /// The lines of the connection, without their `\n` or `\r\n`, each bounded like
    /// [`read_line`](Self::read_line). Ends at end of file, and after the first error.
    pub fn lines(&mut self) -> Lines<'_> {
        Lines {
            rfile: self,
            done: false,
        }
    }

    /// The buffered bytes, reading more from the connection only when there are none: empty at
    /// end of file. As [`BufRead::fill_buf`].
    #[inline]
    pub fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    /// Marks `n` bytes of [`fill_buf`](Self::fill_buf)'s answer as read. As
    /// [`BufRead::consume`].
    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.inner.consume(n)
    }

    /// The bytes buffered and not yet read, without reading more.
    pub fn buffer(&self) -> &[u8] {
        self.inner.buffer()
    }

    /// The longest line the line reads accept, counting its newline.
    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// The connection. Reading it directly skips (and races with) the buffer.
    pub fn get_ref(&self) -> &Stream {
        self.inner.get_ref()
    }

    /// Event mode: appends what the socket has without waiting (`WouldBlock` if nothing);
    /// `Ok(0)` at end of file or with the buffer full.
    pub(crate) fn fill_nonblocking(&mut self) -> io::Result<usize> {
        self.inner.fill_nonblocking()
    }

    /// The most a message may take in event mode, where it must be in the buffer whole before
    /// it is served: the buffer's capacity, or the longest line if that is more.
    pub(crate) fn message_limit(&self) -> usize {
        self.inner.capacity.max(self.max_line)
    }

    /// Event mode: a message is about to be served. Its input stays in the buffer until
    /// [`end_message`](Self::end_message), so that a call that runs out of it can be taken back
    /// and run again once more has come; the buffer grows up to
    /// [`message_limit`](Self::message_limit) for it.
    pub(crate) fn begin_message(&mut self) {
        let limit = self.message_limit();
        let r = &mut self.inner;
        r.mark = Some(r.pos);
        r.limit = limit;
        r.starved = false;
    }

    /// Event mode: whether the message's call has run out of input (see
    /// [`end_message`](Self::end_message)).
    pub(crate) fn starved(&self) -> bool {
        self.inner.starved
    }

    /// Event mode: the message's call has returned. A call that needed bytes not yet arrived
    /// (a read found the socket empty) has its input put back.
    pub(crate) fn end_message(&mut self) -> Taken {
        let r = &mut self.inner;
        let mark = r.mark.take();
        if !std::mem::take(&mut r.starved) {
            return Taken::Whole;
        }
        if let Some(m) = mark {
            r.pos = m;
        }
        match r.buf.len() - r.pos >= r.limit {
            true => Taken::TooLarge,
            false => Taken::Starved,
        }
    }

    /// Whether the buffer holds as much as it can: the next message cannot grow in it.
    pub(crate) fn is_full(&self) -> bool {
        let b = &self.inner.buf;
        b.capacity() > 0 && b.len() - self.inner.pos >= b.capacity()
    }

    /// Whether the last read emptied the socket (it returned less than it had room for).
    pub(crate) fn drained(&self) -> bool {
        self.inner.drained
    }

    /// Event mode, on parking: with nothing buffered, gives the buffer back (to this thread's
    /// small pool), and so does a TLS session its own, so a parked connection holds no buffer.
    pub(crate) fn park(&mut self) {
        let r = &mut self.inner;
        if r.pos >= r.buf.len() && r.buf.capacity() > 0 {
            r.pos = 0;
            let buf = std::mem::take(&mut r.buf);
            // One grown for a long message is not kept.
            if buf.capacity() == r.capacity {
                pool::give(buf);
            }
        }
        r.stream.park_buffers();
    }
}

/// Read buffers of parked event-mode connections, kept per worker thread for the next message
/// (any connection's), so that parking and waking cost no allocation in steady state.
mod pool {
    use std::cell::RefCell;

    /// Buffers kept per thread: a worker serves one message at a time, so a few cover
    /// pipelining and the connections it wakes in one batch.
    const KEEP: usize = 8;

    thread_local! {
        static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take(capacity: usize) -> Vec<u8> {
        let reused = FREE.with(|f| {
            let mut f = f.borrow_mut();
            let at = f.iter().rposition(|b| b.capacity() == capacity)?;
            Some(f.swap_remove(at))
        });
        reused.unwrap_or_else(|| Vec::with_capacity(capacity))
    }

    pub(super) fn give(mut buf: Vec<u8>) {
        buf.clear();
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(buf);
            }
        });
    }
}

/// `BufReader<Stream>`, except that its buffer is never zeroed: reads go straight into its
/// spare capacity ([`Stream::read_spare`]), so an idle connection costs the pages its reads
/// touched, not the whole buffer (8 KiB by default).
struct ReadBuffer {
    stream: Stream,
    /// Empty, with no capacity at all, until the first read, and while an event-mode connection
    /// is parked with nothing buffered ([`RFile::park`]): allocated again by the next read.
    buf: Vec<u8>,
    /// How much of `buf` has been consumed.
    pos: usize,
    /// The capacity `buf` gets when it is allocated.
    capacity: usize,
    /// Whether the last read returned less than it had room for: the socket had no more then,
    /// so the next byte to arrive will be signalled (edge-triggered epoll) and an event-mode
    /// connection can park without asking the socket again.
    drained: bool,
    /// Event mode, while a message is served: where its input starts. Nothing from here on is
    /// dropped from the buffer, and reads go through the buffer only.
    mark: Option<usize>,
    /// How far the buffer may grow while `mark` is set.
    limit: usize,
    /// A read found the socket empty (or the buffer at `limit`) while `mark` was set.
    starved: bool,
}

impl ReadBuffer {
    fn new(stream: Stream, capacity: usize) -> ReadBuffer {
        // At least a byte: a read into no room would look like end of file.
        let capacity = capacity.max(1);
        ReadBuffer {
            stream,
            // Allocated by the first read: a connection that never sends costs no buffer.
            buf: Vec::new(),
            pos: 0,
            capacity,
            drained: false,
            mark: None,
            limit: capacity,
            starved: false,
        }
    }

    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos >= self.buf.len() {
            self.make_room();
            if self.mark.is_some() {
                return self.fill_marked();
            }
            loop {
                let room = self.buf.spare_capacity_mut().len();
                match self.stream.read_spare(&mut self.buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    r => {
                        self.drained = r? < room;
                        break;
                    }
                }
            }
        }
        Ok(&self.buf[self.pos..])
    }

    /// [`fill_buf`](Self::fill_buf) while a message is served in event mode: the socket is
    /// non-blocking, and running out (or out of room) marks the message starved. The call
    /// fails with `WouldBlock` then; the server takes it back.
    fn fill_marked(&mut self) -> io::Result<&[u8]> {
        if self.buf.spare_capacity_mut().is_empty() {
            let grow = self.limit.saturating_sub(self.buf.len());
            if grow == 0 {
                self.starved = true;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.buf
                .reserve_exact(grow.min(self.buf.capacity().max(self.capacity)));
        }
        loop {
            let room = self.buf.spare_capacity_mut().len();
            match self.stream.read_spare(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.starved = true;
                    self.drained = true;
                    return Err(e);
                }
                r => {
                    self.drained = self.stream.read_emptied(r?, room);
                    return Ok(&self.buf[self.pos..]);
                }
            }
        }
    }

    /// Moves the unread bytes (or, while a message is served, the message's) to the front of
    /// the buffer (allocating it if it was released), so that a read can append after them.
    fn make_room(&mut self) {
        let keep = self.mark.map_or(self.pos, |m| m.min(self.pos));
        if keep > 0 {
            self.buf.drain(..keep);
            self.pos -= keep;
            if let Some(m) = &mut self.mark {
                *m -= keep;
            }
        }
        if self.buf.capacity() == 0 {
            self.buf = pool::take(self.capacity);
        }
    }

    /// Appends what the socket has without waiting: `WouldBlock` when it has nothing, `Ok(0)`
    /// at end of file (or when the buffer is full).
    fn fill_nonblocking(&mut self) -> io::Result<usize> {
        self.make_room();
        let room = self.buf.spare_capacity_mut().len();
        if room == 0 {
            return Ok(0);
        }
        loop {
            match self.stream.recv_spare_nonblocking(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => {
                    let n = r?;
                    self.drained = self.stream.read_emptied(n, room);
                    return Ok(n);
                }
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }

    fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn get_ref(&self) -> &Stream {
        &self.stream
    }

    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        // Nothing buffered and a large read: skip the buffer, as BufReader does (not while a
        // message's input must stay in it).
        if self.pos >= self.buf.len() && dst.len() >= self.capacity && self.mark.is_none() {
            let n = (&self.stream).read(dst)?;
            self.drained = n < dst.len();
            return Ok(n);
        }
        let available = self.fill_buf()?;
        let n = available.len().min(dst.len());
        dst[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match bufs.iter_mut().find(|b| !b.is_empty()) {
            Some(b) => self.read(b),
            None => Ok(0),
        }
    }

    fn read_exact(&mut self, mut dst: &mut [u8]) -> io::Result<()> {
        while !dst.is_empty() {
            match self.read(dst) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => dst = &mut dst[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for RFile {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.inner.read_vectored(bufs)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact(buf)
    }
}

/// For code that takes a [`BufRead`]: `&mut s.rfile`. (Not `RFile` itself, so that
/// `s.rfile.lines()` finds the bounded inherent method, not `BufRead::lines`.) Its
/// `read_line`, `read_until` and `lines` are std's: unbounded.
impl BufRead for &mut RFile {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.inner.consume(n)
    }
}

impl fmt::Debug for RFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RFile")
            .field("peer", &self.peer)
            .field("buffered", &self.inner.buffer().len())
            .field("max_line", &self.max_line)
            .finish()
    }
}

/// The lines of an [`RFile`], from [`RFile::lines`].
#[derive(Debug)]
pub struct Lines<'a> {
    rfile: &'a mut RFile,
    done: bool,
}

impl Iterator for Lines<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        if self.done {
            return None;
        }
        let mut line = String::new();
        match self.rfile.read_line(&mut line) {
            Ok(0) => {
                self.done = true;
                None
            }
            Ok(_) => {
                if line.ends_with('\n') {
                    line.pop();
                    if line.ends_with('\r') {
                        line.pop();
                    }
                }
                Some(Ok(line))
            }
            Err(e) => {
                // What follows an over-long line is the rest of it: stop here.
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// The writer of a [`Request`](crate::Request) (Python's `wfile`): unbuffered by
/// default, buffered with [`StreamOptions::wbufsize`](crate::StreamOptions::wbufsize), flushed
/// after `finish`.
///
/// `write!` and `writeln!` format the whole message first and write it in one call, so
/// `writeln!(s.wfile, "hello {n}")` leaves in one segment, buffered or not.
pub struct WFile {
    inner: BufWriter<Stream>,
}

impl WFile {
    pub(crate) fn new(stream: Stream, capacity: usize) -> WFile {
        WFile {
            inner: BufWriter::with_capacity(capacity, stream),
        }
    }

    /// The bytes written and not yet flushed.
    pub fn buffer(&self) -> &[u8] {
        self.inner.buffer()
    }

    /// The connection. Writing it directly skips the buffer (flush first).
    pub fn get_ref(&self) -> &Stream {
        self.inner.get_ref()
    }

    /// Event mode: drops what is buffered, unsent (the message that wrote it is taken back).
    pub(crate) fn discard(&mut self) {
        if self.inner.buffer().is_empty() {
            return;
        }
        let capacity = self.inner.capacity();
        let fresh = BufWriter::with_capacity(capacity, self.inner.get_ref().clone());
        // `into_parts` does not flush, as dropping a BufWriter would.
        let _ = std::mem::replace(&mut self.inner, fresh).into_parts();
    }
}

impl Write for WFile {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.inner.write_vectored(bufs)
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    fn write_fmt(&mut self, args: fmt::Arguments<'_>) -> io::Result<()> {
        write_fmt_once(self, args)
    }
}

impl fmt::Debug for WFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WFile")
            .field("buffered", &self.inner.buffer().len())
            .field("capacity", &self.inner.capacity())
            .finish()
    }
}
