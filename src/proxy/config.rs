//! What the user configures: which peers may send a PROXY header.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::{Addr, Error};

/// A block of IP addresses, `10.0.0.0/8` or `2001:db8::/32`; a bare address (`127.0.0.1`) is a
/// block of one.
///
/// An IPv4 block also matches the IPv4-mapped IPv6 form of its addresses (`::ffff:10.1.2.3`),
/// which is how a dual-stack listener sees IPv4 peers. Bits past the prefix are ignored
/// (`10.1.2.3/8` is `10.0.0.0/8`), as in Go's `net.ParseCIDR`.
///
/// ```
/// use socketserver::Cidr;
///
/// let lan: Cidr = "10.0.0.0/8".parse()?;
/// assert!(lan.contains("10.20.30.40".parse().unwrap()));
/// assert!(!lan.contains("192.168.1.1".parse().unwrap()));
/// assert!("10.0.0.0/33".parse::<Cidr>().unwrap_err().is_config());
/// # Ok::<(), socketserver::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The block of addresses that share `addr`'s first `prefix` bits. Fails (a config error)
    /// if `prefix` is longer than the address (32 for IPv4, 128 for IPv6).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, Error> {
        let addr = addr.to_canonical();
        let bits = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > bits {
            return Err(Error::config(format!(
                "prefix /{prefix} is longer than {addr}'s {bits} bits"
            )));
        }
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (ip, self.addr) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }
}

/// `ip` with every bit past the first `prefix` cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = Error;

    /// `ADDR/PREFIX` or a bare `ADDR`; a malformed one is a config error that quotes it.
    fn from_str(s: &str) -> Result<Cidr, Error> {
        let bad = |why: &str| Error::config(format!("{s:?} is not an IP address block: {why}"));
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| bad("expected ADDR/PREFIX, such as 10.0.0.0/8"))?;
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .map_err(|_| bad("the prefix length is not a number"))?,
            None if addr.to_canonical().is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, prefix).map_err(|e| bad(e.detail().unwrap_or("bad prefix")))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl From<IpAddr> for Cidr {
    /// A block of one address.
    fn from(ip: IpAddr) -> Cidr {
        let ip = ip.to_canonical();
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        Cidr { addr: ip, prefix }
    }
}

/// The PROXY protocol (v1 and v2) for a stream server: which peers are proxies whose header
/// is believed. Give it to [`Builder::proxy_protocol`](crate::Builder::proxy_protocol).
///
/// Every connection to such a server must come from a trusted proxy and start with a header:
/// a peer outside the trusted blocks is refused at once, without reading a byte (anyone could
/// send a header claiming any address), and so is a trusted peer whose header is missing,
/// malformed, longer than the spec allows (v1: 107 bytes; v2: 16 + 1536, see
/// [`MAX_V2_PAYLOAD`](Self::MAX_V2_PAYLOAD)) or not complete within the handshake deadline
/// ([`Builder::handshake_timeout`](crate::Builder::handshake_timeout)).
/// Each is logged (rate-limited) and counted in [`Stats`](crate::Stats) (`proxy_*`). Serve
/// direct clients on a second listener.
///
/// On a Unix-domain stream server every peer is trusted: who may connect is what the socket
/// file's permissions say ([`Builder::socket_mode`](crate::Builder::socket_mode)), and Unix
/// peers have no IP address to check.
///
/// A v2 `LOCAL` header (what HAProxy sends on its health checks with `check-send-proxy`) and
/// a v1 `UNKNOWN` one are accepted: the connection keeps its real addresses.
///
/// ```no_run
/// use socketserver::{ProxyProtocol, TcpServer, handler_fn};
/// use std::io::Write;
///
/// let proxies = ProxyProtocol::trusting(["10.0.0.0/8", "127.0.0.1"])?;
/// let server = TcpServer::builder(|| handler_fn(|req| {
///     // The client behind the proxy, and the proxy itself.
///     let (client, proxy) = (req.peer_addr().clone(), req.proxy_addr().cloned());
///     writeln!(req, "you are {client} via {proxy:?}")?;
///     Ok(())
/// }))
/// .proxy_protocol(proxies)
/// .bind("0.0.0.0:9000")?;
/// server.serve_forever();
/// # Ok::<(), socketserver::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
pub struct ProxyProtocol {
    pub(crate) trusted: Vec<Cidr>,
}

