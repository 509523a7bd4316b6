//! Repeated failures logged once per interval, with how many were held back: an outage
//! gives an operator a line every few seconds, not one per failed call.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often one kind of failure is logged.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

/// One kind of repeated failure.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// When the last line was written, and the repeats since.
    last: Mutex<Option<(Instant, u64)>>,
}

impl Throttle {
    /// A throttle that has logged nothing yet (usable in a `static`).
    pub(crate) const fn new() -> Self {
        Self {
            last: Mutex::new(None),
        }
    }

    /// Whether to log this occurrence now: `Some(n)` with the `n` occurrences held back since
    /// the last line, `None` to stay quiet (it is counted).
    pub(crate) fn admit(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match last.as_mut() {
            Some((at, quiet)) if at.elapsed() < LOG_EVERY => {
                *quiet += 1;
                None
            }
            _ => {
                let quiet = last.map_or(0, |(_, quiet)| quiet);
                *last = Some((Instant::now(), 0));
                Some(quiet)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_and_counts_the_rest() {
        let throttle = Throttle::default();
        assert_eq!(throttle.admit(), Some(0));
        assert_eq!(throttle.admit(), None);
        assert_eq!(throttle.admit(), None);
        if let Ok(mut last) = throttle.last.lock() {
            *last = last.map(|(at, quiet)| (at.checked_sub(LOG_EVERY).unwrap_or(at), quiet));
        }
        assert_eq!(throttle.admit(), Some(2));
    }
}
