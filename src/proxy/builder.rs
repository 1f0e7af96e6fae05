//! `Builder::proxy_protocol`: how a stream server takes the PROXY stage.

use super::config::ProxyProtocol;
use super::stage::ProxyStage;
use crate::Builder;
use crate::transport::StreamTransport;

#[cfg_attr(docsrs, doc(cfg(feature = "proxy-protocol")))]
impl<T: StreamTransport> Builder<T> {
    /// Reads a PROXY-protocol header (v1 or v2) from every connection before anything else,
    /// and believes it only from the proxies `config` trusts: see [`ProxyProtocol`].
    ///
    /// The header is the first admission stage, before TLS and [`auth`](Self::auth): it is
    /// read under the one [handshake deadline](Self::handshake_timeout) (5 s by default), which
    /// covers it and the handshakes after it together, and counts against the same
    /// [cap on unfinished handshakes](Self::max_pending_handshakes). Exactly the header
    /// is read; the bytes after it reach the handler. Handlers then see the client in
    /// [`Request::peer_addr`](crate::Request::peer_addr) (an IPv4 client named in a v2 IPv6
    /// header as `::ffff:a.b.c.d` is shown as IPv4) and the proxy in
    /// [`Request::proxy_addr`](crate::Request::proxy_addr).
    ///
    /// [`verify_request`](Self::verify_request) then runs after the header, on the
    /// connection's worker, with the client's address (the proxy's for a `LOCAL` health
    /// check); [`max_per_source`](Self::max_per_source) counts clients, not the proxy.
    pub fn proxy_protocol(mut self, config: ProxyProtocol) -> Self {
        self.service
            .admission
            .add(Box::new(ProxyStage::new(config)));
        self
    }
}
