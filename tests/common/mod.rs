//! What the integration tests share: the real default model, loaded once per
//! test binary, and paths to the shared reference data.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use nextquill::llm::{Model, ModelOptions};

/// The default model: `NEXTQUILL_MODEL`, or the file `models/fetch.sh` writes.
pub fn model_path() -> PathBuf {
    std::env::var_os("NEXTQUILL_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

/// `n` token ids in the ordinary-word range of the vocabulary, varied by
/// `offset`: for training steps whose speed or threading, not text, is measured.
pub fn token_ids(n: usize, offset: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 300 + (i * 7919 + offset) % 40_000)
        .collect()
}

/// Compute threads of the benches: `NEXTQUILL_THREADS`, else 2.
pub fn threads() -> usize {
    std::env::var("NEXTQUILL_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2)
}

/// The default model, loaded once and shared by every test of the binary.
pub fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        Model::load(model_path(), &ModelOptions::default())
            .unwrap_or_else(|e| panic!("{e}\n(run models/fetch.sh first, or set NEXTQUILL_MODEL)"))
    })
}

/// A file under the shared folder next to the repository (`../shared`).
pub fn shared(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(relative)
}
