//! Scoring one response under several prompts in a single llama.cpp batch.
//!
//! This is what causal preference effects and training weights are computed
//! from: the same response tokens after the with-history prompt and after its
//! counterfactual, each prompt its own sequence of one batch, with logits
//! requested only at the positions that predict a response token.

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use super::{Session, TokenId};
use crate::{Error, Result};

/// How a scoring call lays its prompts out in the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefixSharing {
    /// Tokens that every sequence starts with are decoded once and belong to
    /// all sequences, so a counterfactual costs only the tokens that differ.
    #[default]
    Shared,
    /// Every sequence is decoded in full, as if scored alone.
    Separate,
}

/// What a scoring call computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScoreOptions {
    /// Also return the full next-token log-distribution at every response
    /// position (n_vocab floats each, 196 KB a position for SmolLM2). Default false.
    pub distributions: bool,
    /// See [`PrefixSharing`]. Default [`PrefixSharing::Shared`].
    pub prefix: PrefixSharing,
}

/// The scores of the response under one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptScores {
    /// `log p(response[t] | prompt, response[..t])`, natural log, one per response token.
    pub logprobs: Vec<f32>,
    /// When asked for: row-major `(response.len(), n_vocab)` log-probabilities
    /// of every next token at each response position.
    pub log_distributions: Option<Vec<f32>>,
}

/// The scores of one response under each prompt of a [`Session::score`] call, in prompt order.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// One entry per prompt.
    pub prompts: Vec<PromptScores>,
    /// Tokens decoded by llama.cpp for this call (shared tokens counted once).
    pub decoded_tokens: usize,
}

impl Session<'_> {
    /// Scores `response` after each of `prompts`, all in ONE llama.cpp batch
    /// with one sequence id per prompt.
    ///
    /// The whole request (every prompt plus the response, shared prefix counted
    /// once) must fit one batch and the context; otherwise
    /// [`Error::ContextOverflow`] names the sizes.
    pub fn score(
        &mut self,
        prompts: &[&[TokenId]],
        response: &[TokenId],
        options: &ScoreOptions,
    ) -> Result<Scores> {
        self.check_score_request(prompts, response)?;
        let n_vocab = self.model.n_vocab();
        if response.is_empty() {
            let empty = PromptScores {
                logprobs: Vec::new(),
                log_distributions: options.distributions.then(Vec::new),
            };
            return Ok(Scores {
                prompts: vec![empty; prompts.len()],
                decoded_tokens: 0,
            });
        }

        // Sequence s is prompt s followed by every response token but the
        // last: position len(prompt s) - 1 + t predicts response[t].
        let sequences: Vec<Vec<TokenId>> = prompts
            .iter()
            .map(|p| [*p, &response[..response.len() - 1]].concat())
            .collect();
        let shared = match options.prefix {
            PrefixSharing::Shared => common_prefix_len(&sequences),
            PrefixSharing::Separate => 0,
        };
        let layout = Layout::new(&sequences, shared, self.options.n_ubatch as usize);
        self.check_fits(
            || {
                format!(
                    "scoring a {}-token response under {} prompts ({} tokens after sharing and alignment)",
                    response.len(),
                    prompts.len(),
                    layout.total
                )
            },
            layout.total,
        )?;

        let predicts = |s: usize, pos: usize| {
            let start = prompts[s].len() - 1;
            (pos >= start).then(|| pos - start)
        };
        let pad_seq = prompts.len() as i32;
        let pad_token = self.model.pad_token();
        let mut pad_pos = 0usize;
        let mut batch = LlamaBatch::new(layout.total, prompts.len() as i32 + 1);
        let mut pad_to = |batch: &mut LlamaBatch, cells: usize| -> Result<()> {
            while (batch.n_tokens() as usize) < cells {
                add(batch, pad_token, pad_pos, &[pad_seq], false)?;
                pad_pos += 1;
            }
            Ok(())
        };
        let mut out_index = vec![vec![0i32; response.len()]; prompts.len()];
        let all_seqs: Vec<i32> = (0..prompts.len() as i32).collect();
        for (pos, &token) in sequences[0][..layout.shared].iter().enumerate() {
            let mut wanted = false;
            for (s, rows) in out_index.iter_mut().enumerate() {
                if let Some(t) = predicts(s, pos) {
                    rows[t] = batch.n_tokens();
                    wanted = true;
                }
            }
            add(&mut batch, token, pos, &all_seqs, wanted)?;
        }
        for (s, sequence) in sequences.iter().enumerate() {
            pad_to(&mut batch, layout.starts[s])?;
            for (pos, &token) in sequence.iter().enumerate().skip(layout.shared) {
                let target = predicts(s, pos);
                if let Some(t) = target {
                    out_index[s][t] = batch.n_tokens();
                }
                add(&mut batch, token, pos, &[s as i32], target.is_some())?;
            }
        }
        pad_to(&mut batch, layout.total)?;

        let _span =
            tracing::debug_span!("score", tokens = layout.total, prompts = prompts.len()).entered();
        self.clear();
        self.decode(&mut batch)?;

        let mut results = Vec::with_capacity(prompts.len());
        for rows in &out_index {
            let mut logprobs = Vec::with_capacity(response.len());
            let mut dists = options
                .distributions
                .then(|| Vec::with_capacity(response.len() * n_vocab));
            for (t, &row) in rows.iter().enumerate() {
                let logits = self.ctx.get_logits_ith(row);
                let lse = log_sum_exp(logits);
                logprobs.push(logits[response[t] as usize] - lse);
                if let Some(d) = dists.as_mut() {
                    d.extend(logits.iter().map(|&l| l - lse));
                }
            }
            results.push(PromptScores {
                logprobs,
                log_distributions: dists,
            });
        }
        self.clear();
        Ok(Scores {
            prompts: results,
            decoded_tokens: layout.total,
        })
    }

    fn check_score_request(&self, prompts: &[&[TokenId]], response: &[TokenId]) -> Result<()> {
        let invalid = |reason: String| Error::InvalidArgument {
            name: "prompts",
            reason,
        };
        if prompts.is_empty() {
            return Err(invalid("give at least one prompt to score against".into()));
        }
        if prompts.len() > self.options.max_sequences as usize {
            return Err(invalid(format!(
                "{} prompts but the session allows {}; raise SessionOptions::max_sequences",
                prompts.len(),
                self.options.max_sequences
            )));
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(invalid(format!(
                "prompt {i} is empty; the first response token needs a token before it"
            )));
        }
        for prompt in prompts {
            self.model.check_tokens(prompt)?;
        }
        self.model.check_tokens(response)
    }
}

