//! One address type for every transport, so handlers and hooks are written once.

use std::fmt::{self, Write as _};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// The address of a socket: an IP address and port, or a Unix-domain path.
///
/// Every server reports its local address and each request's peer address as an `Addr`, so a
/// [`Handler`](crate::Handler) or a `verify_request` hook works unchanged over TCP and Unix
/// sockets. An `Addr::Inet` can be passed straight to `TcpStream::connect`, since `Addr`
/// implements [`ToSocketAddrs`].
///
/// Its `Display` escapes what a client could use to forge or hide log text in a Unix path (it
/// chooses its own): a newline shows as `\n`, never as a line break.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Addr {
    /// An IPv4 or IPv6 socket address.
    Inet(SocketAddr),
    /// A Unix-domain socket path; `None` for an unnamed socket (a client that did not bind one).
    Unix(Option<PathBuf>),
}

impl Addr {
    /// The IP socket address, if this is one.
    pub fn inet(&self) -> Option<SocketAddr> {
        match self {
            Addr::Inet(a) => Some(*a),
            Addr::Unix(_) => None,
        }
    }

    /// The filesystem path, if this is a named Unix-domain address.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Addr::Unix(p) => p.as_deref(),
            Addr::Inet(_) => None,
        }
    }

    pub(crate) fn from_unix(addr: &std::os::unix::net::SocketAddr) -> Addr {
        Addr::Unix(addr.as_pathname().map(Path::to_path_buf))
    }

    /// A peer's IP address as people write it: an IPv4 client of a dual-stack (`[::]`)
    /// socket arrives as `::ffff:a.b.c.d` and is shown as `a.b.c.d`.
    pub(crate) fn from_peer(addr: SocketAddr) -> Addr {
        Addr::Inet(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
    }
}

impl From<SocketAddr> for Addr {
    fn from(a: SocketAddr) -> Addr {
        Addr::Inet(a)
    }
}

/// An IP address as `std` shows it; a Unix path as `unix:/run/app.sock`, escaped: a newline in
/// a client's path must not start a line of its own in the server's log. Control characters are
/// shown as Rust escapes (`\n`, `\u{1b}`), and so are the invisible characters that reorder
/// text (Unicode bidirectional controls); a backslash is doubled, so the escapes are
/// unambiguous.
impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Inet(a) => a.fmt(f),
            Addr::Unix(Some(p)) => {
                f.write_str("unix:")?;
                write_escaped(f, &p.as_os_str().to_string_lossy())
            }
            Addr::Unix(None) => f.write_str("unix:(unnamed)"),
        }
    }
}

/// Writes `text` with control characters, bidirectional controls and backslashes escaped.
fn write_escaped(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    for c in text.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi || c == '\\' {
            write!(f, "{}", c.escape_default())?;
        } else {
            f.write_char(c)?;
        }
    }
    Ok(())
}

impl ToSocketAddrs for Addr {
    type Iter = std::option::IntoIter<SocketAddr>;

    fn to_socket_addrs(&self) -> io::Result<Self::Iter> {
        match self {
            Addr::Inet(a) => Ok(Some(*a).into_iter()),
            Addr::Unix(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{self} is a Unix-domain address, not an IP one"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_accessors() {
        let inet = Addr::from("127.0.0.1:9000".parse::<SocketAddr>().unwrap());
        assert_eq!(inet.to_string(), "127.0.0.1:9000");
        assert_eq!(inet.inet().unwrap().port(), 9000);
        assert!(inet.path().is_none());
        let unix = Addr::Unix(Some(PathBuf::from("/tmp/s.sock")));
        assert_eq!(unix.to_string(), "unix:/tmp/s.sock");
        assert_eq!(unix.path(), Some(Path::new("/tmp/s.sock")));
        assert!(unix.to_socket_addrs().is_err());
        assert_eq!(Addr::Unix(None).to_string(), "unix:(unnamed)");
    }

    #[test]
    fn peer_paths_cannot_forge_log_lines() {
        let show = |p: &str| Addr::Unix(Some(PathBuf::from(p))).to_string();
        assert_eq!(
            show("/tmp/x\nERROR forged line"),
            "unix:/tmp/x\\nERROR forged line"
        );
        assert_eq!(show("/tmp/\r\t\x1b[31m"), "unix:/tmp/\\r\\t\\u{1b}[31m");
        assert_eq!(show("/tmp/a\u{202e}cod.exe"), "unix:/tmp/a\\u{202e}cod.exe");
        assert_eq!(show("/tmp/back\\n"), "unix:/tmp/back\\\\n");
        // Ordinary paths, non-ASCII ones included, are shown as they are.
        assert_eq!(show("/run/café/s.sock"), "unix:/run/café/s.sock");
    }
}
