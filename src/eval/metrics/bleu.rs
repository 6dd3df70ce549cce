//! Corpus BLEU as sacrebleu 2.6.0 computes it by default: the `13a`
//! tokenizer, case-sensitive, 4-gram, `exp` smoothing (mteval's), closest
//! reference length for the brevity penalty, on a 0-100 scale.
//!
//! One reference per hypothesis. Segment statistics ([`BleuStats`]) add up,
//! so a bootstrap over segments can recompute corpus BLEU per resample, as
//! sacrebleu's own confidence intervals do.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

use crate::{Error, Result};

/// Highest n-gram order counted.
pub const MAX_NGRAM_ORDER: usize = 4;

/// The regex passes of sacrebleu's `TokenizerRegexp`, in order.
fn tokenizer_passes() -> &'static [(Regex, &'static str); 4] {
    static PASSES: OnceLock<[(Regex, &'static str); 4]> = OnceLock::new();
    PASSES.get_or_init(|| {
        let re = |pattern: &str| Regex::new(pattern).expect("13a patterns are valid");
        [
            // Most ASCII punctuation and symbols stand alone.
            (re(r"([{-~\[-` -&(-+:-@/])"), " ${1} "),
            // Period and comma split off unless between digits.
            (re(r"([^0-9])([.,])"), "${1} ${2} "),
            (re(r"([.,])([^0-9])"), " ${1} ${2}"),
            // A dash after a digit splits off.
            (re(r"([0-9])(-)"), "${1} ${2} "),
        ]
    })
}

/// Tokenizes one line as sacrebleu's `13a` tokenizer (mteval-v13a), tokens joined by one space.
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }

    let mut line = format!(" {line} ");
    for (pattern, replacement) in tokenizer_passes() {
        line = pattern.replace_all(&line, *replacement).into_owned();
    }
    line.split(is_python_whitespace)
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sufficient statistics of BLEU for one or more segments; they add up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct BleuStats {
    /// Hypothesis length in tokens.
    pub hypothesis_len: usize,
    /// Reference length in tokens.
    pub reference_len: usize,
    /// Clipped matching n-grams for n = 1..=4.
    pub matches: [usize; MAX_NGRAM_ORDER],
    /// Hypothesis n-grams for n = 1..=4.
    pub totals: [usize; MAX_NGRAM_ORDER],
}

impl BleuStats {
    /// Statistics of one hypothesis against its reference (both raw text; tokenized with 13a here).
    pub fn segment(hypothesis: &str, reference: &str) -> Self {
        let hypothesis = tokenize_13a(trim_end_python(hypothesis));
        let reference = tokenize_13a(trim_end_python(reference));
        let hypothesis: Vec<&str> = hypothesis.split(' ').filter(|t| !t.is_empty()).collect();
        let reference: Vec<&str> = reference.split(' ').filter(|t| !t.is_empty()).collect();

        let reference_ngrams = ngram_counts(&reference);
        let mut stats = BleuStats {
            hypothesis_len: hypothesis.len(),
            reference_len: reference.len(),
            ..BleuStats::default()
        };
        for (ngram, count) in ngram_counts(&hypothesis) {
            let n = ngram.len() - 1;
            stats.totals[n] += count;
            if let Some(&in_reference) = reference_ngrams.get(&ngram) {
                stats.matches[n] += count.min(in_reference);
            }
        }
        stats
    }

    /// Adds another segment's (or corpus's) statistics to these.
    pub fn add(&mut self, other: &BleuStats) {
        self.hypothesis_len += other.hypothesis_len;
        self.reference_len += other.reference_len;
        for n in 0..MAX_NGRAM_ORDER {
            self.matches[n] += other.matches[n];
            self.totals[n] += other.totals[n];
        }
    }

    /// BLEU of these statistics with sacrebleu's default `exp` smoothing.
    pub fn score(&self) -> BleuScore {
        let brevity_penalty = if self.hypothesis_len < self.reference_len {
            if self.hypothesis_len > 0 {
                (1.0 - self.reference_len as f64 / self.hypothesis_len as f64).exp()
            } else {
                0.0
            }
        } else {
            1.0
        };

        let mut precisions = [0.0; MAX_NGRAM_ORDER];
        if self.matches.iter().all(|&m| m == 0) {
            return BleuScore {
                score: 0.0,
                precisions,
                brevity_penalty,
                stats: *self,
            };
        }
        // mteval's smoothing: each order with no match gets half the
        // pseudo-count of the previous such order.
        let mut smoothing = 1.0;
        let orders = precisions.iter_mut().zip(self.matches).zip(self.totals);
        for ((precision, matches), total) in orders {
            if total == 0 {
                break;
            }
            *precision = if matches == 0 {
                smoothing *= 2.0;
                100.0 / (smoothing * total as f64)
            } else {
                100.0 * matches as f64 / total as f64
            };
        }
        // sacrebleu floors log(0) to this instead of failing.
        let floored_log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
        let mean_log =
            precisions.iter().map(|&p| floored_log(p)).sum::<f64>() / MAX_NGRAM_ORDER as f64;

        BleuScore {
            score: brevity_penalty * mean_log.exp(),
            precisions,
            brevity_penalty,
            stats: *self,
        }
    }
}

/// A BLEU result.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BleuScore {
    /// BLEU on sacrebleu's 0-100 scale (not 0-1).
    pub score: f64,
    /// Smoothed n-gram precisions for n = 1..=4, 0-100.
    pub precisions: [f64; MAX_NGRAM_ORDER],
    /// Brevity penalty in `[0, 1]`.
    pub brevity_penalty: f64,
    /// The statistics the score came from.
    pub stats: BleuStats,
}

