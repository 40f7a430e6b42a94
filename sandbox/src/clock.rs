//! The sandbox clock of one namespace: sandbox time that runs at a chosen speed relative to real
//! time, and that tests can set or advance (like Stripe's test clocks).
//!
//! Sandbox now = anchor sandbox time + real time elapsed since the anchor × speed. Every change
//! re-anchors at the current moment so that time never jumps except by the requested amount.

use std::time::Instant;

use chrono::{DateTime, Duration, TimeZone, Utc};

/// The fastest the sandbox clock may run: one real second is then about 11.5 sandbox days.
pub const MAXIMUM_CLOCK_SPEED: f64 = 1_000_000.0;

/// A clock speed that is not a positive, finite number no greater than [`MAXIMUM_CLOCK_SPEED`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "clock speed must be a finite number greater than 0 and at most {MAXIMUM_CLOCK_SPEED}, got {0}"
)]
pub struct InvalidClockSpeed(pub f64);

/// Checks that `speed` can drive a sandbox clock, returning it unchanged when it can.
pub fn validate_clock_speed(speed: f64) -> Result<f64, InvalidClockSpeed> {
    if speed.is_finite() && speed > 0.0 && speed <= MAXIMUM_CLOCK_SPEED {
        Ok(speed)
    } else {
        Err(InvalidClockSpeed(speed))
    }
}

/// A clock change that would leave the range of timestamps the sandbox can write.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the sandbox clock cannot go past {}", latest_supported_time().to_rfc3339())]
pub(crate) struct ClockOutOfRange;

/// The last moment that still has a four-digit year, so RFC 3339 output stays valid.
fn latest_supported_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
        .single()
        .expect("a fixed valid date")
}

/// One namespace's sandbox clock.
#[derive(Debug, Clone)]
pub(crate) struct SandboxClock {
    anchor_sandbox_time: DateTime<Utc>,
    anchor_real_instant: Instant,
    speed: f64,
}

impl SandboxClock {
    /// A clock that reads real now and runs at `speed` (already validated).
    pub(crate) fn starting_now(speed: f64) -> SandboxClock {
        SandboxClock {
            anchor_sandbox_time: Utc::now(),
            anchor_real_instant: Instant::now(),
            speed,
        }
    }

    /// A clock that reads `now` and runs from there at `speed` (validated, or 0: a clock that
    /// stands still until it is set or advanced).
    pub(crate) fn starting_at(now: DateTime<Utc>, speed: f64) -> SandboxClock {
        SandboxClock {
            anchor_sandbox_time: now.min(latest_supported_time()),
            anchor_real_instant: Instant::now(),
            speed,
        }
    }

    /// The current sandbox time.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.now_at(Instant::now())
    }

    /// How many sandbox seconds pass per real second.
    pub(crate) fn speed(&self) -> f64 {
        self.speed
    }

    fn now_at(&self, real_instant: Instant) -> DateTime<Utc> {
        let real_elapsed = real_instant.saturating_duration_since(self.anchor_real_instant);
        if self.speed == 0.0 {
            return self.anchor_sandbox_time;
        }
        // `as` saturates for floats, so an absurdly long run pins the clock instead of panicking.
        let sandbox_elapsed_nanoseconds = (real_elapsed.as_secs_f64() * self.speed * 1e9) as i64;
        self.anchor_sandbox_time
            .checked_add_signed(Duration::nanoseconds(sandbox_elapsed_nanoseconds))
            .map(|now| now.min(latest_supported_time()))
            .unwrap_or_else(latest_supported_time)
    }

    /// Moves sandbox time forward by `by` (zero or more) at once.
    pub(crate) fn advance(&mut self, by: Duration) -> Result<(), ClockOutOfRange> {
        let real_instant = Instant::now();
        let advanced = self
            .now_at(real_instant)
            .checked_add_signed(by)
            .filter(|advanced| *advanced <= latest_supported_time())
            .ok_or(ClockOutOfRange)?;
        self.anchor_sandbox_time = advanced;
        self.anchor_real_instant = real_instant;
        Ok(())
    }

    /// Sets sandbox time to `now`; it keeps running from there at the current speed.
    pub(crate) fn set_now(&mut self, now: DateTime<Utc>) -> Result<(), ClockOutOfRange> {
        if now > latest_supported_time() {
            return Err(ClockOutOfRange);
        }
        self.anchor_sandbox_time = now;
        self.anchor_real_instant = Instant::now();
        Ok(())
    }

    /// Changes the speed from this moment on, without moving sandbox time. 0 stops the clock.
    pub(crate) fn set_speed(&mut self, speed: f64) {
        let real_instant = Instant::now();
        self.anchor_sandbox_time = self.now_at(real_instant);
        self.anchor_real_instant = real_instant;
        self.speed = speed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_runs_at_its_speed() {
        let start = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap();
        let real_start = Instant::now();
        let clock = SandboxClock {
            anchor_sandbox_time: start,
            anchor_real_instant: real_start,
            speed: 60.0,
        };
        let later = clock.now_at(real_start + std::time::Duration::from_secs(2));
        assert_eq!(later - start, Duration::seconds(120));
    }

    #[test]
    fn advancing_moves_time_forward_by_exactly_the_amount_asked() {
        let mut clock = SandboxClock::starting_now(0.000_001);
        let before = clock.now();
        clock.advance(Duration::days(4)).unwrap();
        let moved = clock.now() - before;
        assert!(moved >= Duration::days(4) && moved < Duration::days(4) + Duration::seconds(1));
    }

    #[test]
    fn the_clock_cannot_be_advanced_past_year_9999() {
        let mut clock = SandboxClock::starting_now(1.0);
        assert_eq!(
            clock.advance(Duration::days(365 * 9000)),
            Err(ClockOutOfRange)
        );
    }

    #[test]
    fn clock_speeds_must_be_positive_finite_and_bounded() {
        assert_eq!(validate_clock_speed(2.5), Ok(2.5));
        for invalid in [
            0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            MAXIMUM_CLOCK_SPEED * 2.0,
        ] {
            assert!(
                validate_clock_speed(invalid).is_err(),
                "{invalid} was accepted"
            );
        }
    }
}
