//! The time source: monotonic instants for timers and wall-clock
//! milliseconds for what is recorded. Daemons use [`SystemClock`]; tests use
//! [`ManualClock`] and move it by hand, so a timeout can be reached without
//! sleeping through it.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Monotonic now.
    fn now(&self) -> Instant;
    /// Milliseconds since the Unix epoch.
    fn wall_ms(&self) -> u64;
}

/// The real clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    start_wall_ms: u64,
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    /// Starts at the real now.
    pub fn new() -> Self {
        ManualClock {
            start: Instant::now(),
            start_wall_ms: SystemClock.wall_ms(),
            elapsed: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        *self.elapsed.lock().expect("clock lock") += d;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.elapsed.lock().expect("clock lock")
    }
    fn wall_ms(&self) -> u64 {
        self.start_wall_ms + self.elapsed.lock().expect("clock lock").as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let c = ManualClock::new();
        let (t0, w0) = (c.now(), c.wall_ms());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.now(), t0);
        c.advance(Duration::from_secs(3));
        assert_eq!(c.now() - t0, Duration::from_secs(3));
        assert_eq!(c.wall_ms() - w0, 3000);
    }
}
