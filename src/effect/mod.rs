//! Causal preference effects: how much of each token of a user's text their
//! history caused.
//!
//! For a response `y` after the with-history prompt and after its
//! counterfactual (history replaced by `None`), the data-side effect of token
//! `y_t` is `Δp = p(y_t | x, h, y<t) − p(y_t | x, ∅, y<t)`. Tokens with
//! `Δp > δ` are preference-bearing; the NextQuill trainer weights them `λ`
//! and the rest `ε`, normalized to sum 1 over the response.

mod profile;
mod render;

use serde::{Deserialize, Serialize};

use crate::llm::{PromptScores, ScoreOptions, Session, TokenId, Utf8Stream};
use crate::prompt::PromptPair;
use crate::{Error, Result};

pub use profile::{profile, Profile, ProfileEntry};
pub use render::{to_html, to_terminal};

/// Whether to compare the full next-token distributions too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Divergence {
    /// Only the probabilities of the tokens the user wrote. Default.
    #[default]
    Off,
    /// Also the Jensen-Shannon divergence (nats) between the two distributions at each position.
    JensenShannon,
}

/// Thresholds and weights of the NextQuill method.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EffectConfig {
    /// δ: a token is preference-bearing when `Δp > δ` (strictly). Default 0.05.
    pub delta: f32,
    /// λ: raw training weight of a preference-bearing token. Default 0.9.
    pub lambda: f32,
    /// ε: raw training weight of every other token. Default 0.1.
    pub epsilon: f32,
    /// Default [`Divergence::Off`].
    pub divergence: Divergence,
}

impl Default for EffectConfig {
    fn default() -> Self {
        EffectConfig {
            delta: 0.05,
            lambda: 0.9,
            epsilon: 0.1,
            divergence: Divergence::Off,
        }
    }
}

impl EffectConfig {
    /// Checks the thresholds: δ in [0, 1), λ and ε non-negative with λ + ε > 0.
    pub fn validate(&self) -> Result<()> {
        let invalid = |name, reason: String| Err(Error::InvalidArgument { name, reason });
        if !(0.0..1.0).contains(&self.delta) {
            return invalid("delta", format!("{} is outside [0, 1)", self.delta));
        }
        if !(self.lambda >= 0.0 && self.epsilon >= 0.0 && self.lambda + self.epsilon > 0.0) {
            return invalid(
                "lambda / epsilon",
                format!(
                    "need non-negative weights that are not both 0, got λ {} and ε {}",
                    self.lambda, self.epsilon
                ),
            );
        }
        Ok(())
    }
}

/// The effect of the history on one response token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEffect {
    /// The token id.
    pub token: TokenId,
    /// The text this token completes (a character split over tokens is
    /// attributed to the token that completes it, so texts concatenate to the response).
    pub text: String,
    /// `ln p(y_t | x, h, y<t)`.
    pub logp_with: f32,
    /// `ln p(y_t | x, ∅, y<t)`.
    pub logp_without: f32,
    /// `Δp = p_with − p_without`, the data-side preference effect.
    pub delta_p: f32,
    /// `ln p_with − ln p_without`.
    pub delta_logp: f32,
    /// Jensen-Shannon divergence of the two next-token distributions, when asked for.
    pub js_divergence: Option<f32>,
    /// `Δp > δ`.
    pub preference_bearing: bool,
    /// Normalized NextQuill training weight (all weights of a response sum to 1).
    pub weight: f32,
}

/// Per-token effects of one response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Effects {
    /// One entry per response token, in order.
    pub tokens: Vec<TokenEffect>,
    /// The δ the flags were computed with.
    pub delta: f32,
    /// History items the with-history prompt held.
    pub history_used: usize,
}

impl Effects {
    /// The response text (the tokens' texts concatenated).
    pub fn text(&self) -> String {
        self.tokens.iter().map(|t| t.text.as_str()).collect()
    }

    /// Share of response tokens that are preference-bearing, in [0, 1].
    pub fn preference_bearing_share(&self) -> f32 {
        if self.tokens.is_empty() {
            return 0.0;
        }
        let n = self.tokens.iter().filter(|t| t.preference_bearing).count();
        n as f32 / self.tokens.len() as f32
    }
}

/// NextQuill token weights from the label probabilities with and without
/// history: raw weight `λ` where `p_with − p_without > δ`, else `ε`,
/// normalized to sum 1. Returns the weights and the preference-bearing flags.
pub fn preference_weights(
    p_with: &[f32],
    p_without: &[f32],
    config: &EffectConfig,
) -> (Vec<f32>, Vec<bool>) {
    let flags: Vec<bool> = p_with
        .iter()
        .zip(p_without)
        .map(|(a, b)| a - b > config.delta)
        .collect();
    let raw: Vec<f32> = flags
        .iter()
        .map(|&high| if high { config.lambda } else { config.epsilon })
        .collect();
    let total: f64 = raw.iter().map(|&w| f64::from(w)).sum();
    let weights = raw
        .iter()
        .map(|&w| {
            if total > 0.0 {
                (f64::from(w) / total) as f32
            } else {
                0.0
            }
        })
        .collect();
    (weights, flags)
}

