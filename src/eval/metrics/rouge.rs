//! ROUGE-1 and ROUGE-L as Google's `rouge-score` 0.1.2 computes them with
//! `RougeScorer([...], use_stemmer=True)`.
//!
//! Its tokenizer: lowercase, every run of characters outside `[a-z0-9]` becomes
//! a separator (so accented letters, emoji and apostrophes split or vanish),
//! and tokens longer than three characters are stemmed with NLTK's Porter
//! stemmer ([`porter_stem`](crate::porter::porter_stem)).

use std::collections::HashMap;

use crate::porter::porter_stem;

/// Precision, recall and F1 of one ROUGE variant, each in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct RougeScore {
    /// Matched units over hypothesis units.
    pub precision: f64,
    /// Matched units over reference units.
    pub recall: f64,
    /// Harmonic mean of precision and recall; 0 when both are 0.
    pub f1: f64,
}

impl RougeScore {
    fn new(precision: f64, recall: f64) -> Self {
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        RougeScore {
            precision,
            recall,
            f1,
        }
    }
}

/// ROUGE-1 and ROUGE-L of one hypothesis against one reference.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Rouge {
    /// Unigram overlap (clipped counts).
    pub rouge_1: RougeScore,
    /// Longest common subsequence of tokens.
    pub rouge_l: RougeScore,
}

/// Tokens as `rouge-score`'s default tokenizer with stemming produces them.
pub fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|token| !token.is_empty())
        .map(|token| {
            if token.len() > 3 {
                porter_stem(token)
            } else {
                token.to_string()
            }
        })
        .filter(|token| {
            !token.is_empty()
                && token
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
        .collect()
}

/// ROUGE-1 and ROUGE-L between `reference` and `hypothesis` (tokenized once).
///
/// Either side empty after tokenization gives all zeros, as `rouge-score` does.
pub fn rouge(reference: &str, hypothesis: &str) -> Rouge {
    let reference = rouge_tokens(reference);
    let hypothesis = rouge_tokens(hypothesis);
    Rouge {
        rouge_1: rouge_1_tokens(&reference, &hypothesis),
        rouge_l: rouge_l_tokens(&reference, &hypothesis),
    }
}

/// ROUGE-1 F1 of `hypothesis` against `reference`, in `[0, 1]`.
///
/// ```
/// use nextquill::eval::metrics::rouge1_f1;
///
/// // Stems: "run" "fast" against "run" "fast" "today" -> P 1, R 2/3.
/// assert!((rouge1_f1("runs fast today", "Running fast!") - 0.8).abs() < 1e-12);
/// ```
pub fn rouge1_f1(reference: &str, hypothesis: &str) -> f64 {
    rouge_1_tokens(&rouge_tokens(reference), &rouge_tokens(hypothesis)).f1
}

/// ROUGE-L F1 (longest common subsequence of tokens) of `hypothesis` against
/// `reference`, in `[0, 1]`.
pub fn rouge_l_f1(reference: &str, hypothesis: &str) -> f64 {
    rouge_l_tokens(&rouge_tokens(reference), &rouge_tokens(hypothesis)).f1
}

/// ROUGE-1 on already tokenized text (see [`rouge_tokens`]).
pub fn rouge_1_tokens<S: AsRef<str>>(reference: &[S], hypothesis: &[S]) -> RougeScore {
    let mut reference_counts: HashMap<&str, usize> = HashMap::new();
    for token in reference {
        *reference_counts.entry(token.as_ref()).or_default() += 1;
    }
    let mut hypothesis_counts: HashMap<&str, usize> = HashMap::new();
    for token in hypothesis {
        *hypothesis_counts.entry(token.as_ref()).or_default() += 1;
    }
    let overlap: usize = reference_counts
        .iter()
        .map(|(token, &n)| n.min(hypothesis_counts.get(token).copied().unwrap_or(0)))
        .sum();

    RougeScore::new(
        overlap as f64 / hypothesis.len().max(1) as f64,
        overlap as f64 / reference.len().max(1) as f64,
    )
}

/// ROUGE-L on already tokenized text (see [`rouge_tokens`]).
pub fn rouge_l_tokens<S: AsRef<str>>(reference: &[S], hypothesis: &[S]) -> RougeScore {
    if reference.is_empty() || hypothesis.is_empty() {
        return RougeScore::default();
    }
    let lcs = lcs_length(reference, hypothesis);
    RougeScore::new(
        lcs as f64 / hypothesis.len() as f64,
        lcs as f64 / reference.len() as f64,
    )
}

/// Length of the longest common subsequence, in two rolling rows.
fn lcs_length<S: AsRef<str>>(a: &[S], b: &[S]) -> usize {
    let mut previous = vec![0usize; b.len() + 1];
    let mut current = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            current[j + 1] = if x.as_ref() == y.as_ref() {
                previous[j] + 1
            } else {
                previous[j + 1].max(current[j])
            };
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_lowercases_splits_on_non_alphanumerics_and_stems_long_tokens() {
        let tokens = rouge_tokens("Running, RUNS & ran: it's 2.5x café");
        assert_eq!(
            tokens,
            ["run", "run", "ran", "it", "s", "2", "5x", "caf"].map(String::from)
        );
    }

    #[test]
    fn hand_counted_unigram_and_lcs_scores() {
        // Reference tokens: a b c d; hypothesis: b a d d d.
        // Unigram overlap: a 1, b 1, d 1 -> 3; P 3/5, R 3/4.
        // LCS "b d" or "a d": 2; P 2/5, R 2/4.
        let r = rouge("a b c d", "b a d d d");
        assert!((r.rouge_1.precision - 0.6).abs() < 1e-12);
        assert!((r.rouge_1.recall - 0.75).abs() < 1e-12);
        assert!((r.rouge_1.f1 - 2.0 * 0.6 * 0.75 / 1.35).abs() < 1e-12);
        assert!((r.rouge_l.precision - 0.4).abs() < 1e-12);
        assert!((r.rouge_l.recall - 0.5).abs() < 1e-12);
    }
}