impl ProxyProtocol {
    /// The longest v2 header payload (addresses and TLVs, after the 16 fixed bytes) accepted.
    ///
    /// The spec lets the 16-bit length field say up to 65,535, but what a proxy actually sends
    /// is far smaller: the largest address block (Unix, 216 bytes), an authority (SNI, at most
    /// 255), a unique ID (at most 128), ALPN, and the SSL TLV with its version, cipher,
    /// algorithms and client-certificate CN, well under 1 KiB in all. 1536 leaves room for a
    /// cloud provider's own TLVs (AWS's VPC endpoint ID, Azure's link ID) while a peer that
    /// announces more is refused before anything is read into memory.
    pub const MAX_V2_PAYLOAD: usize = 1536;

    /// Trusts no IP peer yet (Unix-domain peers are always trusted): add blocks with
    /// [`trust`](Self::trust).
    pub fn new() -> ProxyProtocol {
        ProxyProtocol::default()
    }

    /// Trusts the proxies at `blocks`, each `ADDR/PREFIX` or a bare address. A malformed one
    /// is a config error that quotes it.
    pub fn trusting<S: AsRef<str>>(
        blocks: impl IntoIterator<Item = S>,
    ) -> Result<ProxyProtocol, Error> {
        let mut p = ProxyProtocol::new();
        for b in blocks {
            p = p.trust(b.as_ref().parse::<Cidr>()?);
        }
        Ok(p)
    }

    /// Also trusts the proxies in `block`.
    pub fn trust(mut self, block: impl Into<Cidr>) -> ProxyProtocol {
        self.trusted.push(block.into());
        self
    }

    /// The trusted blocks.
    pub fn trusted(&self) -> &[Cidr] {
        &self.trusted
    }

