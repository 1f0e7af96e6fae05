//! Challenge bytes from one process-wide CSPRNG.
//!
//! Seeding a generator per thread costs a `getrandom` call and a cipher setup for every
//! connection in thread-per-connection mode; one shared generator, seeded from the OS, costs a
//! lock. It is reseeded when the process ID changes, so a forked child never repeats its
//! parent's challenges (which would let a recorded answer be replayed).

use std::io;
use std::sync::Mutex;

use rand::rngs::{StdRng, SysRng};
use rand::{Rng, SeedableRng};

use crate::control::lock;

static SOURCE: Mutex<Option<(rustix::process::Pid, StdRng)>> = Mutex::new(None);

/// Fills `buf` with cryptographically secure random bytes. Fails only if the OS cannot seed
/// the generator.
pub(crate) fn fill(buf: &mut [u8]) -> io::Result<()> {
    let pid = rustix::process::getpid();
    let mut source = lock(&SOURCE);
    let rng = match &mut *source {
        Some((seeded_in, rng)) if *seeded_in == pid => rng,
        other => {
            // Straight from the OS: a forked child's thread-local generators are copies too.
            let seeded = StdRng::try_from_rng(&mut SysRng).map_err(io::Error::other)?;
            &mut other.insert((pid, seeded)).1
        }
    };
    rng.fill_bytes(buf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;

    #[test]
    fn challenges_differ() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        super::fill(&mut a).unwrap();
        super::fill(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
    }

    /// What a forked child finds: the generator recorded under another process ID. It must
    /// not go on from the parent's state (both would send the same challenges).
    #[test]
    fn a_generator_seeded_in_another_process_is_replaced() {
        use rand::{Rng, SeedableRng};
        let parent = rustix::process::getppid().expect("the test has a parent process");
        let mut copy = StdRng::seed_from_u64(26);
        let mut parents_next = [0u8; 32];
        copy.fill_bytes(&mut parents_next);
        *super::lock(&super::SOURCE) = Some((parent, StdRng::seed_from_u64(26)));
        let mut ours = [0u8; 32];
        super::fill(&mut ours).unwrap();
        assert_ne!(
            ours, parents_next,
            "the parent's generator state was reused"
        );
        let recorded = super::lock(&super::SOURCE).as_ref().map(|(pid, _)| *pid);
        assert_eq!(recorded, Some(rustix::process::getpid()));
    }
}
