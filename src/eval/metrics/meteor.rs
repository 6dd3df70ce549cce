//! METEOR as NLTK 3.10.4's `single_meteor_score` computes it, with exact and
//! Porter-stem matching only.
//!
//! NLTK's third matching stage uses WordNet synonyms. WordNet is a separate
//! data download that a device does not have, so that stage is left out:
//! scores equal NLTK's when it is given a WordNet that knows no synonyms, and
//! can be lower than NLTK's with the real WordNet installed (a hypothesis that
//! says "good" where the reference says "fine" gets no credit here).
//!
//! NLTK takes pre-tokenized input and leaves tokenization to the caller.
//! [`meteor`] tokenizes both sides with sacrebleu's `13a` tokenizer
//! ([`tokenize_13a`](super::tokenize_13a)), which splits punctuation off words
//! ("size!" -> "size", "!") so that it does not block matches; the reference
//! numbers in `tests/metrics.rs` were computed with the same tokens
//! (`scripts/reference_metrics.py`). [`meteor_tokens`] takes tokens from any
//! other tokenizer. Tokens are lowercased before matching, as NLTK does.

use std::collections::HashMap;

use super::bleu::tokenize_13a;
use crate::porter::porter_stem;
use crate::{Error, Result};

/// METEOR's weights. Defaults are NLTK's: alpha 0.9, beta 3, gamma 0.5.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MeteorParams {
    /// Weight of precision against recall in the harmonic mean, in `[0, 1]`.
    pub alpha: f64,
    /// Exponent of the fragmentation penalty, at least 0.
    pub beta: f64,
    /// Largest fragmentation penalty, in `[0, 1]`.
    pub gamma: f64,
}

impl Default for MeteorParams {
    fn default() -> Self {
        MeteorParams {
            alpha: 0.9,
            beta: 3.0,
            gamma: 0.5,
        }
    }
}

impl MeteorParams {
    /// Checks that every weight is finite and in its range.
    pub fn validate(&self) -> Result<()> {
        let check = |name: &'static str, value: f64, ok: bool| {
            if value.is_finite() && ok {
                Ok(())
            } else {
                Err(Error::InvalidArgument {
                    name,
                    reason: format!(
                        "{value} is out of range; use NLTK's default or a value in range"
                    ),
                })
            }
        };
        check(
            "meteor alpha",
            self.alpha,
            (0.0..=1.0).contains(&self.alpha),
        )?;
        check("meteor beta", self.beta, self.beta >= 0.0)?;
        check(
            "meteor gamma",
            self.gamma,
            (0.0..=1.0).contains(&self.gamma),
        )
    }
}

/// METEOR in `[0, 1]` with NLTK's default weights, on `13a` tokens of both texts.
///
/// Either side without tokens, or no token matched, gives 0.
///
/// ```
/// use nextquill::eval::metrics::meteor;
///
/// // "runs" matches "running" through their Porter stem; "!" matches exactly.
/// let score = meteor("Running shoes!", "runs shoes!");
/// assert!((score - 0.9814814814814815).abs() < 1e-12);
/// ```
pub fn meteor(reference: &str, hypothesis: &str) -> f64 {
    let reference = tokenize_13a(reference);
    let hypothesis = tokenize_13a(hypothesis);
    let reference: Vec<&str> = reference.split(' ').filter(|t| !t.is_empty()).collect();
    let hypothesis: Vec<&str> = hypothesis.split(' ').filter(|t| !t.is_empty()).collect();
    meteor_tokens(&reference, &hypothesis, &MeteorParams::default())
}

