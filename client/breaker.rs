//! A circuit breaker: after `failures_to_open` failures in a row it opens and refuses calls for
//! `open_for`; then it lets one probe through (half open). The probe's success closes it, its
//! failure opens it again.
//!
//! Used by the client (one breaker per service address) and by the ingestion service (one for
//! Kafka). Time is `tokio::time::Instant`, so tests drive it with a paused clock.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// When a breaker opens and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failures_to_open: u32,
    /// How long an open breaker refuses calls before it lets a probe through.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failures_to_open: 5, open_for: Duration::from_secs(5) }
    }
}

/// What a breaker does with the next call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused.
    Open,
    /// One probe is out; other calls are refused until it reports.
    HalfOpen,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: Mutex<State>,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        CircuitBreaker { config, state: Mutex::new(State::Closed { failures: 0 }) }
    }

    /// Asks to make a call. `Err(wait)` says the breaker is open, and for how long at least.
    /// An `Ok` in the open state is the probe: report its outcome with
    /// [`on_success`](Self::on_success) or [`on_failure`](Self::on_failure). A probe that never
    /// reports (its caller went away) is replaced by another after `open_for`.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now < until => Err(until - now),
            State::HalfOpen { since } if now < since + self.config.open_for => Err(since + self.config.open_for - now),
            State::Open { .. } | State::HalfOpen { .. } => {
                *state = State::HalfOpen { since: now };
                Ok(())
            }
        }
    }

    pub fn on_success(&self) {
        *self.state.lock().unwrap() = State::Closed { failures: 0 };
    }

    pub fn on_failure(&self) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let open = State::Open { until: now + self.config.open_for };
        *state = match *state {
            State::Closed { failures } if failures + 1 < self.config.failures_to_open => {
                State::Closed { failures: failures + 1 }
            }
            State::Open { until } => State::Open { until },
            _ => open,
        };
    }

    pub fn state(&self) -> BreakerState {
        match *self.state.lock().unwrap() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig { failures_to_open: 3, open_for: Duration::from_secs(10) })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_only() {
        let b = breaker();
        b.on_failure();
        b.on_failure();
        b.on_success();
        b.on_failure();
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Closed, "a success resets the count");
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.try_acquire(), Err(Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_after_the_open_period_decides() {
        let b = breaker();
        (0..3).for_each(|_| b.on_failure());
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(b.try_acquire(), Err(Duration::from_secs(6)));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(b.try_acquire(), Ok(()), "the probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire().is_err(), "only one probe at a time");
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open, "a failed probe opens it again");
        assert_eq!(b.try_acquire(), Err(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.try_acquire(), Ok(()));
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.try_acquire(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_reports_is_replaced() {
        let b = breaker();
        (0..3).for_each(|_| b.on_failure());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.try_acquire(), Ok(()));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.try_acquire(), Ok(()), "a new probe after another open period");
    }
}
