//! The crate's one error type: a private kind with predicates, and the address it concerns.

use std::error::Error as StdError;
use std::fmt;
use std::io;

use crate::Addr;

/// A specialized `Result` for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error from building a server, authenticating, or exchanging framed messages.
///
/// The kind is private so that it can grow; ask with the predicates (`is_timeout()`,
/// `is_auth_failed()`, ...). Every error that concerns a peer or a socket path carries it
/// ([`Error::addr`]) and shows it in its message.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: Kind,
    addr: Option<Addr>,
    detail: Option<String>,
    source: Option<io::Error>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Creating, binding or listening on a socket failed.
    Bind,
    /// An I/O error that fits no other kind.
    Io,
    /// A deadline passed: connect, handshake, read or write timeout.
    Timeout,
    /// The peer refused the connection or closed it before the handshake began.
    Refused,
    /// The peer's answer to our challenge was wrong ("digest wrong").
    AuthFailed,
    /// The peer rejected our answer to its challenge ("digest rejected").
    AuthRejected,
    /// A malformed message: a bad length prefix, a handshake message of the wrong shape.
    BadMessage,
    /// A message longer than the configured maximum.
    TooLarge,
    /// An invalid configuration, found when the server or client is built.
    Config,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Bind => "cannot bind",
            Kind::Io => "i/o error",
            Kind::Timeout => "timed out",
            Kind::Refused => "refused",
            Kind::AuthFailed => "digest wrong",
            Kind::AuthRejected => "digest rejected",
            Kind::BadMessage => "bad message",
            Kind::TooLarge => "message too large",
            Kind::Config => "invalid configuration",
        }
    }
}

impl Error {
    pub(crate) fn new(kind: Kind) -> Error {
        Error {
            inner: Box::new(Inner {
                kind,
                addr: None,
                detail: None,
                source: None,
            }),
        }
    }

    pub(crate) fn with_addr(mut self, addr: Option<&Addr>) -> Error {
        if self.inner.addr.is_none() {
            self.inner.addr = addr.cloned();
        }
        self
    }

    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Error {
        self.inner.detail = Some(detail.into());
        self
    }

    pub(crate) fn with_source(mut self, source: io::Error) -> Error {
        self.inner.source = Some(source);
        self
    }

    pub(crate) fn config(detail: impl Into<String>) -> Error {
        Error::new(Kind::Config).with_detail(detail)
    }

    pub(crate) fn bind(addr: Option<&Addr>, source: io::Error) -> Error {
        Error::new(Kind::Bind).with_addr(addr).with_source(source)
    }

    /// Classifies an I/O error met while talking to `addr`: timeouts and refusals get their own
    /// kinds, so callers can tell a slow peer from a broken one.
    pub(crate) fn io(addr: Option<&Addr>, source: io::Error) -> Error {
        let kind = match source.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Kind::Timeout,
            io::ErrorKind::ConnectionRefused => Kind::Refused,
            _ => Kind::Io,
        };
        Error::new(kind).with_addr(addr).with_source(source)
    }

    pub(crate) fn kind(&self) -> Kind {
        self.inner.kind
    }

    /// What the error's kind alone does not say ("32 of 64 hex digits received"), if anything.
    pub(crate) fn detail(&self) -> Option<&str> {
        self.inner.detail.as_deref()
    }

    /// The peer address or socket path this error concerns, when there is one.
    pub fn addr(&self) -> Option<&Addr> {
        self.inner.addr.as_ref()
    }

    /// A deadline passed: connect, handshake, read or write timeout.
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == Kind::Timeout
    }

    /// The peer refused the connection, or closed it before the handshake began.
    pub fn is_refused(&self) -> bool {
        self.inner.kind == Kind::Refused
    }

    /// The peer's answer to our challenge was wrong: it does not hold the key.
    pub fn is_auth_failed(&self) -> bool {
        self.inner.kind == Kind::AuthFailed
    }

    /// The peer rejected our answer to its challenge: we do not hold its key.
    pub fn is_auth_rejected(&self) -> bool {
        self.inner.kind == Kind::AuthRejected
    }

    /// Either side of an authentication failed ([`is_auth_failed`](Self::is_auth_failed) or
    /// [`is_auth_rejected`](Self::is_auth_rejected)).
    pub fn is_auth(&self) -> bool {
        self.is_auth_failed() || self.is_auth_rejected()
    }

    /// A malformed message: a bad length prefix or a handshake message of the wrong shape.
    pub fn is_bad_message(&self) -> bool {
        self.inner.kind == Kind::BadMessage
    }

    /// A message longer than the configured maximum, or one that found no room left in its
    /// connection's [`MpBudget`](crate::MpBudget).
    pub fn is_too_large(&self) -> bool {
        self.inner.kind == Kind::TooLarge
    }

    /// Creating, binding or listening on a socket failed.
    pub fn is_bind(&self) -> bool {
        self.inner.kind == Kind::Bind
    }

    /// An invalid configuration, found when a server or client was built.
    pub fn is_config(&self) -> bool {
        self.inner.kind == Kind::Config
    }

    /// An I/O error that fits none of the other kinds.
    pub fn is_io(&self) -> bool {
        self.inner.kind == Kind::Io
    }

    /// The peer closed the connection cleanly where a message would have started (Python's
    /// `EOFError`): an [`is_io`](Self::is_io) error of kind `UnexpectedEof`.
    pub fn is_eof(&self) -> bool {
        self.is_io()
            && self
                .io_error()
                .is_some_and(|e| e.kind() == io::ErrorKind::UnexpectedEof)
    }

    /// The underlying I/O error, if there is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.inner.source.as_ref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.inner.kind.describe())?;
        if let Some(addr) = &self.inner.addr {
            let prep = if self.inner.kind == Kind::Bind {
                ""
            } else {
                " with"
            };
            write!(f, "{prep} {addr}")?;
        }
        if let Some(detail) = &self.inner.detail {
            write!(f, ": {detail}")?;
        }
        if let Some(source) = &self.inner.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind);
        if let Some(addr) = &self.inner.addr {
            d.field("addr", addr);
        }
        if let Some(detail) = &self.inner.detail {
            d.field("detail", detail);
        }
        if let Some(source) = &self.inner.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner.source.as_ref().map(|e| e as _)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::io(None, e)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind() {
            Kind::Timeout => io::ErrorKind::TimedOut,
            Kind::Refused => io::ErrorKind::ConnectionRefused,
            Kind::AuthFailed | Kind::AuthRejected => io::ErrorKind::PermissionDenied,
            Kind::BadMessage | Kind::TooLarge => io::ErrorKind::InvalidData,
            Kind::Config => io::ErrorKind::InvalidInput,
            Kind::Bind | Kind::Io => e
                .inner
                .source
                .as_ref()
                .map_or(io::ErrorKind::Other, io::Error::kind),
        };
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classified_and_keep_the_peer() {
        let peer = Addr::Inet("127.0.0.1:1".parse().unwrap());
        let e = Error::io(Some(&peer), io::Error::from(io::ErrorKind::WouldBlock));
        assert!(e.is_timeout());
        assert_eq!(e.addr(), Some(&peer));
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
        let e = Error::io(None, io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(e.is_refused() && !e.is_timeout());
        let e = Error::new(Kind::AuthRejected).with_addr(Some(&peer));
        assert!(e.is_auth() && e.is_auth_rejected() && !e.is_auth_failed());
        assert_eq!(e.to_string(), "digest rejected with 127.0.0.1:1");
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::PermissionDenied);
    }
}