fn add(
    batch: &mut LlamaBatch,
    token: TokenId,
    pos: usize,
    seqs: &[i32],
    logits: bool,
) -> Result<()> {
    batch
        .add(LlamaToken(token as i32), pos as i32, seqs, logits)
        .map_err(|e| Error::llama("fill a batch", e))
}

/// Cells of one tile of llama.cpp's CPU flash-attention kernel
/// (`GGML_FA_TILE_KV` and `GGML_FA_TILE_Q` in ggml-cpu).
///
/// The kernel sums a query's attention tile by tile, so a sequence whose cells
/// start at another offset inside a tile gets other float rounding, and this
/// model's 8-bit activation quantization turns those last-bit differences into
/// log-probabilities up to ~0.3 nat apart. Batches shorter than a tile take
/// another, untiled kernel. Starting every sequence on a tile boundary, and
/// giving every computation step at least one tile of queries, makes a
/// sequence's scores bit-identical whatever else shares the batch.
pub(crate) const ATTENTION_TILE: usize = 64;

/// Where each sequence of a scoring batch lives in the KV cache.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    /// Tokens decoded once for every sequence: the common prefix, cut to a
    /// whole number of tiles.
    shared: usize,
    /// First cell of each sequence's own tokens (a tile boundary).
    starts: Vec<usize>,
    /// Cells of the whole batch, padding included.
    total: usize,
}

impl Layout {
    fn new(sequences: &[Vec<TokenId>], common_prefix: usize, step: usize) -> Layout {
        let shared = common_prefix / ATTENTION_TILE * ATTENTION_TILE;
        let mut cell = shared;
        let mut starts = Vec::with_capacity(sequences.len());
        for sequence in sequences {
            let start = cell.next_multiple_of(ATTENTION_TILE);
            starts.push(start);
            cell = start + sequence.len() - shared;
        }
        // llama.cpp computes the batch `step` (>= one tile) tokens at a time;
        // a last step shorter than a tile would take its untiled kernel.
        let tail = cell % step;
        let total = match tail {
            1..ATTENTION_TILE => cell + ATTENTION_TILE - tail,
            _ => cell,
        };
        Layout {
            shared,
            starts,
            total,
        }
    }
}

/// Length of the prefix every sequence shares. One shorter than the shortest
/// sequence at most, so each sequence keeps a token of its own: llama.cpp then
/// sees every sequence as a distinct, non-empty continuation.
fn common_prefix_len(sequences: &[Vec<TokenId>]) -> usize {
    let Some(first) = sequences.first() else {
        return 0;
    };
    let shortest = sequences.iter().map(Vec::len).min().unwrap_or(0);
    let mut n = 0;
    while n + 1 < shortest && sequences.iter().all(|s| s[n] == first[n]) {
        n += 1;
    }
    n
}

/// `ln Σ exp(x)`, accumulated in f64 so long vocabularies lose no precision.
pub(crate) fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (f64::from(max) + sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_keeps_one_token_per_sequence() {
        let same = vec![vec![1, 2, 3], vec![1, 2, 3]];
        assert_eq!(common_prefix_len(&same), 2);
        let differ = vec![vec![1, 2, 3, 4], vec![1, 2, 9, 4]];
        assert_eq!(common_prefix_len(&differ), 2);
        let none = vec![vec![5, 2], vec![1, 2]];
        assert_eq!(common_prefix_len(&none), 0);
    }

    #[test]
    fn layout_starts_every_sequence_on_a_tile() {
        let tile = ATTENTION_TILE;
        let sequences = vec![vec![0; tile + 10], vec![0; tile + 3]];
        let layout = Layout::new(&sequences, tile + 2, 512);
        assert_eq!(layout.shared, tile);
        assert_eq!(layout.starts, vec![tile, 2 * tile]);
        assert_eq!(layout.total, 2 * tile + 3);
        // A short batch still fills one whole query tile.
        let short = Layout::new(&[vec![0; 5]], 0, 512);
        assert_eq!((short.starts.clone(), short.total), (vec![0], tile));
        // So does the last computation step of a long one.
        let separate = Layout::new(&sequences, 0, 512);
        assert_eq!(separate.starts, vec![0, 2 * tile]);
        assert_eq!(separate.total, 3 * tile + 3);
        assert_eq!(Layout::new(&sequences, 0, 3 * tile).total, 4 * tile);
        // Sharing less than a tile shares nothing.
        assert_eq!(Layout::new(&sequences, tile - 1, 512).shared, 0);
    }

    #[test]
    fn log_sum_exp_matches_direct_sum() {
        let logits = [1.0f32, -2.0, 0.5, 3.0];
        let direct: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        assert!((f64::from(log_sum_exp(&logits)) - direct).abs() < 1e-6);
        // Large logits must not overflow.
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f32.ln())).abs() < 1e-3);
    }
}
