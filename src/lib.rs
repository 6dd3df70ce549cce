//! nextquill personalizes a small quantized LLM to one person, on that
//! person's own device.
//!
//! The data travels one way through one module per stage:
//!
//! ```text
//! store (SQLite history) -> prompt (with / counterfactual) -> llm (llama.cpp scoring)
//!   -> effect (causal preference effects) -> train (candle, NextQuill LoRA)
//!   -> adapter (GGUF LoRA, registry) -> llm (personalized generation)
//! ```
//!
//! Nothing here opens a socket: the model, the history and the adapters stay
//! in local files.

#![warn(missing_docs)]

pub mod adapter;
pub mod effect;
pub mod engine;
pub mod error;
pub mod eval;
pub mod ffi;
pub mod llm;
pub mod porter;
pub mod prompt;
pub mod store;
pub mod train;

pub use error::{Error, Result};

// The UniFFI scaffolding of the app SDK (`ffi`); it must live at the crate root.
uniffi::setup_scaffolding!("nextquill");
