//! The agent's own memory. A long-lived daemon's heap rises with bursts
//! (hundreds of containers starting and ending at once) and must fall back
//! after them: glibc gives each thread that allocates an arena of its own
//! (up to eight per core, and the runtime's blocking pool has sixteen
//! threads) and keeps inside each what was freed there. The agent uses one
//! arena (its allocations are few and small; each thread's cache still takes
//! most of them without the lock) and hands free pages back to the kernel
//! every [`TRIM_EVERY`].

use std::time::Duration;

/// How often free heap pages are given back.
pub const TRIM_EVERY: Duration = Duration::from_secs(2);

/// One malloc arena for the whole process. Call before any thread starts.
pub fn single_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists, so no allocation races with it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Gives the heap's free pages back to the kernel. Blocking (it walks the
/// heap): call it off the async runtime.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
