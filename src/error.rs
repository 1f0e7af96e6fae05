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
    /// The address as the caller wrote it, when it could not be resolved to an [`Addr`] (an
    /// unknown host name, say): shown in the message where the address would be.
    unresolved: Option<String>,
    detail: Option<String>,
    source: Option<io::Error>,
    /// A refusal already counted under its reason (`max_per_source`, `verify_request`) where
    /// it was made, so that admission does not count it again as a failure of its stage.
    counted: bool,
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
    /// No inherited socket (`LISTEN_FDS`) answers to the index or name asked for.
    NotInherited,
    /// The inherited socket asked for is not the kind of socket the server serves.
    WrongSocket,
    /// The TLS handshake or a TLS record failed: a plaintext client, an unknown CA, a bad
    /// certificate, a truncated ClientHello.
    Tls,
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
            Kind::NotInherited => "no such inherited socket",
            Kind::WrongSocket => "inherited socket of the wrong kind",
            Kind::Tls => "TLS failure",
        }
    }
}

impl Error {
    pub(crate) fn new(kind: Kind) -> Error {
        Error {
            inner: Box::new(Inner {
                kind,
                addr: None,
                unresolved: None,
                detail: None,
                source: None,
                counted: false,
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

    /// Marks a refusal as counted already, under its reason, by whoever made it.
    #[cfg_attr(not(feature = "proxy-protocol"), allow(dead_code))]
    pub(crate) fn counted(mut self) -> Error {
        self.inner.counted = true;
        self
    }

    /// Whether the refusal was counted where it was made (see [`counted`](Self::counted)).
    #[cfg_attr(not(feature = "proxy-protocol"), allow(dead_code))]
    pub(crate) fn is_counted(&self) -> bool {
        self.inner.counted
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

    pub(crate) fn not_inherited(detail: impl Into<String>) -> Error {
        Error::new(Kind::NotInherited).with_detail(detail)
    }

    pub(crate) fn wrong_socket_kind(detail: impl Into<String>) -> Error {
        Error::new(Kind::WrongSocket).with_detail(detail)
    }

    /// Puts `what` (the socket asked for) before the detail: "inherited socket #0 (fd 3): ...".
    pub(crate) fn with_detail_prefix(mut self, what: &str) -> Error {
        let detail = match self.inner.detail.take() {
            Some(d) => format!("{what}: {d}"),
            None => what.to_owned(),
        };
        self.inner.detail = Some(detail);
        self
    }

    /// A bind that failed before any socket existed: `what` (the address as given, e.g.
    /// `nosuchhost:9000`) could not be resolved.
    pub(crate) fn unresolved(what: String, source: io::Error) -> Error {
        let mut e = Error::new(Kind::Bind).with_source(source);
        e.inner.unresolved = Some(what);
        e
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

    /// No inherited socket (`LISTEN_FDS`, see [`Inherited`](crate::Inherited)) answers to the
    /// index or name asked for, or it was adopted already.
    pub fn is_not_inherited(&self) -> bool {
        self.inner.kind == Kind::NotInherited
    }

    /// The inherited socket asked for is not the kind the server serves (a UDP socket handed
    /// to a TCP server, a stream socket that is not listening, a pipe); the message says what
    /// it is.
    pub fn is_wrong_socket_kind(&self) -> bool {
        self.inner.kind == Kind::WrongSocket
    }

    /// The TLS handshake or a TLS record failed (feature `tls`): a plaintext peer, an unknown
    /// CA, a bad certificate, a malformed record.
    pub fn is_tls(&self) -> bool {
        self.inner.kind == Kind::Tls
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
        let prep = if self.inner.kind == Kind::Bind {
            ""
        } else if self.inner.kind == Kind::WrongSocket {
            " at"
        } else {
            " with"
        };
        if let Some(addr) = &self.inner.addr {
            write!(f, "{prep} {addr}")?;
        } else if let Some(what) = &self.inner.unresolved {
            write!(f, "{prep} {what}")?;
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

/// `{:?}` reads like the message, so that `fn main() -> socketserver::Result<()>` prints
/// `Error: cannot bind 127.0.0.1:80: Permission denied (os error 13)`, followed by any deeper
/// cause the message does not already show. `{:#?}` gives the fields.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            let mut d = f.debug_struct("Error");
            d.field("kind", &self.inner.kind);
            if let Some(addr) = &self.inner.addr {
                d.field("addr", addr);
            }
            if let Some(what) = &self.inner.unresolved {
                d.field("unresolved", what);
            }
            if let Some(detail) = &self.inner.detail {
                d.field("detail", detail);
            }
            if let Some(source) = &self.inner.source {
                d.field("source", source);
            }
            return d.finish();
        }
        let mut shown = self.to_string();
        // An io::Error's message already includes its wrapped error's, and its `source()` skips
        // to that error's own cause: append only what the message does not contain yet.
        let mut cause = StdError::source(self);
        while let Some(c) = cause {
            let text = c.to_string();
            if !shown.contains(&text) {
                shown = format!("{shown}: {text}");
            }
            cause = c.source();
        }
        f.write_str(&shown)
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
            Kind::Config | Kind::WrongSocket => io::ErrorKind::InvalidInput,
            Kind::NotInherited => io::ErrorKind::NotFound,
            Kind::Tls => io::ErrorKind::InvalidData,
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

    #[test]
    fn debug_reads_like_the_message_for_fn_main() {
        let at = Addr::Inet("127.0.0.1:80".parse().unwrap());
        let e = Error::bind(Some(&at), io::Error::from_raw_os_error(13));
        // What `fn main() -> socketserver::Result<()>` prints after "Error: ".
        assert_eq!(
            format!("{e:?}"),
            "cannot bind 127.0.0.1:80: Permission denied (os error 13)"
        );
        assert_eq!(format!("{e:?}"), e.to_string());
        // The structured form stays available.
        let pretty = format!("{e:#?}");
        assert!(
            pretty.contains("kind: Bind") && pretty.contains("source:"),
            "{pretty}"
        );
    }

    #[test]
    fn debug_appends_a_deeper_cause_the_message_does_not_show() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("handshake aborted")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let root = io::Error::other("disk on fire");
        let e = Error::io(None, io::Error::other(Outer(root)));
        assert_eq!(format!("{e}"), "i/o error: handshake aborted");
        assert_eq!(
            format!("{e:?}"),
            "i/o error: handshake aborted: disk on fire"
        );
    }

    #[test]
    fn an_unresolved_address_is_named_in_the_message() {
        let e = Error::unresolved(
            "nosuchhost.invalid:9000".into(),
            io::Error::other("failed to lookup address information"),
        );
        assert!(e.is_bind() && e.addr().is_none());
        assert_eq!(
            e.to_string(),
            "cannot bind nosuchhost.invalid:9000: failed to lookup address information"
        );
    }
}
