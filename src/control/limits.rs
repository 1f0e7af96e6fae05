//! What a server lets in at once: the connection limit (a semaphore of permits), the count of
//! open connections per client address under `max_per_source` (sharded, so that counting one
//! client never waits for another's), and the wake-up of the pressure policy that sheds idle
//! connections when the limit is reached.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::shutdown::Shutdown;
use crate::wait::{lock, wait_until};

/// A counting semaphore whose waits end early when shutdown is requested. The pool uses it for
/// idle workers and thread mode for its connection limit: the acceptor takes a permit *before*
/// accepting, so the excess waits in the kernel backlog, not in a queue of ours.
struct Limiter {
    state: Mutex<Slots>,
    freed: Condvar,
}

/// Free slots, and who waits for one: threads (notifying nobody is a wasted system call), and
/// at most one listener that waits on no thread (event mode's, out of its workers' set).
struct Slots {
    free: usize,
    waiting: usize,
    /// Re-arms that listener: the next permit released runs it, once.
    parked: Option<Rearm>,
}

/// What a freed permit runs for a listener that waits for one on no thread; see
/// [`Limits::try_acquire_or_park`].
pub(crate) type Rearm = Box<dyn FnOnce() + Send>;

/// What wakes the reaper besides its clock: a newcomer that found the server at
/// `max_connections` (it sheds the idlest connections at once), or the server closing.
#[derive(Default)]
pub(crate) struct Pressure {
    pub(crate) state: Mutex<PressureState>,
    pub(crate) wake: Condvar,
    /// A reaper runs (activity is tracked): only then is waking it worth a system call.
    pub(crate) watched: AtomicBool,
    /// A connection was shed for a newcomer and the accept loop has not taken its slot yet:
    /// shed no other until it has (the one shed leaves its registry entry before its slot).
    pub(crate) shed_pending: AtomicBool,
}

#[derive(Default)]
pub(crate) struct PressureState {
    pub(crate) stop: bool,
    pub(crate) wanted: bool,
}

/// Shards of the per-source counts: a connection opening or closing locks one, chosen by its
/// client's address.
const SOURCE_SHARDS: usize = 16;

/// Open connections per client address, for `max_per_source`.
struct Sources {
    shards: [Mutex<HashMap<IpAddr, usize>>; SOURCE_SHARDS],
    hasher: RandomState,
}

impl Sources {
    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, usize>> {
        // The modulo of a 64-bit hash by 16 fits in usize.
        &self.shards[(self.hasher.hash_one(ip) % SOURCE_SHARDS as u64) as usize]
    }
}

/// The connection limit and the per-source cap of one server.
pub(crate) struct Limits {
    limiter: Option<Limiter>,
    /// The cap `limiter` enforces (`None`: sync mode, or no system limit known).
    max_connections: Option<usize>,
    /// Most connections at once from one client IP address.
    max_per_source: Option<usize>,
    sources: Sources,
    /// The reaper's wake-up: its stop flag, and a newcomer waiting for a slot.
    pub(crate) pressure: Pressure,
}

impl Limits {
    /// `limit`: the most requests in flight (`None`: no limit); `max_per_source`: the most
    /// connections from one client IP address.
    pub(crate) fn new(limit: Option<usize>, max_per_source: Option<usize>) -> Limits {
        Limits {
            limiter: limit.map(|n| Limiter {
                state: Mutex::new(Slots {
                    free: n,
                    waiting: 0,
                    parked: None,
                }),
                freed: Condvar::new(),
            }),
            max_connections: limit,
            max_per_source,
            sources: Sources {
                shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
                hasher: RandomState::new(),
            },
            pressure: Pressure::default(),
        }
    }

    /// Wakes every thread waiting for a slot, to see the shutdown `request` has just set.
    pub(crate) fn wake_waiters(&self) {
        if let Some(l) = &self.limiter {
            // Taking the lock orders this notify after any waiter's flag check.
            drop(lock(&l.state));
            l.freed.notify_all();
        }
    }

    fn permit(self: &Arc<Self>, slots: &mut Slots) -> Permit {
        slots.free -= 1;
        self.pressure.shed_pending.store(false, Ordering::Relaxed);
        Permit {
            limits: self.clone(),
        }
    }

