//! The scheduling policy of the thread that accepts for [`Dispatch::Event`](super::Dispatch):
//! `SCHED_BATCH` while it accepts.
//!
//! Event mode serves every connection on a few workers, a thread per core, and the thread that
//! calls `serve_forever` only accepts. Under the default policy that thread, woken by each new
//! connection, preempts the worker of its core at once: two context switches per connection,
//! the worker's cache lost each time. Pinned to one core with 8 clients in a TLS connect loop
//! (resumed handshakes), that was the gap to tokio's single thread (measured by `perf`: 6.5%
//! of the server's time in `finish_task_switch` and 3% in preemption, which tokio's profile
//! does not have). `SCHED_BATCH` is the policy Linux has for exactly this: the thread keeps its
//! share of the CPU and its nice value, but its wake-ups no longer preempt the thread running,
//! so it accepts when the worker waits or its slice ends, a batch of connections at a time.
//! A worker that has nothing else to do waits in `epoll_wait`, so a new connection on an idle
//! server is accepted as fast as before.
//!
//! The policy is set only over `SCHED_OTHER` (a user who chose another keeps it) and put back
//! when `serve_forever` returns. Elsewhere than Linux it is not touched.

/// Holds `SCHED_BATCH` on the calling thread; puts `SCHED_OTHER` back when dropped.
pub(crate) struct AcceptBatched {
    #[cfg(target_os = "linux")]
    set: bool,
}

/// Switches the calling thread from `SCHED_OTHER` to `SCHED_BATCH`, if that is its policy.
pub(crate) fn accept_batched() -> AcceptBatched {
    #[cfg(target_os = "linux")]
    {
        let set = policy() == libc::SCHED_OTHER && set_policy(libc::SCHED_BATCH);
        AcceptBatched { set }
    }
    #[cfg(not(target_os = "linux"))]
    AcceptBatched {}
}

impl Drop for AcceptBatched {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if self.set && !set_policy(libc::SCHED_OTHER) {
            log::debug!("could not put SCHED_OTHER back on the accepting thread");
        }
    }
}

/// The calling thread's scheduling policy.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn policy() -> libc::c_int {
    // SAFETY: `sched_getscheduler` takes a thread id by value (0: the calling thread) and
    // touches no memory of ours; it returns the policy or -1.
    unsafe { libc::sched_getscheduler(0) }
}

/// Sets the calling thread's policy (a non-real-time one: priority 0); whether it took.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is an initialised `sched_param` that lives across the call, which only
    // reads it; thread id 0 is the calling thread (on Linux the policy is per thread). Moving
    // between SCHED_OTHER and SCHED_BATCH needs no privilege; on failure nothing changed.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}
