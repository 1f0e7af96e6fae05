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
