//! A user's profile: the words and phrases their history makes them say,
//! aggregated over the effects of many of their texts.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Effects;

/// One word or phrase of a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileEntry {
    /// The word or phrase, lower-cased.
    pub text: String,
    /// Mean effect over its occurrences (a word's effect is the largest Δp of its tokens).
    pub mean_delta_p: f32,
    /// How often it occurs across the texts.
    pub count: usize,
}

/// What the history makes this user say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Words with the largest mean effect, largest first.
    pub words: Vec<ProfileEntry>,
    /// Runs of two to four consecutive preference-bearing words, largest mean effect first.
    pub phrases: Vec<ProfileEntry>,
    /// Texts the profile was built from.
    pub texts: usize,
    /// Share of all their tokens that are preference-bearing.
    pub preference_bearing_share: f32,
}

struct Word {
    text: String,
    delta_p: f32,
    preference_bearing: bool,
}

/// Splits a response into words: a token whose text starts with whitespace
/// or punctuation begins a new word; its effect is the largest Δp of its
/// tokens (the first token of a word usually carries the choice, the rest follow).
fn words(effects: &Effects) -> Vec<Word> {
    let mut words: Vec<Word> = Vec::new();
    for token in &effects.tokens {
        let starts_word = token
            .text
            .chars()
            .next()
            .is_some_and(|c| c.is_whitespace() || !c.is_alphanumeric());
        let piece = token.text.trim();
        match words.last_mut() {
            Some(word) if !starts_word && !piece.is_empty() => {
                word.text.push_str(piece);
                word.delta_p = word.delta_p.max(token.delta_p);
                word.preference_bearing |= token.preference_bearing;
            }
            _ => words.push(Word {
                text: piece.to_string(),
                delta_p: token.delta_p,
                preference_bearing: token.preference_bearing,
            }),
        }
    }
    for word in &mut words {
        word.text = word
            .text
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
    }
    words.retain(|w| !w.text.is_empty());
    words
}

/// Builds a profile from the effects of several texts of one user, keeping
/// entries that occur at least `min_count` times, `top` of each kind.
pub fn profile(all: &[Effects], min_count: usize, top: usize) -> Profile {
    let mut word_stats: HashMap<String, (f32, usize)> = HashMap::new();
    let mut phrase_stats: HashMap<String, (f32, usize)> = HashMap::new();
    let (mut pb, mut total) = (0usize, 0usize);
    for effects in all {
        pb += effects
            .tokens
            .iter()
            .filter(|t| t.preference_bearing)
            .count();
        total += effects.tokens.len();
        let words = words(effects);
        for word in &words {
            let entry = word_stats.entry(word.text.clone()).or_default();
            entry.0 += word.delta_p;
            entry.1 += 1;
        }
        for run in words.split(|w| !w.preference_bearing) {
            for window in 2..=run.len().min(4) {
                for phrase in run.windows(window) {
                    let text = phrase
                        .iter()
                        .map(|w| w.text.as_str())
                        .collect::<Vec<_>>()
                        .join(" ");
                    let mean = phrase.iter().map(|w| w.delta_p).sum::<f32>() / window as f32;
                    let entry = phrase_stats.entry(text).or_default();
                    entry.0 += mean;
                    entry.1 += 1;
                }
            }
        }
    }
    let rank = |stats: HashMap<String, (f32, usize)>| {
        let mut entries: Vec<ProfileEntry> = stats
            .into_iter()
            .filter(|(_, (_, count))| *count >= min_count)
            .map(|(text, (sum, count))| ProfileEntry {
                text,
                mean_delta_p: sum / count as f32,
                count,
            })
            .collect();
        entries.sort_by(|a, b| {
            b.mean_delta_p
                .total_cmp(&a.mean_delta_p)
                .then_with(|| a.text.cmp(&b.text))
        });
        entries.truncate(top);
        entries
    };
    Profile {
        words: rank(word_stats),
        phrases: rank(phrase_stats),
        texts: all.len(),
        preference_bearing_share: if total == 0 {
            0.0
        } else {
            pb as f32 / total as f32
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effect::TokenEffect;

    fn effects(tokens: &[(&str, f32)]) -> Effects {
        Effects {
            tokens: tokens
                .iter()
                .map(|&(text, delta_p)| TokenEffect {
                    token: 0,
                    text: text.into(),
                    logp_with: 0.0,
                    logp_without: 0.0,
                    delta_p,
                    delta_logp: 0.0,
                    js_divergence: None,
                    preference_bearing: delta_p > 0.05,
                    weight: 0.0,
                })
                .collect(),
            delta: 0.05,
            history_used: 1,
        }
    }

    #[test]
    fn words_join_subword_tokens_and_take_their_largest_effect() {
        let e = effects(&[
            ("Soft", 0.01),
            (" sn", 0.4),
            ("ug", 0.0),
            ("gly", 0.02),
            ("!", 0.0),
        ]);
        let w = words(&e);
        let texts: Vec<&str> = w.iter().map(|w| w.text.as_str()).collect();
        assert_eq!(texts, vec!["soft", "snuggly"]);
        assert_eq!(w[1].delta_p, 0.4);
    }

    #[test]
    fn profile_ranks_by_mean_effect_and_finds_phrases() {
        let a = effects(&[("I", 0.0), (" love", 0.3), (" it", 0.2), (".", 0.0)]);
        let b = effects(&[("We", 0.0), (" love", 0.1), (" it", 0.3), (" a", 0.0)]);
        let p = profile(&[a, b], 2, 10);
        assert_eq!(p.words[0].text, "it");
        assert!((p.words[0].mean_delta_p - 0.25).abs() < 1e-6);
        assert_eq!(p.words[1].text, "love");
        assert_eq!(p.phrases[0].text, "love it");
        assert_eq!(p.phrases[0].count, 2);
        assert!((p.preference_bearing_share - 4.0 / 8.0).abs() < 1e-6);
    }
}