/// Corpus BLEU of `hypotheses` against `references`, paired by position (sacrebleu's `corpus_bleu`).
///
/// Fails when the two lists differ in length.
pub fn corpus_bleu<H: AsRef<str>, R: AsRef<str>>(
    hypotheses: &[H],
    references: &[R],
) -> Result<BleuScore> {
    if hypotheses.len() != references.len() {
        return Err(Error::InvalidArgument {
            name: "references",
            reason: format!(
                "{} hypotheses but {} references; pass one reference per hypothesis",
                hypotheses.len(),
                references.len()
            ),
        });
    }
    let mut total = BleuStats::default();
    for (hypothesis, reference) in hypotheses.iter().zip(references) {
        total.add(&BleuStats::segment(hypothesis.as_ref(), reference.as_ref()));
    }
    Ok(total.score())
}

/// Whitespace as Python's `str.split()` sees it (which adds U+001C..U+001F).
fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.rstrip()`.
fn trim_end_python(text: &str) -> &str {
    text.trim_end_matches(is_python_whitespace)
}

fn ngram_counts<'a>(tokens: &[&'a str]) -> HashMap<Vec<&'a str>, usize> {
    let mut counts = HashMap::new();
    for n in 1..=MAX_NGRAM_ORDER {
        for window in tokens.windows(n) {
            *counts.entry(window.to_vec()).or_default() += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected strings from sacrebleu 2.6.0 `Tokenizer13a()(line)`.
    #[test]
    fn tokenize_13a_matches_sacrebleu() {
        let cases = [
            ("Hello, world!", "Hello , world !"),
            (
                "It costs $49.99 (was 59,99).",
                "It costs $ 49.99 ( was 59,99 ) .",
            ),
            (
                "2023-24 well-made &amp; tested",
                "2023 - 24 well-made & tested",
            ),
            ("don't\nstop-\nnow <skipped>", "don't stopnow"),
        ];
        for (line, expected) in cases {
            assert_eq!(tokenize_13a(line), expected, "line {line:?}");
        }
    }

    #[test]
    fn hand_computed_bleu_with_exp_smoothing() {
        // "a b c" vs "a b d": 1-grams 2/3, 2-grams 1/2, 3-grams 0/1 (smoothed
        // to 100/(2*1)), no 4-grams: the loop stops and log(0) is floored, so
        // the score is 0 as in sacrebleu.
        let s = BleuStats::segment("a b c", "a b d").score();
        assert_eq!(s.stats.matches, [2, 1, 0, 0]);
        assert_eq!(s.stats.totals, [3, 2, 1, 0]);
        assert!((s.precisions[2] - 50.0).abs() < 1e-12);
        assert_eq!(s.score, 0.0);

        // Five tokens, one wrong at the end: 4/5, 3/4, 2/3, 1/2, no penalty.
        let s = BleuStats::segment("a b c d e", "a b c d f").score();
        let expected = 100.0 * (0.8f64 * 0.75 * (2.0 / 3.0) * 0.5).powf(0.25);
        assert!((s.score - expected).abs() < 1e-9);
    }

    #[test]
    fn mismatched_lengths_are_refused() {
        assert!(matches!(
            corpus_bleu(&["a"], &["a", "b"]),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
