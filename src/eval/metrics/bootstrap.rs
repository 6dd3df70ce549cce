//! Percentile bootstrap intervals for the benchmark table: a metric's mean
//! over test items, and the paired difference of two methods on the same
//! items.
//!
//! Resampling is seeded and uses its own small generator (SplitMix64 with
//! unbiased bounded draws), so a published interval can be recomputed
//! bit for bit whatever version of a random-number crate is around.

use crate::{Error, Result};

/// How to bootstrap. Defaults: 10 000 resamples, seed 0, 95% level.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BootstrapConfig {
    /// Number of resamples, at least 1.
    pub resamples: usize,
    /// Seed of the resampling generator.
    pub seed: u64,
    /// Central coverage of the interval, in `(0, 1)`; 0.95 gives the 2.5th and 97.5th percentiles.
    pub level: f64,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        BootstrapConfig {
            resamples: 10_000,
            seed: 0,
            level: 0.95,
        }
    }
}

impl BootstrapConfig {
    /// Checks the resample count and the level.
    pub fn validate(&self) -> Result<()> {
        if self.resamples == 0 {
            return Err(Error::InvalidArgument {
                name: "bootstrap resamples",
                reason: "0 resamples give no interval; use 1000 or more".into(),
            });
        }
        if !(self.level > 0.0 && self.level < 1.0) {
            return Err(Error::InvalidArgument {
                name: "bootstrap level",
                reason: format!(
                    "{} is not in (0, 1); use 0.95 for a 95% interval",
                    self.level
                ),
            });
        }
        Ok(())
    }
}

/// A point estimate with a bootstrap interval around it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Interval {
    /// The statistic on the data as given (not the mean of the resamples).
    pub estimate: f64,
    /// Lower percentile of the resampled statistic.
    pub lo: f64,
    /// Upper percentile of the resampled statistic.
    pub hi: f64,
}

impl Interval {
    /// Whether `value` lies outside `[lo, hi]` (e.g. 0 for a paired difference).
    pub fn excludes(&self, value: f64) -> bool {
        value < self.lo || value > self.hi
    }
}

/// Mean of `values` with a percentile bootstrap interval.
///
/// Fails on an empty slice, a non-finite value, or an invalid `config`.
pub fn bootstrap_mean_ci(values: &[f64], config: &BootstrapConfig) -> Result<Interval> {
    check_values("values", values)?;
    bootstrap_statistic(values.len(), config, |indices| mean_at(values, indices))
}

/// Mean of `a[i] - b[i]` with a bootstrap interval that resamples items,
/// keeping each item's pair together.
///
/// Fails when the slices differ in length, are empty or hold non-finite values.
pub fn paired_bootstrap_diff_ci(
    a: &[f64],
    b: &[f64],
    config: &BootstrapConfig,
) -> Result<Interval> {
    if a.len() != b.len() {
        return Err(Error::InvalidArgument {
            name: "paired values",
            reason: format!(
                "{} against {} values; pair each item's two scores",
                a.len(),
                b.len()
            ),
        });
    }
    check_values("paired values", a)?;
    check_values("paired values", b)?;
    let differences: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    bootstrap_statistic(differences.len(), config, |indices| {
        mean_at(&differences, indices)
    })
}

/// Bootstrap of any statistic over `n` items: `statistic` gets the item
/// indices of one sample (all of `0..n` once for the estimate).
///
/// Use it for statistics that are not means, such as corpus BLEU from summed
/// segment statistics.
pub fn bootstrap_statistic(
    n: usize,
    config: &BootstrapConfig,
    mut statistic: impl FnMut(&[usize]) -> f64,
) -> Result<Interval> {
    config.validate()?;
    if n == 0 {
        return Err(Error::InvalidArgument {
            name: "bootstrap items",
            reason: "no items to resample; evaluate at least one item".into(),
        });
    }

    let all: Vec<usize> = (0..n).collect();
    let estimate = statistic(&all);

    let mut rng = SplitMix64(config.seed);
    let mut sample = vec![0usize; n];
    let mut resampled = Vec::with_capacity(config.resamples);
    for _ in 0..config.resamples {
        for slot in sample.iter_mut() {
            *slot = rng.below(n as u64) as usize;
        }
        resampled.push(statistic(&sample));
    }
    resampled.sort_by(f64::total_cmp);

    let tail = (1.0 - config.level) / 2.0;
    Ok(Interval {
        estimate,
        lo: quantile(&resampled, tail),
        hi: quantile(&resampled, 1.0 - tail),
    })
}