/// METEOR in `[0, 1]` on pre-tokenized text; tokens are lowercased here.
///
/// `params` is taken as given; call [`MeteorParams::validate`] on values from
/// outside. Either side empty, or nothing matched, gives 0.
pub fn meteor_tokens<S: AsRef<str>>(
    reference: &[S],
    hypothesis: &[S],
    params: &MeteorParams,
) -> f64 {
    let hypothesis: Vec<(usize, String)> = hypothesis
        .iter()
        .map(|t| t.as_ref().to_lowercase())
        .enumerate()
        .collect();
    let reference: Vec<(usize, String)> = reference
        .iter()
        .map(|t| t.as_ref().to_lowercase())
        .enumerate()
        .collect();
    let (hypothesis_len, reference_len) = (hypothesis.len(), reference.len());

    let (mut matches, hypothesis_left, reference_left) = match_words(hypothesis, reference);
    let stem = |words: Vec<(usize, String)>| -> Vec<(usize, String)> {
        words
            .into_iter()
            .map(|(i, w)| (i, porter_stem(&w)))
            .collect()
    };
    let (stem_matches, _, _) = match_words(stem(hypothesis_left), stem(reference_left));
    matches.extend(stem_matches);
    matches.sort_by_key(|&(h, _)| h);

    if matches.is_empty() || hypothesis_len == 0 || reference_len == 0 {
        return 0.0;
    }
    let matched = matches.len() as f64;
    let precision = matched / hypothesis_len as f64;
    let recall = matched / reference_len as f64;
    let fmean = precision * recall / (params.alpha * precision + (1.0 - params.alpha) * recall);
    let fragmentation = count_chunks(&matches) as f64 / matched;
    let penalty = params.gamma * fragmentation.powf(params.beta);
    (1.0 - penalty) * fmean
}

type Enumerated = Vec<(usize, String)>;

/// NLTK's `_match_enums`: from the last hypothesis word backwards, each takes
/// the latest still-unused reference word equal to it. Returns the
/// `(hypothesis, reference)` index pairs and the words left on each side.
fn match_words(
    hypothesis: Enumerated,
    reference: Enumerated,
) -> (Vec<(usize, usize)>, Enumerated, Enumerated) {
    let mut positions: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, (_, word)) in reference.iter().enumerate() {
        positions.entry(word.as_str()).or_default().push(j);
    }

    let mut matches = Vec::new();
    let mut hypothesis_used = vec![false; hypothesis.len()];
    let mut reference_used = vec![false; reference.len()];
    for (i, (h_index, word)) in hypothesis.iter().enumerate().rev() {
        if let Some(j) = positions.get_mut(word.as_str()).and_then(Vec::pop) {
            hypothesis_used[i] = true;
            reference_used[j] = true;
            matches.push((*h_index, reference[j].0));
        }
    }

    let keep = |words: Enumerated, used: &[bool]| -> Enumerated {
        words
            .into_iter()
            .zip(used)
            .filter(|(_, &u)| !u)
            .map(|(w, _)| w)
            .collect()
    };
    let hypothesis_left = keep(hypothesis, &hypothesis_used);
    let reference_left = keep(reference, &reference_used);
    (matches, hypothesis_left, reference_left)
}

/// Runs of matches adjacent in both hypothesis and reference; `matches` is
/// sorted by hypothesis index.
fn count_chunks(matches: &[(usize, usize)]) -> usize {
    1 + matches
        .windows(2)
        .filter(|p| !(p[1].0 == p[0].0 + 1 && p[1].1 == p[0].1 + 1))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_score_with_one_stem_match_and_two_chunks() {
        // Hypothesis "the cats sat", reference "a cat sat here": "sat" matches
        // exactly (h2, r2), "cats" ~ "cat" by stem (h1, r1): one chunk.
        // P 2/3, R 2/4, fmean = PR / (0.9 P + 0.1 R), penalty 0.5 (1/2)^3.
        let p = 2.0 / 3.0;
        let r = 0.5;
        let fmean = p * r / (0.9 * p + 0.1 * r);
        let expected = (1.0 - 0.5 * 0.125) * fmean;
        assert!((meteor("a cat sat here", "the cats sat") - expected).abs() < 1e-12);

        // Swapped order: two chunks, penalty 0.5 * 1^3.
        let swapped = meteor("a cat sat here", "sat the cats");
        assert!((swapped - 0.5 * fmean).abs() < 1e-12);
    }

    #[test]
    fn out_of_range_params_are_refused() {
        let params = MeteorParams {
            alpha: 1.5,
            ..MeteorParams::default()
        };
        assert!(matches!(
            params.validate(),
            Err(Error::InvalidArgument {
                name: "meteor alpha",
                ..
            })
        ));
        assert!(MeteorParams::default().validate().is_ok());
    }
}
