//! Handlers made of closures, for one-off behaviour that does not deserve a type of its own.

use std::fmt;

use crate::{Handler, HandlerResult, Request};

/// A [`Handler`] that calls a closure to serve each connection; made by [`handler_fn`].
pub struct HandlerFn<F>(F);

/// Makes a [`Handler`] of a closure: it is called once per connection, as
/// [`Handler::handle`], with the connection's [`Request`]. The factory the server takes makes
/// one per connection, so state the closure owns is per connection; share state between
/// connections through an `Arc` the factory captures.
///
/// ```no_run
/// use std::io::Write;
/// use socketserver::{TcpServer, handler_fn};
///
/// let server = TcpServer::bind("127.0.0.1:9000", || {
///     handler_fn(|req| {
///         let peer = req.peer_addr().clone();
///         writeln!(req, "hello, {peer}")?;
///         Ok(())
///     })
/// })?;
/// server.serve_forever();
/// # Ok::<(), socketserver::Error>(())
/// ```
pub fn handler_fn<F>(f: F) -> HandlerFn<F>
where
    F: FnMut(&mut Request) -> HandlerResult + Send + 'static,
{
    HandlerFn(f)
}

impl<F> Handler for HandlerFn<F>
where
    F: FnMut(&mut Request) -> HandlerResult + Send + 'static,
{
    fn handle(&mut self, req: &mut Request) -> HandlerResult {
        (self.0)(req)
    }
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn").finish_non_exhaustive()
    }
}