/// Measures the effects of `response` for a prompt pair, scoring both prompts
/// in one batch (their shared prefix decoded once).
pub fn measure(
    session: &mut Session<'_>,
    pair: &PromptPair,
    response: &[TokenId],
    config: &EffectConfig,
) -> Result<Effects> {
    config.validate()?;
    let _span = tracing::debug_span!("effects", response = response.len()).entered();
    let options = ScoreOptions {
        distributions: config.divergence == Divergence::JensenShannon,
        ..ScoreOptions::default()
    };
    let scores = session.score(
        &[&pair.with_history, &pair.counterfactual],
        response,
        &options,
    )?;
    let (with, without) = (&scores.prompts[0], &scores.prompts[1]);
    let texts = token_texts(session, response)?;
    Ok(from_scores(
        response,
        texts,
        with,
        without,
        session.model().n_vocab(),
        pair.history_used,
        config,
    ))
}

fn from_scores(
    response: &[TokenId],
    texts: Vec<String>,
    with: &PromptScores,
    without: &PromptScores,
    n_vocab: usize,
    history_used: usize,
    config: &EffectConfig,
) -> Effects {
    let p_with: Vec<f32> = with.logprobs.iter().map(|l| l.exp()).collect();
    let p_without: Vec<f32> = without.logprobs.iter().map(|l| l.exp()).collect();
    let (weights, flags) = preference_weights(&p_with, &p_without, config);
    let divergence = |t: usize| {
        let (a, b) = (
            with.log_distributions.as_ref()?,
            without.log_distributions.as_ref()?,
        );
        let row = t * n_vocab..(t + 1) * n_vocab;
        Some(jensen_shannon(&a[row.clone()], &b[row]))
    };
    let tokens = response
        .iter()
        .zip(texts)
        .enumerate()
        .map(|(t, (&token, text))| TokenEffect {
            token,
            text,
            logp_with: with.logprobs[t],
            logp_without: without.logprobs[t],
            delta_p: p_with[t] - p_without[t],
            delta_logp: with.logprobs[t] - without.logprobs[t],
            js_divergence: divergence(t),
            preference_bearing: flags[t],
            weight: weights[t],
        })
        .collect();
    Effects {
        tokens,
        delta: config.delta,
        history_used,
    }
}

/// Each token's text, a split character given to the token that completes it.
fn token_texts(session: &Session<'_>, tokens: &[TokenId]) -> Result<Vec<String>> {
    let mut stream = Utf8Stream::new();
    let mut texts = Vec::with_capacity(tokens.len());
    for &token in tokens {
        texts.push(stream.push(&session.model().token_bytes(token)?));
    }
    if let Some(last) = texts.last_mut() {
        last.push_str(&stream.finish());
    }
    Ok(texts)
}

/// Jensen-Shannon divergence in nats between two log-distributions.
fn jensen_shannon(log_p: &[f32], log_q: &[f32]) -> f32 {
    let mut js = 0.0f64;
    for (&lp, &lq) in log_p.iter().zip(log_q) {
        let (p, q) = (f64::from(lp).exp(), f64::from(lq).exp());
        let m = 0.5 * (p + q);
        if m <= 0.0 {
            continue;
        }
        let ln_m = m.ln();
        if p > 0.0 {
            js += 0.5 * p * (f64::from(lp) - ln_m);
        }
        if q > 0.0 {
            js += 0.5 * q * (f64::from(lq) - ln_m);
        }
    }
    js.max(0.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_the_strict_threshold_and_sum_to_one() {
        let config = EffectConfig::default();
        let (weights, flags) = preference_weights(&[0.5, 0.2, 0.3], &[0.3, 0.16, 0.4], &config);
        assert_eq!(flags, vec![true, false, false]);
        let total = 0.9 + 0.1 + 0.1;
        assert!((weights[0] - 0.9 / total).abs() < 1e-7);
        assert!((weights[1] - 0.1 / total).abs() < 1e-7);
        assert!((weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn jensen_shannon_is_zero_for_equal_and_ln2_for_disjoint() {
        let p = [
            0.5f32.ln(),
            0.5f32.ln(),
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ];
        let q = [
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            0.5f32.ln(),
            0.5f32.ln(),
        ];
        assert!(jensen_shannon(&p, &p).abs() < 1e-7);
        assert!((jensen_shannon(&p, &q) - 2f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn invalid_thresholds_are_refused() {
        let config = EffectConfig {
            delta: 1.5,
            ..EffectConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(Error::InvalidArgument { name: "delta", .. })
        ));
    }
}
