//! Text generation: greedy or sampled decoding, streamed as UTF-8 pieces.

use std::ops::ControlFlow;
use std::time::Instant;

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};

use super::{Session, TokenId, Utf8Stream};
use crate::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Sampling {
    /// Always the most likely token: deterministic.
    Greedy,
    /// Draw from the distribution, tempered then cut to the top-p mass (the
    /// order Hugging Face's `generate` applies them in).
    Sample {
        /// Logits are divided by this; must be > 0. The paper uses 0.8.
        temperature: f32,
        /// Smallest set of tokens whose probability reaches this mass; in (0, 1]. The paper uses 0.95.
        top_p: f32,
        /// Random seed: the same seed, prompt and model give the same text.
        seed: u32,
    },
}

/// Options of [`Session::generate`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    /// Most new tokens. Default 100.
    pub max_tokens: usize,
    /// Default [`Sampling::Greedy`].
    pub sampling: Sampling,
    /// Hugging Face style repetition penalty over the prompt and the text so
    /// far (positive logits divided, negative multiplied); 1.0 disables. Default 1.0.
    pub repetition_penalty: f32,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 100,
            sampling: Sampling::Greedy,
            repetition_penalty: 1.0,
        }
    }
}

impl GenerateOptions {
    fn validate(&self) -> Result<()> {
        let invalid = |name, reason: String| Err(Error::InvalidArgument { name, reason });
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return invalid(
                "repetition_penalty",
                format!("{} must be a positive number", self.repetition_penalty),
            );
        }
        if let Sampling::Sample {
            temperature, top_p, ..
        } = self.sampling
        {
            if !(temperature.is_finite() && temperature > 0.0) {
                return invalid(
                    "temperature",
                    format!("{temperature} must be > 0; use Sampling::Greedy for 0"),
                );
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return invalid("top_p", format!("{top_p} must be in (0, 1]"));
            }
        }
        Ok(())
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// `max_tokens` new tokens were produced.
    MaxTokens,
    /// The text callback asked to stop.
    Stopped,
}

/// The result of [`Session::generate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The generated text (the concatenation of every streamed piece).
    pub text: String,
    /// The generated token ids, end-of-generation token excluded.
    pub tokens: Vec<TokenId>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt.
    pub prompt_seconds: f64,
    /// Seconds spent producing new tokens.
    pub generate_seconds: f64,
}

impl Session<'_> {
    /// Generates a continuation of `prompt`, calling `on_text` with each new
    /// piece of text as soon as it is complete UTF-8. Returning
    /// `ControlFlow::Break(())` from `on_text` stops early.
    ///
    /// The prompt plus `max_tokens` must fit the context, or the call fails
    /// with [`Error::ContextOverflow`] before any work is done.
    pub fn generate(
        &mut self,
        prompt: &[TokenId],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        options.validate()?;
        if prompt.is_empty() {
            return Err(Error::InvalidArgument {
                name: "prompt",
                reason: "it is empty; generation needs at least one token to continue".into(),
            });
        }
        self.model.check_tokens(prompt)?;
        let n_ctx = self.options.n_ctx as usize;
        let needed = prompt.len() + options.max_tokens;
        if needed > n_ctx {
            return Err(Error::ContextOverflow {
                what: format!(
                    "a {}-token prompt plus {} new tokens",
                    prompt.len(),
                    options.max_tokens
                ),
                needed,
                available: n_ctx,
            });
        }

        let _span = tracing::debug_span!("generate", prompt = prompt.len()).entered();
        self.clear();
        let started = Instant::now();
        let last_row = self.decode_prompt(prompt)?;
        let prompt_seconds = started.elapsed().as_secs_f64();

        let mut sampler = self.sampler(options);
        sampler.accept_many(prompt.iter().map(|&t| LlamaToken(t as i32)));

        let started = Instant::now();
        let mut stream = Utf8Stream::new();
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut row = last_row;
        let mut batch = LlamaBatch::new(1, 1);
        let mut finish = FinishReason::MaxTokens;
        while tokens.len() < options.max_tokens {
            let token = sampler.sample(&self.ctx, row);
            let id = token.0 as TokenId;
            if self.model.is_end_of_generation(id) {
                finish = FinishReason::EndOfGeneration;
                break;
            }
            tokens.push(id);
            let piece = stream.push(&self.model.token_bytes(id)?);
            text.push_str(&piece);
            if !piece.is_empty() && on_text(&piece).is_break() {
                finish = FinishReason::Stopped;
                break;
            }
            if tokens.len() == options.max_tokens {
                break;
            }
            batch.clear();
            batch
                .add(token, (prompt.len() + tokens.len() - 1) as i32, &[0], true)
                .map_err(|e| Error::llama("fill a batch", e))?;
            self.decode(&mut batch)?;
            row = 0;
        }
        let rest = stream.finish();
        if !rest.is_empty() {
            text.push_str(&rest);
            // The text is complete: a request to stop changes nothing now.
            let _ = on_text(&rest);
        }
        self.clear();
        tracing::debug!(
            "generated {} tokens in {:.2} s after a {}-token prompt in {:.2} s",
            tokens.len(),
            started.elapsed().as_secs_f64(),
            prompt.len(),
            prompt_seconds
        );
        Ok(Generation {
            text,
            tokens,
            finish,
            prompt_tokens: prompt.len(),
            prompt_seconds,
            generate_seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Decodes a prompt in batches of at most `n_batch` tokens, asking for
    /// logits at the last token only; returns that token's row in the last batch.
    fn decode_prompt(&mut self, prompt: &[TokenId]) -> Result<i32> {
        let n_batch = self.options.n_batch as usize;
        let mut batch = LlamaBatch::new(n_batch.min(prompt.len()), 1);
        let mut last_row = 0;
        for (chunk_index, chunk) in prompt.chunks(n_batch).enumerate() {
            batch.clear();
            let offset = chunk_index * n_batch;
            for (i, &token) in chunk.iter().enumerate() {
                let pos = offset + i;
                let is_last = pos + 1 == prompt.len();
                batch
                    .add(LlamaToken(token as i32), pos as i32, &[0], is_last)
                    .map_err(|e| Error::llama("fill a batch", e))?;
                if is_last {
                    last_row = i as i32;
                }
            }
            self.decode(&mut batch)?;
        }
        Ok(last_row)
    }

    fn sampler(&self, options: &GenerateOptions) -> LlamaSampler {
        let mut chain = Vec::new();
        if options.repetition_penalty != 1.0 {
            chain.push(LlamaSampler::penalties(
                self.model.n_vocab() as i32,
                self.options.n_ctx as i32,
                options.repetition_penalty,
                0.0,
                0.0,
            ));
        }
        match options.sampling {
            Sampling::Greedy => chain.push(LlamaSampler::greedy()),
            Sampling::Sample {
                temperature,
                top_p,
                seed,
            } => {
                chain.push(LlamaSampler::temp(temperature));
                chain.push(LlamaSampler::top_p(top_p, 1));
                chain.push(LlamaSampler::dist(seed));
            }
        }
        LlamaSampler::chain_simple(chain)
    }
}