    /// Takes a slot under the limit, waiting while none is free. `None` once `shutdown` is
    /// requested or the deadline passes. Without a limit, always a permit.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        shutdown: &Shutdown,
        deadline: Option<Instant>,
    ) -> Option<Permit> {
        let Some(l) = &self.limiter else {
            return Some(Permit {
                limits: self.clone(),
            });
        };
        let mut slots = lock(&l.state);
        loop {
            if shutdown.requested() {
                return None;
            }
            if slots.free > 0 {
                return Some(self.permit(&mut slots));
            }
            slots.waiting += 1;
            // Full: the reaper sheds the idlest connections to make room. (Lock order: the
            // slots, then the reaper's state; the reaper never holds its own while it asks
            // for the slots.)
            if self.pressure.watched.load(Ordering::Relaxed) {
                lock(&self.pressure.state).wanted = true;
                self.pressure.wake.notify_all();
            }
            let woken = wait_until(&l.freed, slots, deadline);
            // Re-lock to undo the count even when the deadline had passed.
            slots = woken.unwrap_or_else(|| lock(&l.state));
            slots.waiting -= 1;
            if deadline.is_some_and(|d| Instant::now() >= d) && slots.free == 0 {
                return None;
            }
        }
    }

    /// Slots free right now under the limit; `None` without a limit.
    pub(crate) fn free_slots(&self) -> Option<usize> {
        self.limiter.as_ref().map(|l| lock(&l.state).free)
    }

    /// Takes a slot only if one is free right now.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let Some(l) = &self.limiter else {
            return Some(Permit {
                limits: self.clone(),
            });
        };
        let mut slots = lock(&l.state);
        (slots.free > 0).then(|| self.permit(&mut slots))
    }

    /// Takes a slot if one is free right now; otherwise `rearm` waits for one, and the next
    /// permit released runs it (the caller's listener, which does not accept meanwhile, so that
    /// the newcomer waits in the backlog). A listener waiting so counts as a newcomer waiting:
    /// the pressure policy sheds an idle connection for it.
    pub(crate) fn try_acquire_or_park(self: &Arc<Self>, rearm: Rearm) -> Option<Permit> {
        let Some(l) = &self.limiter else {
            return Some(Permit {
                limits: self.clone(),
            });
        };
        let mut slots = lock(&l.state);
        if slots.free > 0 {
            return Some(self.permit(&mut slots));
        }
        slots.parked = Some(rearm);
        // Lock order as in `acquire`: the slots, then the reaper's state.
        if self.pressure.watched.load(Ordering::Relaxed) {
            lock(&self.pressure.state).wanted = true;
            self.pressure.wake.notify_all();
        }
        None
    }

    /// Whether the accept loop waits for a slot: none is free under the limit.
    pub(crate) fn is_full(&self) -> bool {
        self.limiter.as_ref().is_some_and(|l| {
            let slots = lock(&l.state);
            slots.waiting + usize::from(slots.parked.is_some()) > slots.free
        })
    }

    /// The cap on requests in flight (`None` in sync mode).
    pub(crate) fn max_connections(&self) -> Option<usize> {
        self.max_connections
    }

    pub(crate) fn max_per_source(&self) -> Option<usize> {
        self.max_per_source
    }

    /// Counts one more connection from `ip` under `max_per_source`, until the claim is
    /// dropped. `None` if `ip` is at the cap; `Some(None)` without a cap.
    pub(crate) fn claim_source(self: &Arc<Self>, ip: IpAddr) -> Option<Option<SourceClaim>> {
        let Some(max) = self.max_per_source else {
            return Some(None);
        };
        let mut shard = lock(self.sources.shard(&ip));
        let open = shard.entry(ip).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(Some(SourceClaim {
            limits: self.clone(),
            ip,
        }))
    }
}

/// A slot under the connection limit, given back when the request ends.
pub(crate) struct Permit {
    limits: Arc<Limits>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(l) = &self.limits.limiter {
            let mut slots = lock(&l.state);
            slots.free += 1;
            if slots.waiting > 0 {
                l.freed.notify_one();
            }
            let parked = slots.parked.take();
            let full = slots.waiting > 0 || parked.is_some();
            drop(slots);
            // Outside the lock: the listener's owner takes its own.
            if let Some(rearm) = parked {
                rearm();
            }
            // The pressure policy waits for this slot (the one it shed, leaving).
            let p = &self.limits.pressure;
            if full && p.watched.load(Ordering::Relaxed) {
                drop(lock(&p.state));
                p.wake.notify_all();
            }
        }
    }
}

/// One connection counted against `max_per_source`; see [`Limits::claim_source`].
pub(crate) struct SourceClaim {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Drop for SourceClaim {
    fn drop(&mut self) {
        let mut shard = lock(self.limits.sources.shard(&self.ip));
        if let Some(open) = shard.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                shard.remove(&self.ip);
            }
        }
    }
}
