//! Giving memory back after config swaps. The allocator is the binary's choice (mimalloc in
//! `weft-sidecar`, the system's in tests), so the library only calls a hook the binary may set.
//! mimalloc returns freed pages to the OS lazily, when the thread that freed them allocates
//! again; the xDS task frees a whole old config at once and then idles, so without the hook a
//! sidecar that loaded 10 000 endpoints kept ~13 MiB it no longer used (BENCHMARKS.md).
//!
//! A forced collection walks the allocator's heaps, so it is not run per swap: an EDS stream
//! that changes every few milliseconds would pay it each time on a runtime worker. It runs
//! once the config has been quiet for [`QUIET`] (trailing debounce), on a task spawned from the
//! xDS task (tokio puts it on that worker's queue: the thread that freed the old config).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How long the config must stay unchanged before freed memory is given back.
pub const QUIET: Duration = Duration::from_secs(2);

static AFTER_SWAP: OnceLock<fn()> = OnceLock::new();
static COLLECTOR: Debounce = Debounce::new();

/// Sets what runs once swaps have been quiet for [`QUIET`] (once per process; a second call is
/// ignored).
pub fn on_config_swap(f: fn()) {
    let _ = AFTER_SWAP.set(f);
}

/// Notes a swap: called by the xDS client after it swapped a config in, inside its runtime.
/// Without a hook set, nothing is scheduled.
pub fn config_swapped() {
    if let Some(f) = AFTER_SWAP.get() {
        COLLECTOR.swapped(*f, QUIET);
    }
}

/// A trailing debounce: [`Debounce::swapped`] may be called any number of times; the hook runs
/// once, after `quiet` with no further call.
pub struct Debounce {
    /// Swaps so far.
    swaps: AtomicU64,
    /// Whether a task is waiting to run the hook.
    pending: AtomicBool,
}

impl Debounce {
    /// A debounce with nothing pending.
    pub const fn new() -> Self {
        Debounce {
            swaps: AtomicU64::new(0),
            pending: AtomicBool::new(false),
        }
    }

    /// Notes a swap; starts the waiting task unless one already waits (it will see this swap).
    pub fn swapped(&'static self, hook: fn(), quiet: Duration) {
        self.swaps.fetch_add(1, Ordering::SeqCst);
        if self.pending.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(async move {
            loop {
                let seen = self.swaps.load(Ordering::SeqCst);
                tokio::time::sleep(quiet).await;
                if self.swaps.load(Ordering::SeqCst) == seen {
                    break;
                }
            }
            self.pending.store(false, Ordering::SeqCst);
            // A swap between the last check and the store above started no task; it has
            // freed its memory by now, and this collection gets it too.
            hook();
        });
    }
}

impl Default for Debounce {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static RUNS: AtomicU64 = AtomicU64::new(0);
    fn count() {
        RUNS.fetch_add(1, Ordering::SeqCst);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_swaps_collects_once_after_it_goes_quiet() {
        static D: Debounce = Debounce::new();
        let quiet = Duration::from_secs(2);
        // Twenty swaps 100 ms apart: nothing runs while they keep coming.
        for _ in 0..20 {
            D.swapped(count, quiet);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(RUNS.load(Ordering::SeqCst), 0, "ran during the burst");
        tokio::time::sleep(quiet * 2).await;
        assert_eq!(RUNS.load(Ordering::SeqCst), 1, "once after the burst");
        // A later swap collects again, once.
        D.swapped(count, quiet);
        tokio::time::sleep(quiet * 3).await;
        assert_eq!(RUNS.load(Ordering::SeqCst), 2);
    }
}
