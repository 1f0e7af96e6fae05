//! Python's `multiprocessing.connection` wire format: length-prefixed messages
//! ([`MpConnection`]). The mutual handshake that opens a connection is an authentication
//! protocol and lives with the other one, in `auth/mp.rs`.

mod frame;

#[cfg(test)]
pub(crate) use frame::write_frame;
pub use frame::{DEFAULT_MAX_MESSAGE, DEFAULT_MP_BUDGET, MpBudget, MpConnection};
pub(crate) use frame::{Limits, read_frame};
