//! Python's `multiprocessing.connection` wire format: length-prefixed messages
//! ([`MpConnection`]). The mutual handshake that opens a connection is an authentication
//! protocol and lives with the other one, in `auth/mp.rs`.

mod frame;

pub(crate) use frame::read_frame;
#[cfg(test)]
pub(crate) use frame::write_frame;
pub use frame::{DEFAULT_MAX_MESSAGE, MpConnection};
