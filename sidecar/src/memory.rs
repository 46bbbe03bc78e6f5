//! Giving memory back after a config swap. The allocator is the binary's choice (mimalloc in
//! `weft-sidecar`, the system's in tests), so the library only calls a hook the binary may set.
//! mimalloc returns freed pages to the OS lazily, when the thread that freed them allocates
//! again; the xDS task frees a whole old config at once and then idles, so without the hook a
//! sidecar that loaded 10 000 endpoints kept ~13 MiB it no longer used (BENCHMARKS.md).

use std::sync::OnceLock;

static AFTER_SWAP: OnceLock<fn()> = OnceLock::new();

/// Sets what runs after each accepted config replaced the previous one (once per process; a
/// second call is ignored).
pub fn on_config_swap(f: fn()) {
    let _ = AFTER_SWAP.set(f);
}

/// Runs the hook, if one is set: called by the xDS client after it swapped a config in.
pub fn config_swapped() {
    if let Some(f) = AFTER_SWAP.get() {
        f();
    }
}
