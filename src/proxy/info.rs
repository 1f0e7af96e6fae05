//! What a handler sees of a connection's PROXY header.

use std::fmt;
use std::net::SocketAddr;

use proxy_header::ProxyHeader;

use crate::Addr;

/// The PROXY header a connection arrived with: the proxy's own address, where the client
/// connected to, and (v2) the TLVs the proxy added. From
/// [`Request::proxy`](crate::Request::proxy); the client itself is
/// [`Request::peer_addr`](crate::Request::peer_addr).
#[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
pub struct ProxyInfo {
    pub(crate) proxy: Addr,
    pub(crate) version: u8,
    pub(crate) header: ProxyHeader<'static>,
}

impl ProxyInfo {
    /// The proxy: the socket's peer, which sent the header.
    pub fn proxy_addr(&self) -> &Addr {
        &self.proxy
    }

    /// The protocol version of the header: 1 (text) or 2 (binary).
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Whether the header named no client: a v2 `LOCAL` command (the proxy's own health
    /// check) or a v1 `UNKNOWN`. The connection then keeps its real addresses.
    pub fn is_local(&self) -> bool {
        self.header.proxied_address().is_none()
    }

    /// The address the client connected to, on the proxy (its frontend); `None` when local.
    pub fn destination(&self) -> Option<SocketAddr> {
        self.header.proxied_address().map(|a| a.destination)
    }

    /// The authority TLV (v2): the host name the client asked for, usually its TLS SNI.
    pub fn authority(&self) -> Option<&str> {
        self.header.authority()
    }

    /// The ALPN TLV (v2): the application protocol the client negotiated (`h2`, say).
    pub fn alpn(&self) -> Option<&[u8]> {
        self.header.alpn()
    }

    /// The unique-ID TLV (v2): the proxy's identifier of this connection.
    pub fn unique_id(&self) -> Option<&[u8]> {
        self.header.unique_id()
    }

    /// The SSL TLV (v2): how the client reached the proxy over TLS (HAProxy's
    /// `send-proxy-v2-ssl`, `send-proxy-v2-ssl-cn`).
    pub fn ssl(&self) -> Option<ProxySsl> {
        let ssl = self.header.ssl()?;
        let own = |s: Option<&str>| s.map(str::to_owned);
        Some(ProxySsl {
            client_ssl: ssl.client_ssl(),
            client_cert: ssl.client_cert_conn() || ssl.client_cert_sess(),
            verified: ssl.verify() == 0,
            version: own(ssl.version()),
            cipher: own(ssl.cipher()),
            cn: own(ssl.cn()),
            sig_alg: own(ssl.sig_alg()),
            key_alg: own(ssl.key_alg()),
        })
    }
}

impl fmt::Debug for ProxyInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyInfo")
            .field("proxy", &self.proxy)
            .field("version", &self.version)
            .field("header", &self.header)
            .finish()
    }
}

/// The v2 SSL TLV: what the proxy knows of the client's TLS connection to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
#[non_exhaustive]
pub struct ProxySsl {
    /// The client connected over TLS.
    pub client_ssl: bool,
    /// The client presented a certificate (on this connection or its session).
    pub client_cert: bool,
    /// The proxy verified the client's certificate (or there was none to verify).
    pub verified: bool,
    /// The TLS version (`TLSv1.3`).
    pub version: Option<String>,
    /// The cipher suite.
    pub cipher: Option<String>,
    /// The common name of the client certificate's subject.
    pub cn: Option<String>,
    /// The certificate's signature algorithm.
    pub sig_alg: Option<String>,
    /// The certificate's key algorithm.
    pub key_alg: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_header::ParseConfig;

