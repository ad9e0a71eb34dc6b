//! Latency percentiles and throughput of timed calls, for benchmarks.
//!
//! Percentiles interpolate linearly between order statistics (NumPy's
//! default `linear` method, Hyndman & Fan type 7), so a table made here and
//! one made with `numpy.percentile` over the same seconds agree.

use serde::{Deserialize, Serialize};

/// Summary of `n` call durations.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Calls timed.
    pub n: usize,
    /// Mean seconds per call.
    pub mean: f64,
    /// Median seconds.
    pub p50: f64,
    /// 90th percentile seconds.
    pub p90: f64,
    /// 99th percentile seconds.
    pub p99: f64,
    /// Slowest call.
    pub max: f64,
    /// Calls per second of busy time: `n / sum(seconds)`.
    pub per_second: f64,
}

impl Latency {
    /// The summary of `seconds`; `None` when empty or when a value is not a
    /// finite non-negative number.
    pub fn of(seconds: &[f64]) -> Option<Latency> {
        if seconds.is_empty() || seconds.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return None;
        }
        let mut v = seconds.to_vec();
        v.sort_by(f64::total_cmp);
        let sum: f64 = v.iter().sum();
        Some(Latency {
            n: v.len(),
            mean: sum / v.len() as f64,
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            max: v[v.len() - 1],
            per_second: if sum > 0.0 { v.len() as f64 / sum } else { f64::INFINITY },
        })
    }
}

/// The `q`-th percentile (0..=100) of `sorted` (ascending, non-empty),
/// linearly interpolated: position `q/100 * (n-1)`.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_equal_numpy_linear() {
        // numpy.percentile([0.3, 0.1, 0.2, 0.5, 1.7], [50, 90, 99])
        //   = [0.3, 1.22, 1.652]
        let l = Latency::of(&[0.3, 0.1, 0.2, 0.5, 1.7]).unwrap();
        assert!((l.p50 - 0.3).abs() < 1e-12);
        assert!((l.p90 - 1.22).abs() < 1e-12);
        assert!((l.p99 - 1.652).abs() < 1e-12);
        assert_eq!((l.n, l.max), (5, 1.7));
        assert!((l.per_second - 5.0 / 2.8).abs() < 1e-12);
        let one = Latency::of(&[0.25]).unwrap();
        assert_eq!((one.p50, one.p99, one.mean), (0.25, 0.25, 0.25));
    }

    #[test]
    fn empty_or_bad_input_has_no_summary() {
        assert!(Latency::of(&[]).is_none());
        assert!(Latency::of(&[0.1, f64::NAN]).is_none());
        assert!(Latency::of(&[-1.0]).is_none());
    }
}