fn check_values(name: &'static str, values: &[f64]) -> Result<()> {
    if let Some(position) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument {
            name,
            reason: format!(
                "value {position} is {}; drop or fix that item",
                values[position]
            ),
        });
    }
    Ok(())
}

fn mean_at(values: &[f64], indices: &[usize]) -> f64 {
    indices.iter().map(|&i| values[i]).sum::<f64>() / indices.len() as f64
}

/// Quantile `q` of sorted data, interpolating linearly between order
/// statistics (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    let fraction = position - below as f64;
    sorted[below] + (sorted[above] - sorted[below]) * fraction
}

/// Steele, Lea and Flood's SplitMix64: tiny, fast, and fixed forever.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` without modulo bias (Lemire's method).
    fn below(&mut self, bound: u64) -> u64 {
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(bound);
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(resamples: usize, seed: u64) -> BootstrapConfig {
        BootstrapConfig {
            resamples,
            seed,
            ..BootstrapConfig::default()
        }
    }

    #[test]
    fn splitmix64_matches_the_published_sequence_for_seed_0() {
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn constant_values_give_a_zero_width_interval() {
        let ci = bootstrap_mean_ci(&[0.25; 17], &config(500, 3)).unwrap();
        assert_eq!((ci.estimate, ci.lo, ci.hi), (0.25, 0.25, 0.25));
    }

    #[test]
    fn two_values_give_the_hand_computed_percentiles() {
        // Resampling {0, 1} twice gives means 0, 0.5, 1 with probabilities
        // 1/4, 1/2, 1/4: both 2.5% tails lie inside the outer atoms.
        let ci = bootstrap_mean_ci(&[0.0, 1.0], &config(4000, 1)).unwrap();
        assert_eq!((ci.estimate, ci.lo, ci.hi), (0.5, 0.0, 1.0));
    }

    #[test]
    fn interval_width_matches_the_normal_approximation() {
        // 400 fair coin flips: standard error 0.025, 95% half-width ~0.049.
        let values: Vec<f64> = (0..400).map(|i| (i % 2) as f64).collect();
        let ci = bootstrap_mean_ci(&values, &config(4000, 7)).unwrap();
        assert_eq!(ci.estimate, 0.5);
        assert!((ci.hi - ci.lo - 2.0 * 1.96 * 0.025).abs() < 0.01, "{ci:?}");
        assert!(((ci.lo + ci.hi) / 2.0 - 0.5).abs() < 0.005);
    }

    #[test]
    fn same_seed_same_interval_and_other_seed_differs() {
        let values: Vec<f64> = (0..50).map(|i| ((i * 37) % 11) as f64 / 10.0).collect();
        let a = bootstrap_mean_ci(&values, &config(300, 9)).unwrap();
        let b = bootstrap_mean_ci(&values, &config(300, 9)).unwrap();
        let c = bootstrap_mean_ci(&values, &config(300, 10)).unwrap();
        assert_eq!(a, b);
        assert_ne!((a.lo, a.hi), (c.lo, c.hi));
    }

    #[test]
    fn paired_difference_cancels_shared_noise() {
        // Multiples of 1/64 keep every sum and difference exact.
        let b: Vec<f64> = (0..60).map(|i| ((i * 7919) % 101) as f64 / 64.0).collect();
        let a: Vec<f64> = b.iter().map(|x| x + 0.125).collect();
        let paired = paired_bootstrap_diff_ci(&a, &b, &config(1000, 2)).unwrap();
        assert_eq!(
            (paired.estimate, paired.lo, paired.hi),
            (0.125, 0.125, 0.125)
        );
        assert!(paired.excludes(0.0));
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(bootstrap_mean_ci(&[], &BootstrapConfig::default()).is_err());
        assert!(bootstrap_mean_ci(&[1.0, f64::NAN], &BootstrapConfig::default()).is_err());
        assert!(
            paired_bootstrap_diff_ci(&[1.0], &[1.0, 2.0], &BootstrapConfig::default()).is_err()
        );
        assert!(bootstrap_mean_ci(&[1.0], &config(0, 0)).is_err());
    }
}
