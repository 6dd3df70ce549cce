//! A llama.cpp context over a loaded model, with every size checked in Rust
//! before llama.cpp sees a request: its own checks are asserts that kill the
//! host process.

use std::num::NonZeroU32;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;

use super::{default_threads, llama_backend, Model};
use crate::{Error, Result};

/// llama.cpp's `LLAMA_FLASH_ATTN_TYPE_ENABLED` (llama-cpp-2 does not name it).
const FLASH_ATTENTION_ENABLED: i32 = 1;

/// Sizes and threads of a [`Session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOptions {
    /// Context window in tokens, shared by all sequences of one call
    /// (the KV cache is unified). Default 4096.
    pub n_ctx: u32,
    /// Most tokens one llama.cpp decode call takes. Default 4096.
    pub n_batch: u32,
    /// Tokens computed at once inside a decode (at least 64); bounds the
    /// scratch memory, which is dominated by n_ubatch x n_vocab logits
    /// (about 100 MB at 512 for SmolLM2). Default 512.
    pub n_ubatch: u32,
    /// Most prompts one [`Session::score`] call may compare. Default 4.
    pub max_sequences: u32,
    /// Compute threads. Default [`default_threads`].
    pub threads: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            n_ctx: 4096,
            n_batch: 4096,
            n_ubatch: 512,
            max_sequences: 4,
            threads: default_threads(),
        }
    }
}

impl SessionOptions {
    fn validate(&self, model: &Model) -> Result<()> {
        let invalid = |name, reason: String| Err(Error::InvalidArgument { name, reason });
        let n_ctx_train = model.info().n_ctx_train;
        if self.n_ctx < 16 || (n_ctx_train > 0 && self.n_ctx > n_ctx_train) {
            return invalid(
                "n_ctx",
                format!(
                    "{} is outside 16..={n_ctx_train} (the model's training context)",
                    self.n_ctx
                ),
            );
        }
        let tile = super::score::ATTENTION_TILE as u32;
        if self.n_ubatch < tile || self.n_ubatch > self.n_batch {
            return invalid(
                "n_batch / n_ubatch",
                format!(
                    "need {tile} <= n_ubatch <= n_batch, got n_batch {} and n_ubatch {}",
                    self.n_batch, self.n_ubatch
                ),
            );
        }
        if !(1..=64).contains(&self.max_sequences) {
            return invalid(
                "max_sequences",
                format!("{} is outside 1..=64", self.max_sequences),
            );
        }
        if !(1..=256).contains(&self.threads) {
            return invalid("threads", format!("{} is outside 1..=256", self.threads));
        }
        Ok(())
    }
}

/// One llama.cpp context: scoring and generation over a [`Model`].
///
/// A session is `Send` but not `Sync`: use it from one thread at a time (an
/// app wraps it in a mutex or keeps one per worker).
pub struct Session<'m> {
    pub(super) model: &'m Model,
    pub(super) ctx: LlamaContext<'m>,
    pub(super) options: SessionOptions,
    pub(super) active_adapter: Option<(super::AdapterId, f32)>,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<'m> Session<'m> {
    /// Creates a context over `model`.
    pub fn new(model: &'m Model, options: SessionOptions) -> Result<Session<'m>> {
        options.validate(model)?;
        let threads = options.threads as i32;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(options.n_ctx))
            .with_n_batch(options.n_batch)
            .with_n_ubatch(options.n_ubatch)
            // One more sequence than prompts: scoring pads its layout with a
            // sequence of its own.
            .with_n_seq_max(options.max_sequences + 1)
            // Scores are reproducible across batch layouts only with the
            // tiled flash-attention kernel (see `score::ATTENTION_TILE`).
            .with_flash_attention_policy(FLASH_ATTENTION_ENABLED)
            .with_kv_unified(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_no_perf(false);
        let ctx = model
            .llama
            .new_context(llama_backend()?, params)
            .map_err(|e| Error::llama("create a context", e))?;
        Ok(Session {
            model,
            ctx,
            options,
            active_adapter: None,
        })
    }

    /// The model this session runs.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// The options the session was made with.
    pub fn options(&self) -> &SessionOptions {
        &self.options
    }

    /// Fails with [`Error::ContextOverflow`] unless `needed` tokens fit both
    /// the context window and one batch.
    pub(super) fn check_fits(&self, what: impl FnOnce() -> String, needed: usize) -> Result<()> {
        let available = self.options.n_ctx.min(self.options.n_batch) as usize;
        if needed > available {
            return Err(Error::ContextOverflow {
                what: what(),
                needed,
                available,
            });
        }
        Ok(())
    }

    /// Decodes `batch` after the caller has checked its size; clears nothing.
    pub(super) fn decode(&mut self, batch: &mut LlamaBatch) -> Result<()> {
        self.ctx
            .decode(batch)
            .map_err(|e| Error::llama("decode a batch", e))
    }

    /// Forgets every sequence in the KV cache.
    pub(super) fn clear(&mut self) {
        self.ctx.clear_kv_cache();
    }
}
