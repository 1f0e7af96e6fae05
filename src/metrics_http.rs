//! A `/metrics` endpoint for Prometheus, served over HTTP/1.1 by this crate's own
//! [`TcpServer`]: a side port that a scraper reads, with no HTTP dependency.
//!
//! It answers `GET /metrics` (and `HEAD`) with the text exposition that `render` returns,
//! `Content-Type: text/plain; version=0.0.4; charset=utf-8`, a `Content-Length` and
//! `Connection: close`; any other path gets 404, any other method 405, a malformed request 400.
//! What a client can make it hold is bounded: a request head of at most 8 KiB, read within 5 s,
//! two workers (more scrapers wait in the backlog).
//!
//! ```no_run
//! use socketserver::{TcpServer, handler_fn, metrics_http};
//!
//! let server = TcpServer::bind("127.0.0.1:9000", || handler_fn(|_req| Ok(())))?;
//! let handle = server.handle();
//! let metrics = metrics_http::bind("127.0.0.1:9100", move || handle.prometheus())?;
//! std::thread::spawn(move || metrics.serve_forever());
//! server.serve_forever();
//! # Ok::<(), socketserver::Error>(())
//! ```

use std::io::{Read, Write};
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::prometheus::PROMETHEUS_CONTENT_TYPE;
use crate::transport::Tcp;
use crate::{Builder, Dispatch, Handler, HandlerResult, Request, Result, Server, TcpServer};

/// The longest request head accepted (request line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;

/// How long a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The handler of the endpoint: one request per connection, answered from `render`.
#[derive(Clone)]
pub struct MetricsHttp {
    render: Arc<dyn Fn() -> String + Send + Sync>,
}

impl MetricsHttp {
    /// An endpoint whose `/metrics` page is what `render` returns at each scrape (say,
    /// [`ServerHandle::prometheus`](crate::ServerHandle::prometheus), or
    /// [`render_prometheus`](crate::render_prometheus) over several servers).
    pub fn new(render: impl Fn() -> String + Send + Sync + 'static) -> MetricsHttp {
        MetricsHttp {
            render: Arc::new(render),
        }
    }
}

/// A builder for the endpoint's server, bounded as the module says; bind it where you like, or
/// change its settings first.
pub fn builder(render: impl Fn() -> String + Send + Sync + 'static) -> Builder<Tcp<MetricsHttp>> {
    let handler = MetricsHttp::new(render);
    TcpServer::builder(move || handler.clone())
        .dispatch(Dispatch::Pool { workers: 2 })
        .read_timeout(REQUEST_TIMEOUT)
        .write_timeout(REQUEST_TIMEOUT)
        .idle_timeout(REQUEST_TIMEOUT)
}

/// Binds the endpoint on `addr`; run it with `serve_forever` on a thread of its own.
pub fn bind(
    addr: impl ToSocketAddrs + std::fmt::Debug,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> Result<Server<Tcp<MetricsHttp>>> {
    builder(render).bind(addr)
}

/// What the request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Metrics { head_only: bool },
    NotFound,
    MethodNotAllowed,
    BadRequest,
    TooLarge,
}

/// Reads the request head: up to the blank line, at most [`MAX_REQUEST`] bytes, within
/// [`REQUEST_TIMEOUT`]. `None` if the client hung up or went quiet first.
fn read_head(r: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = find_end(&head) {
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST || Instant::now() >= deadline {
            return Ok(Some(head));
        }
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
}

/// Where the head ends (`\r\n\r\n`, or a bare `\n\n`, which RFC 9112 lets a server accept).
fn find_end(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = b.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn answer(head: &[u8]) -> Answer {
    if head.len() > MAX_REQUEST {
        return Answer::TooLarge;
    }
    let Ok(text) = std::str::from_utf8(head) else {
        return Answer::BadRequest;
    };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Answer::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || target.is_empty() {
        return Answer::BadRequest;
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Answer::MethodNotAllowed,
    };
    let path = target.split(['?', '#']).next().unwrap_or("");
    if path == "/metrics" {
        Answer::Metrics { head_only }
    } else {
        Answer::NotFound
    }
}

fn respond(
    w: &mut impl Write,
    status: &str,
    extra: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    w.write_all(out.as_bytes())
}

impl Handler for MetricsHttp {
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        let Some(head) = read_head(req)? else {
            return Ok(());
        };
        let text = "text/plain; charset=utf-8";
        match answer(&head) {
            Answer::Metrics { head_only } => {
                let page = (self.render)();
                respond(req, "200 OK", "", PROMETHEUS_CONTENT_TYPE, &page, head_only)?
            }
            Answer::NotFound => respond(
                req,
                "404 Not Found",
                "",
                text,
                "not found; try /metrics\n",
                false,
            )?,
            Answer::MethodNotAllowed => respond(
                req,
                "405 Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                text,
                "only GET and HEAD\n",
                false,
            )?,
            Answer::BadRequest => {
                respond(req, "400 Bad Request", "", text, "bad request\n", false)?
            }
            Answer::TooLarge => respond(
                req,
                "431 Request Header Fields Too Large",
                "",
                text,
                "request head too large\n",
                false,
            )?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_answered_by_path_and_method() {
        assert_eq!(
            answer(b"GET /metrics HTTP/1.1\r\nHost: x"),
            Answer::Metrics { head_only: false }
        );
        assert_eq!(
            answer(b"HEAD /metrics?x=1 HTTP/1.0"),
            Answer::Metrics { head_only: true }
        );
        assert_eq!(answer(b"GET / HTTP/1.1"), Answer::NotFound);
        assert_eq!(answer(b"GET /metricsx HTTP/1.1"), Answer::NotFound);
        assert_eq!(answer(b"POST /metrics HTTP/1.1"), Answer::MethodNotAllowed);
        assert_eq!(answer(b"GET /metrics"), Answer::BadRequest);
        assert_eq!(answer(b"GET /metrics SPDY/3"), Answer::BadRequest);
        assert_eq!(answer(b"\xff\xfe"), Answer::BadRequest);
        assert_eq!(answer(&[b'a'; MAX_REQUEST + 1]), Answer::TooLarge);
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(14));
        assert_eq!(find_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