    /// A v2 `PROXY` (or `LOCAL`) header for TCP/IPv4 192.0.2.1:1000 -> 198.51.100.2:443 with
    /// `tlvs` (type, value), parsed as the stage parses it.
    fn info(command: u8, tlvs: &[(u8, &[u8])]) -> ProxyInfo {
        let mut body = vec![192, 0, 2, 1, 198, 51, 100, 2];
        body.extend_from_slice(&1000u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        for (t, v) in tlvs {
            body.push(*t);
            body.extend_from_slice(&(v.len() as u16).to_be_bytes());
            body.extend_from_slice(v);
        }
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.extend_from_slice(&[command, 0x11]);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(&body);
        let config = ParseConfig {
            include_tlvs: true,
            allow_v1: true,
            allow_v2: true,
        };
        let (header, used) = ProxyHeader::parse(&h, config).unwrap();
        assert_eq!(used, h.len());
        ProxyInfo {
            proxy: Addr::Inet("127.0.0.1:5000".parse().unwrap()),
            version: 2,
            header: header.into_owned(),
        }
    }

    /// An SSL TLV: `client` bits, `verify`, then sub-TLVs.
    fn ssl(client: u8, verify: u32, subs: &[(u8, &str)]) -> Vec<u8> {
        let mut v = vec![client];
        v.extend_from_slice(&verify.to_be_bytes());
        for (t, s) in subs {
            v.push(*t);
            v.extend_from_slice(&(s.len() as u16).to_be_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        v
    }

    #[test]
    fn every_field_of_a_v2_header_reads_back() {
        let tls = ssl(
            0x01 | 0x02,
            0,
            &[
                (0x21, "TLSv1.3"),
                (0x22, "client.example"),
                (0x23, "TLS_AES_128_GCM_SHA256"),
                (0x24, "ECDSA-SHA256"),
                (0x25, "EC256"),
            ],
        );
        let i = info(
            0x21,
            &[
                (0x01, b"h2"),
                (0x02, b"example.com"),
                (0x05, b"\x00\x01id"),
                (0x20, &tls),
            ],
        );
        assert_eq!(i.proxy_addr().to_string(), "127.0.0.1:5000");
        assert_eq!(i.version(), 2);
        assert!(!i.is_local());
        assert_eq!(i.destination(), Some("198.51.100.2:443".parse().unwrap()));
        assert_eq!(i.authority(), Some("example.com"));
        assert_eq!(i.alpn(), Some(&b"h2"[..]));
        assert_eq!(i.unique_id(), Some(&b"\x00\x01id"[..]));
        let s = i.ssl().unwrap();
        assert!(s.client_ssl && s.client_cert && s.verified, "{s:?}");
        assert_eq!(s.version.as_deref(), Some("TLSv1.3"));
        assert_eq!(s.cn.as_deref(), Some("client.example"));
        assert_eq!(s.cipher.as_deref(), Some("TLS_AES_128_GCM_SHA256"));
        assert_eq!(s.sig_alg.as_deref(), Some("ECDSA-SHA256"));
        assert_eq!(s.key_alg.as_deref(), Some("EC256"));
        let shown = format!("{i:?}");
        assert!(
            shown.starts_with("ProxyInfo { proxy: ") && shown.contains("version: 2"),
            "{shown}"
        );
    }

    #[test]
    fn absent_fields_are_none_and_the_ssl_flags_read_as_sent() {
        let bare = info(0x21, &[]);
        assert_eq!(
            (bare.authority(), bare.alpn(), bare.unique_id()),
            (None, None, None)
        );
        assert!(bare.ssl().is_none());
        let local = info(0x20, &[]);
        assert!(local.is_local());
        assert_eq!(local.destination(), None);
        // A certificate on the session only (0x04) is a certificate; a verify result other
        // than 0 is a failed verification; no TLS at all is no TLS.
        let sess = info(0x21, &[(0x20, &ssl(0x01 | 0x04, 1, &[]))])
            .ssl()
            .unwrap();
        assert!(
            sess.client_ssl && sess.client_cert && !sess.verified,
            "{sess:?}"
        );
        let none = info(0x21, &[(0x20, &ssl(0, 0, &[]))]).ssl().unwrap();
        assert_eq!(
            none,
            ProxySsl {
                verified: true,
                ..ProxySsl::default()
            }
        );
    }
}
