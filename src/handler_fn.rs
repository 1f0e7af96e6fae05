//! Handlers made of closures, for one-off behaviour that does not deserve a type of its own:
//! one helper per handler trait, each returning a bare handler of that trait.

use std::fmt;

use crate::{
    DatagramHandler, DatagramRequest, Handler, HandlerError, HandlerResult, MessageHandler, Next,
    Request,
};

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

/// A [`MessageHandler`] that calls a closure for each message; made by [`message_fn`].
pub struct MessageFn<F>(F);

/// Makes a [`MessageHandler`] of a closure that serves one message per call, for every
/// dispatch mode, event mode included (a message handler is a [`Handler`] too).
///
/// ```no_run
/// use std::io::Write;
/// use socketserver::{Next, TcpServer, message_fn};
///
/// let server = TcpServer::builder(|| {
///     message_fn(|req| {
///         let mut line = String::new();
///         if req.rfile.read_line(&mut line)? == 0 {
///             return Ok(Next::Close);
///         }
///         write!(req.wfile, "{}", line.to_uppercase())?;
///         Ok(Next::Message)
///     })
/// })
/// .event(2) // Linux; or .dispatch(Dispatch::Thread), the default, anywhere
/// .bind("127.0.0.1:9000")?;
/// server.serve_forever();
/// # Ok::<(), socketserver::Error>(())
/// ```
pub fn message_fn<F>(f: F) -> MessageFn<F>
where
    F: FnMut(&mut Request) -> Result<Next, HandlerError> + Send + 'static,
{
    MessageFn(f)
}

impl<F> MessageHandler for MessageFn<F>
where
    F: FnMut(&mut Request) -> Result<Next, HandlerError> + Send + 'static,
{
    fn handle_message(&mut self, req: &mut Request) -> Result<Next, HandlerError> {
        (self.0)(req)
    }
}

impl<F> fmt::Debug for MessageFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageFn").finish_non_exhaustive()
    }
}

/// A [`DatagramHandler`] that calls a closure for each datagram; made by [`datagram_fn`].
pub struct DatagramFn<F>(F);

/// Makes a [`DatagramHandler`] of a closure, called once per datagram.
///
/// ```no_run
/// use socketserver::{UdpServer, datagram_fn};
///
/// let server = UdpServer::bind("127.0.0.1:9000", || {
///     datagram_fn(|req| {
///         let reply = req.packet().to_ascii_uppercase();
///         req.wfile.extend_from_slice(&reply);
///         Ok(())
///     })
/// })?;
/// server.serve_forever();
/// # Ok::<(), socketserver::Error>(())
/// ```
pub fn datagram_fn<F>(f: F) -> DatagramFn<F>
where
    F: FnMut(&mut DatagramRequest) -> HandlerResult + Send + 'static,
{
    DatagramFn(f)
}

impl<F> DatagramHandler for DatagramFn<F>
where
    F: FnMut(&mut DatagramRequest) -> HandlerResult + Send + 'static,
{
    fn handle(&mut self, req: &mut DatagramRequest) -> HandlerResult {
        (self.0)(req)
    }
}

impl<F> fmt::Debug for DatagramFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramFn").finish_non_exhaustive()
    }
}