    /// Whether a header from `peer` is believed: an IP address in a trusted block, or any
    /// Unix-domain peer.
    pub fn trusts(&self, peer: &Addr) -> bool {
        match peer {
            Addr::Inet(a) => self.trusted.iter().any(|c| c.contains(a.ip())),
            Addr::Unix(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_parse_and_match_by_their_prefix() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.255.0.1")));
        assert!(!c.contains(ip("11.0.0.0")));
        assert!(c.contains(ip("::ffff:10.1.2.3")), "a v4-mapped peer");
        assert!(!c.contains(ip("::1")));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        assert_eq!(one.to_string(), "127.0.0.1/32");
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "::ffff:10.0.0.0/8".parse::<Cidr>().unwrap(),
            "10.0.0.0/8".parse().unwrap()
        );
    }

    #[test]
    fn malformed_blocks_are_config_errors_that_quote_them() {
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "10.0.0.0/a",
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.is_config(), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(ProxyProtocol::trusting(["10.0.0.0/8", "nope"]).is_err());
    }

    #[test]
    fn a_bare_address_is_a_block_of_one_of_its_own_family() {
        // The default prefix is the address's own length: a bare IPv6 address must not
        // become a /32 (trusting PROXY headers from 2^96 addresses).
        for (bare, block) in [
            ("192.0.2.1", "192.0.2.1/32"),
            ("2001:db8::1", "2001:db8::1/128"),
            ("::1", "::1/128"),
            ("::", "::/128"),
            // An IPv4-mapped address is its IPv4 address, so its block is a /32 too.
            ("::ffff:192.0.2.1", "192.0.2.1/32"),
        ] {
            let c: Cidr = bare.parse().unwrap();
            assert_eq!(c.to_string(), block, "{bare}");
            assert_eq!(
                c,
                Cidr::from(ip(bare)),
                "{bare}: FromStr and From<IpAddr> agree"
            );
        }
        let v6: Cidr = "2001:db8::1".parse().unwrap();
        assert!(v6.contains(ip("2001:db8::1")));
        for other in [
            "2001:db8::2",
            "2001:db8::",
            "2001:db8:ffff::1",
            "2001:db9::1",
        ] {
            assert!(!v6.contains(ip(other)), "{other} is not 2001:db8::1");
        }
        let v4: Cidr = "192.0.2.1".parse().unwrap();
        assert!(v4.contains(ip("192.0.2.1")) && v4.contains(ip("::ffff:192.0.2.1")));
        assert!(!v4.contains(ip("192.0.2.0")) && !v4.contains(ip("192.0.2.2")));
        assert!(!v4.contains(ip("::ffff:192.0.2.2")) && !v4.contains(ip("::c000:201")));
    }

    #[test]
    fn prefixes_from_0_to_the_full_length_and_none_past_it() {
        let all4: Cidr = "0.0.0.0/0".parse().unwrap();
        for a in ["0.0.0.0", "255.255.255.255", "::ffff:10.0.0.1"] {
            assert!(all4.contains(ip(a)), "{a} in 0.0.0.0/0");
        }
        assert!(
            !all4.contains(ip("2001:db8::1")),
            "/0 of IPv4 is every IPv4 address only"
        );
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains(ip("2001:db8::1")) && all6.contains(ip("ffff::")));
        assert!(!all6.contains(ip("10.0.0.1")) && !all6.contains(ip("::ffff:10.0.0.1")));
        let one4: Cidr = "203.0.113.9/32".parse().unwrap();
        assert!(one4.contains(ip("203.0.113.9")) && !one4.contains(ip("203.0.113.8")));
        let one6: Cidr = "2001:db8::9/128".parse().unwrap();
        assert!(one6.contains(ip("2001:db8::9")) && !one6.contains(ip("2001:db8::8")));
        // The prefix counts the canonical address's bits: a mapped block is an IPv4 one.
        let mapped: Cidr = "::ffff:10.1.0.0/16".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.1.0.0/16");
        assert!(mapped.contains(ip("10.1.2.3")) && !mapped.contains(ip("10.2.0.0")));
        assert!(mapped.contains(ip("::ffff:10.1.2.3")));
        // Every prefix length in range is accepted, one past it refused.
        for p in 0..=32u8 {
            assert_eq!(
                Cidr::new(ip("10.0.0.1"), p)
                    .unwrap()
                    .to_string()
                    .split_once('/')
                    .unwrap()
                    .1,
                p.to_string()
            );
        }
        for p in 0..=128u8 {
            Cidr::new(ip("2001:db8::1"), p).unwrap();
        }
        for bad in [
            "0.0.0.0/33",
            "::ffff:10.0.0.0/33",
            "::/129",
            "2001:db8::/255",
            "10.0.0.0/256",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().unwrap_err().is_config(), "{bad}");
        }
        assert!(Cidr::new(ip("10.0.0.1"), 33).unwrap_err().is_config());
        assert!(
            Cidr::new(ip("::ffff:10.0.0.1"), 33)
                .unwrap_err()
                .is_config()
        );
        assert!(Cidr::new(ip("::1"), 129).unwrap_err().is_config());
    }

    #[test]
    fn trusted_lists_the_blocks_in_the_order_given() {
        let blocks = ["10.0.0.0/8", "2001:db8::1", "127.0.0.1"];
        let p = ProxyProtocol::trusting(blocks).unwrap();
        let shown: Vec<String> = p.trusted().iter().map(Cidr::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "2001:db8::1/128", "127.0.0.1/32"]);
        let p = p.trust(ip("192.0.2.7"));
        assert_eq!(p.trusted().len(), 4);
        assert_eq!(p.trusted()[3], "192.0.2.7/32".parse().unwrap());
        assert!(ProxyProtocol::new().trusted().is_empty());
    }

    #[test]
    fn unix_peers_are_trusted_and_ip_peers_only_in_a_block() {
        let p = ProxyProtocol::trusting(["192.168.0.0/16"]).unwrap();
        assert!(p.trusts(&Addr::Unix(None)));
        assert!(p.trusts(&Addr::Inet("192.168.3.4:1".parse().unwrap())));
        assert!(!p.trusts(&Addr::Inet("10.0.0.1:1".parse().unwrap())));
        assert!(!ProxyProtocol::new().trusts(&Addr::Inet("127.0.0.1:1".parse().unwrap())));
    }
}
