//! Handlers made of closures, for one-off behaviour that does not deserve a type of its own.

use std::fmt;

use crate::{
    Handler, HandlerError, HandlerResult, MessageHandler, MessageRequestHandler, Next, Request,
    StreamRequest,
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

/// Makes a handler of a closure that serves one message per call, for every dispatch mode,
/// [`Dispatch::Event`](crate::Dispatch::Event) included: the closure is
/// [`MessageHandler::handle_message`], wrapped in a [`MessageRequestHandler`].
///
/// ```no_run
/// use std::io::Write;
/// use socketserver::{Dispatch, Next, TcpServer, message_fn};
///
/// let server = TcpServer::builder(|| {
///     message_fn(|s| {
///         let mut line = String::new();
///         if s.rfile.read_line(&mut line)? == 0 {
///             return Ok(Next::Close);
///         }
///         write!(s.wfile, "{}", line.to_uppercase())?;
///         Ok(Next::Message)
///     })
/// })
/// .dispatch(Dispatch::Event { workers: 2 })
/// .bind("127.0.0.1:9000")?;
/// server.serve_forever();
/// # Ok::<(), socketserver::Error>(())
/// ```
pub fn message_fn<F>(f: F) -> MessageRequestHandler<MessageFn<F>>
where
    F: FnMut(&mut StreamRequest) -> Result<Next, HandlerError> + Send + 'static,
{
    MessageRequestHandler::new(MessageFn(f))
}

impl<F> MessageHandler for MessageFn<F>
where
    F: FnMut(&mut StreamRequest) -> Result<Next, HandlerError> + Send + 'static,
{
    fn handle_message(&mut self, s: &mut StreamRequest) -> Result<Next, HandlerError> {
        (self.0)(s)
    }
}

impl<F> fmt::Debug for MessageFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageFn").finish_non_exhaustive()
    }
}
