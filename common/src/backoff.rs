//! Exponential backoff with jitter: each wait is the doubled step (capped)
//! with a random half taken off, so clients that failed together do not
//! retry together.

use std::time::Duration;

/// The waits between attempts: `initial`, doubling up to `max`, each jittered
/// into `[step/2, step]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The un-jittered step of the next wait.
    pub fn step(&self) -> Duration {
        self.initial
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max)
    }

    /// How long to wait before the next attempt; moves to the next step.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.step();
        self.attempt = self.attempt.saturating_add(1);
        jitter(step)
    }

    /// Attempts made since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A random duration in `[d/2, d]`.
pub fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    let nanos = half.as_nanos().min(u64::MAX as u128) as u64;
    half + Duration::from_nanos(fastrand::u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_cap_and_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), ms(1000));
        let mut steps = vec![];
        for _ in 0..5 {
            steps.push(b.step());
            let w = b.next_wait();
            let s = *steps.last().unwrap();
            assert!(w >= s / 2 && w <= s, "{w:?}");
        }
        assert_eq!(steps, vec![ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        for _ in 0..100 {
            b.next_wait();
        }
        assert_eq!(b.step(), ms(1000), "no overflow after many attempts");
        b.reset();
        assert_eq!(b.step(), ms(200));
    }

    #[test]
    fn jitter_spreads_waits() {
        let d = Duration::from_millis(1000);
        let waits: std::collections::BTreeSet<_> = (0..50).map(|_| jitter(d)).collect();
        assert!(
            waits.len() > 40,
            "50 jittered waits should nearly all differ"
        );
        assert!(waits.iter().all(|w| *w >= d / 2 && *w <= d));
    }
}
