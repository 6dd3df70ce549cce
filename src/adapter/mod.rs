//! Trained adapters: their in-memory form and their files.
//!
//! A trained adapter is a [`LoraWeights`] value. It leaves the process in one
//! of two files:
//!
//! - a GGUF LoRA ([`write_gguf`], [`read_gguf`]) that llama.cpp applies at
//!   generation time, with the base model's identity in `nextquill.*` keys;
//! - a PEFT folder ([`export_peft`], [`import_peft`]) that Hugging Face tools
//!   load, with q/k rows put back in Hugging Face order.
//!
//! [`validate`](fn@validate) checks a GGUF adapter against a base model before llama.cpp
//! sees it: llama.cpp reports every refusal as a bare null result, and a few
//! malformed files (a metadata key of the wrong type) trip asserts that end
//! the process.

mod gguf;
mod lora;
mod peft;
mod validate;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub use gguf::{read_gguf, write_gguf, AdapterMeta};
pub use lora::{LoraPair, LoraTarget, LoraWeights};
pub use peft::{
    export_peft, gguf_rows_to_hf, hf_rows_to_gguf, import_peft, PeftImport, PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
};
pub use validate::{validate, AdapterReport, PairShape};

use crate::{Error, Result};

/// Writes `bytes` to `path` so that readers see the old file or the whole new
/// one, never a part: a temporary file in the same folder, synced, then
/// renamed over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);

    let name = path.file_name().ok_or_else(|| Error::InvalidArgument {
        name: "path",
        reason: format!("{} has no file name", path.display()),
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));

    let written = File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }

    // The rename itself is durable only once the folder is synced. Not every
    // platform lets a folder be opened for that, so a failure here is not one
    // of the write.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}
