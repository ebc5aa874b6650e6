//! When to distill: from `start` to `stop` (fractions of training) and, optionally, every K-th
//! step inside that window. A step outside the schedule runs no teacher forward at all, so it
//! costs what a plain step costs (the paper turns BERT's distillation off at ~30%).

use recycle_engine::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdSchedule {
    /// First fraction of training that distills (0 = from the start).
    pub start: f32,
    /// Fraction at which distillation stops (1 = to the end).
    pub stop: f32,
    /// Distill every `every`-th step of the window (1 = every step).
    pub every: u64,
}

impl Default for KdSchedule {
    fn default() -> Self {
        KdSchedule {
            start: 0.0,
            stop: 1.0,
            every: 1,
        }
    }
}

impl KdSchedule {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.start)
            || !(0.0..=1.0).contains(&self.stop)
            || self.start > self.stop
        {
            return Err(Error::invalid(
                "KdSchedule",
                format!(
                    "start {} and stop {} must satisfy 0 <= start <= stop <= 1",
                    self.start, self.stop
                ),
            ));
        }
        if self.every == 0 {
            return Err(Error::invalid(
                "KdSchedule",
                "every must be at least 1".to_string(),
            ));
        }
        Ok(())
    }

    /// First step of the window and the step at which it ends, for `total_steps`.
    pub fn window(&self, total_steps: u64) -> (u64, u64) {
        let at = |f: f32| ((f as f64) * total_steps as f64).round() as u64;
        (at(self.start), at(self.stop))
    }

    /// Whether step `step` (0-based) of `total_steps` distills.
    pub fn is_active(&self, step: u64, total_steps: u64) -> bool {
        let (first, end) = self.window(total_steps);
        step >= first && step < end && (step - first).is_multiple_of(self.every)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_and_stride() {
        let s = KdSchedule {
            start: 0.1,
            stop: 0.3,
            every: 3,
        };
        let active: Vec<u64> = (0..100).filter(|&i| s.is_active(i, 100)).collect();
        assert_eq!(active, vec![10, 13, 16, 19, 22, 25, 28]);
        let all = KdSchedule::default();
        assert_eq!((0..50).filter(|&i| all.is_active(i, 50)).count(), 50);
        let off = KdSchedule {
            start: 0.0,
            stop: 0.0,
            every: 1,
        };
        assert_eq!((0..50).filter(|&i| off.is_active(i, 50)).count(), 0);
    }

    #[test]
    fn bad_values_are_errors() {
        for (start, stop, every) in [(0.5, 0.2, 1), (-0.1, 0.5, 1), (0.0, 1.5, 1), (0.0, 1.0, 0)] {
            assert!(KdSchedule { start, stop, every }.validate().is_err());
        }
        assert!(KdSchedule::default().validate().is_ok());
    }
}
