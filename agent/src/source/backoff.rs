//! Capped exponential backoff with jitter, for reconnects (MQTT source) and retries
//! (forwarders).
//!
//! rumqttc reconnects on the very next `poll()` after an error, with no delay at all
//! (rumqtt issues #703, #918), so every caller sleeps `next_delay()` after a failure and calls
//! `reset()` once the peer answered again.
//!
//! Schedule: the *ceiling* starts at `initial` and doubles after every delay, capped at `max`.
//! Each delay is drawn uniformly from `[initial, ceiling]` ("full jitter" over the window, with
//! `initial` as the floor). The jitter spreads a fleet of gateways that lost the same broker
//! or cloud endpoint at the same moment; the floor keeps a flapping peer from ever seeing a
//! hot reconnect loop, which plain `[0, ceiling]` jitter allows now and then.
//!
//! Invariants: `initial.min(max) <= next_delay() <= max`, always; the ceiling never
//! decreases except through `reset()`.

use std::time::Duration;

/// Capped exponential backoff with jitter; see the module docs for the schedule.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Floor of every delay (the configured initial delay, capped at `max`).
    initial: Duration,
    /// Cap of the ceiling.
    max: Duration,
    /// Upper bound of the next delay.
    ceiling: Duration,
    rng: fastrand::Rng,
}

/// The smallest step the ceiling grows by, so that a zero initial delay still backs off.
const MIN_STEP: Duration = Duration::from_millis(1);

impl Backoff {
    /// A backoff starting at `initial` and never exceeding `max`, with a random seed.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self::with_rng(initial, max, fastrand::Rng::new())
    }

    /// A backoff whose jitter is reproducible (tests, simulations).
    pub fn with_seed(initial: Duration, max: Duration, seed: u64) -> Self {
        Self::with_rng(initial, max, fastrand::Rng::with_seed(seed))
    }

    fn with_rng(initial: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        let initial = initial.min(max);
        Self { initial, max, ceiling: initial, rng }
    }

    /// The delay to sleep before the next attempt; grows the window for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let low = duration_nanos(self.initial);
        let high = duration_nanos(self.ceiling).max(low);
        let delay = Duration::from_nanos(self.rng.u64(low..=high));
        self.ceiling = self.ceiling.saturating_mul(2).max(MIN_STEP).min(self.max);
        delay
    }

    /// Starts over from the initial delay (call it once the peer answered).
    pub fn reset(&mut self) {
        self.ceiling = self.initial;
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        self.ceiling
    }
}

/// Nanoseconds, saturating at `u64::MAX` (584 years: no real delay gets there).
fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_stay_between_the_initial_delay_and_the_cap() {
        let mut b = Backoff::with_seed(200 * MS, 30_000 * MS, 7);
        for _ in 0..200 {
            let d = b.next_delay();
            assert!(d >= 200 * MS && d <= 30_000 * MS, "{d:?} out of bounds");
        }
        assert_eq!(b.ceiling(), 30_000 * MS);
    }

    #[test]
    fn the_ceiling_doubles_until_the_cap() {
        let mut b = Backoff::with_seed(100 * MS, 1_000 * MS, 1);
        let mut ceilings = vec![b.ceiling()];
        for _ in 0..6 {
            let _ = b.next_delay();
            ceilings.push(b.ceiling());
        }
        let expected: Vec<Duration> =
            [100, 200, 400, 800, 1_000, 1_000, 1_000].iter().map(|&n| n * MS).collect();
        assert_eq!(ceilings, expected);
    }

    #[test]
    fn delays_grow_on_average() {
        let mut b = Backoff::with_seed(10 * MS, 10_000 * MS, 3);
        let early: Duration = (0..2).map(|_| b.next_delay()).sum();
        for _ in 0..10 {
            let _ = b.next_delay();
        }
        let late: Duration = (0..2).map(|_| b.next_delay()).sum();
        // Early delays are at most 10 + 20 ms; late ones are drawn from [10 ms, 10 s].
        assert!(early <= 30 * MS);
        assert!(late > early, "late {late:?} <= early {early:?}");
    }

    #[test]
    fn reset_returns_to_the_initial_window() {
        let mut b = Backoff::with_seed(50 * MS, 5_000 * MS, 9);
        for _ in 0..10 {
            let _ = b.next_delay();
        }
        b.reset();
        assert_eq!(b.ceiling(), 50 * MS);
        assert_eq!(b.next_delay(), 50 * MS);
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let mut a = Backoff::with_seed(10 * MS, 1_000 * MS, 42);
        let mut b = Backoff::with_seed(10 * MS, 1_000 * MS, 42);
        for _ in 0..20 {
            assert_eq!(a.next_delay(), b.next_delay());
        }
    }

    #[test]
    fn an_initial_delay_above_the_cap_is_capped() {
        let mut b = Backoff::with_seed(10_000 * MS, 1_000 * MS, 5);
        assert_eq!(b.next_delay(), 1_000 * MS);
        assert_eq!(b.next_delay(), 1_000 * MS);
    }

    #[test]
    fn a_zero_initial_delay_still_grows() {
        let mut b = Backoff::with_seed(Duration::ZERO, 100 * MS, 5);
        for _ in 0..20 {
            let _ = b.next_delay();
        }
        assert_eq!(b.ceiling(), 100 * MS);
    }
}
