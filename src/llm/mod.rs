//! The fast runtime: a GGUF model run by llama.cpp.
//!
//! [`Model`] is the loaded weights plus what later stages key on (its
//! [`fingerprint`](Model::fingerprint), its chat template, its tokenizer).
//! A [`Session`] is one llama.cpp context over a model: it scores a response
//! under several prompts in one batch ([`Session::score`]) and generates text
//! ([`Session::generate`]). Sessions are cheap next to the model; one model can
//! serve several sessions.
//!
//! Token ids are `u32` everywhere in this crate and always come from
//! llama.cpp's tokenizer, so training and inference never disagree on them.

mod generate;
mod lora;
mod model;
mod score;
mod session;
mod utf8;

use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;

pub use generate::{FinishReason, GenerateOptions, Generation, Sampling};
pub use lora::AdapterId;
pub use model::{Model, ModelInfo, ModelOptions, Role};
pub use score::{PrefixSharing, PromptScores, ScoreOptions, Scores};
pub use session::{Session, SessionOptions};
pub use utf8::Utf8Stream;

use crate::{Error, Result};

/// A token id of the model's vocabulary.
pub type TokenId = u32;

/// llama.cpp's process-wide backend, initialised on first use.
///
/// llama.cpp allows one initialisation per process, so code that also drives
/// `llama-cpp-2` directly next to nextquill must take the backend from here.
pub fn llama_backend() -> Result<&'static LlamaBackend> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // llama.cpp's own log (load progress, and the only explanation of
            // a refused adapter or model) goes to `tracing`, never to stderr.
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|reason| Error::Llama {
            op: "initialise its backend",
            reason: reason.clone(),
        })
}

/// The default number of compute threads: every core the OS gives us, at most 4.
///
/// On a phone, pass fewer threads than cores: llama.cpp's workers spin, and
/// with every core busy elsewhere throughput collapses (measured on 2 cores:
/// 2 threads fell to 1-5 tokens/s while 1 thread kept 36-100).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4)
}
