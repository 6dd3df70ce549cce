//! GGUF LoRA files: the form llama.cpp applies at generation time.
//!
//! The file holds llama.cpp's keys (`general.architecture` = the base
//! architecture, `general.type` = `adapter`, `adapter.type` = `lora`,
//! `adapter.lora.alpha`), nextquill's own keys under `nextquill.*` (the base
//! model's fingerprint, rank, targets, objective, a JSON training summary),
//! and one f32 tensor pair per adapted projection:
//! `blk.N.<stem>.weight.lora_a` of shape `(rank, n_in)` and `...lora_b` of
//! shape `(n_out, rank)`, row-major (GGUF lists the dimensions innermost
//! first, so `lora_a` is stored as `ne = [n_in, rank]`).
//!
//! q/k rows of `lora_b` are in GGUF order (llama.cpp permutes those weights
//! on conversion, and the trainer trains on the GGUF weights), so they are
//! written as they are. The PEFT exporter is where rows change order.
//!
//! The writer is ours rather than candle's so that the same weights and
//! metadata always give the same bytes (GGUF v3, 32-byte alignment, keys and
//! tensors in a fixed order).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use serde::{Deserialize, Serialize};

use super::lora::{LoraPair, LoraWeights};
use super::validate::{parse, TensorSlot};
use super::write_atomic;
use crate::llm::ModelInfo;
use crate::{Error, Result};

pub(crate) const KEY_ARCHITECTURE: &str = "general.architecture";
pub(crate) const KEY_GENERAL_TYPE: &str = "general.type";
pub(crate) const KEY_ALIGNMENT: &str = "general.alignment";
pub(crate) const KEY_ADAPTER_TYPE: &str = "adapter.type";
pub(crate) const KEY_ALPHA: &str = "adapter.lora.alpha";
pub(crate) const KEY_ALORA_TOKENS: &str = "adapter.alora.invocation_tokens";
pub(crate) const KEY_FORMAT: &str = "nextquill.format_version";
pub(crate) const KEY_FINGERPRINT: &str = "nextquill.base_fingerprint";
pub(crate) const KEY_BASE_NAME: &str = "nextquill.base_name";
pub(crate) const KEY_RANK: &str = "nextquill.rank";
pub(crate) const KEY_TARGETS: &str = "nextquill.targets";
pub(crate) const KEY_OBJECTIVE: &str = "nextquill.objective";
pub(crate) const KEY_TRAINING: &str = "nextquill.training";

/// Version of the `nextquill.*` keys this build writes.
const FORMAT_VERSION: u32 = 1;
const ALIGNMENT: usize = 32;

/// What an adapter file says about where it came from, next to its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    /// `general.architecture` of the base model, e.g. `llama`; llama.cpp
    /// refuses an adapter whose architecture differs from the model's.
    pub base_architecture: String,
    /// [`Model::fingerprint`](crate::llm::Model::fingerprint) of the base model.
    pub base_fingerprint: String,
    /// `general.name` of the base model, when it has one; PEFT's
    /// `base_model_name_or_path` is taken from it.
    pub base_name: Option<String>,
    /// The training objective, e.g. `nextquill` or `sft`.
    pub objective: String,
    /// Training numbers (steps, losses, seconds), any JSON value; stored as a
    /// JSON string.
    pub training: serde_json::Value,
}

impl AdapterMeta {
    /// The metadata of an adapter trained on `base` with `objective`.
    pub fn for_model(
        base: &ModelInfo,
        objective: impl Into<String>,
        training: serde_json::Value,
    ) -> AdapterMeta {
        AdapterMeta {
            base_architecture: base.architecture.clone(),
            base_fingerprint: base.fingerprint.clone(),
            base_name: base.name.clone(),
            objective: objective.into(),
            training,
        }
    }

    fn check(&self) -> Result<()> {
        let empty = [
            ("base_architecture", self.base_architecture.is_empty()),
            ("base_fingerprint", self.base_fingerprint.is_empty()),
            ("objective", self.objective.is_empty()),
        ];
        match empty.iter().find(|(_, is_empty)| *is_empty) {
            Some((field, _)) => Err(Error::InvalidArgument {
                name: "adapter metadata",
                reason: format!("{field} is empty; take it from the base model's ModelInfo"),
            }),
            None => Ok(()),
        }
    }
}

/// Writes `weights` as a GGUF LoRA adapter that llama.cpp loads for the base
/// model `meta` names.
///
/// The file appears whole or not at all: it is written to a temporary file in
/// the same folder, synced, then renamed to `path` (replacing any file there).
/// The same weights and metadata always give the same bytes.
pub fn write_gguf(weights: &LoraWeights, meta: &AdapterMeta, path: impl AsRef<Path>) -> Result<()> {
    weights.check()?;
    meta.check()?;
    let bytes = encode(weights, meta)?;
    write_atomic(path.as_ref(), &bytes)?;
    tracing::debug!(
        "wrote GGUF adapter {} ({} pairs, rank {}, {} bytes)",
        path.as_ref().display(),
        weights.pairs.len(),
        weights.rank,
        bytes.len()
    );
    Ok(())
}

/// Reads a GGUF LoRA adapter written by [`write_gguf`].
///
/// The file is checked as [`validate`](fn@super::validate) checks it (without a
/// base to compare to) before any weight is read; f16 tensors are widened to
/// f32. A file without nextquill's metadata (one converted by llama.cpp's
/// scripts) is refused with [`Error::InvalidAdapter`]: use
/// [`validate`](fn@super::validate) to inspect such a file.
pub fn read_gguf(path: impl AsRef<Path>) -> Result<(LoraWeights, AdapterMeta)> {
    let path = path.as_ref();
    let parsed = parse(path)?;
    let invalid = |reason: String| Error::InvalidAdapter {
        path: path.to_path_buf(),
        reason,
    };
    let string = |key: &str| match parsed.metadata.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let not_ours = |key: &str| {
        invalid(format!(
            "it has no {key} key, so it was not written by nextquill; \
             export it again with nextquill or inspect it with validate()"
        ))
    };
    let base_fingerprint = string(KEY_FINGERPRINT).ok_or_else(|| not_ours(KEY_FINGERPRINT))?;
    let objective = string(KEY_OBJECTIVE).ok_or_else(|| not_ours(KEY_OBJECTIVE))?;
    let training = match string(KEY_TRAINING) {
        None => serde_json::Value::Null,
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| invalid(format!("{KEY_TRAINING} is not valid JSON ({e})")))?,
    };
    let meta = AdapterMeta {
        base_architecture: parsed.report.architecture.clone(),
        base_fingerprint,
        base_name: string(KEY_BASE_NAME),
        objective,
        training,
    };

    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut pairs = Vec::with_capacity(parsed.pairs.len());
    for layout in &parsed.pairs {
        pairs.push(LoraPair {
            layer: layout.layer,
            target: layout.target,
            n_in: layout.a.cols,
            n_out: layout.b.rows,
            lora_a: read_tensor(&mut file, &layout.a).map_err(|e| Error::io(path, e))?,
            lora_b: read_tensor(&mut file, &layout.b).map_err(|e| Error::io(path, e))?,
        });
    }
    let weights = LoraWeights {
        rank: parsed.report.rank,
        alpha: parsed.report.alpha,
        pairs,
    };
    weights.check().map_err(|e| invalid(e.to_string()))?;
    Ok((weights, meta))
}

fn read_tensor(file: &mut File, slot: &TensorSlot) -> std::io::Result<Vec<f32>> {
    let n = slot.rows * slot.cols;
    let width = if slot.dtype == GgmlDType::F16 { 2 } else { 4 };
    let mut bytes = vec![0u8; n * width];
    file.seek(SeekFrom::Start(slot.start))?;
    file.read_exact(&mut bytes)?;
    Ok(if slot.dtype == GgmlDType::F16 {
        bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    } else {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    })
}

/// A metadata value as GGUF stores it.
enum Meta<'a> {
    U32(u32),
    F32(f32),
    Str(&'a str),
}

impl Meta<'_> {
    fn type_id(&self) -> u32 {
        match self {
            Meta::U32(_) => 4,
            Meta::F32(_) => 6,
            Meta::Str(_) => 8,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pad_to_alignment(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
}

/// The whole GGUF file for `weights` (already checked) and `meta`.
fn encode(weights: &LoraWeights, meta: &AdapterMeta) -> Result<Vec<u8>> {
    let targets = weights
        .targets()
        .iter()
        .map(|t| t.gguf_name())
        .collect::<Vec<_>>()
        .join(",");
    let training = serde_json::to_string(&meta.training).map_err(|e| Error::InvalidArgument {
        name: "adapter metadata",
        reason: format!("training summary cannot be written as JSON: {e}"),
    })?;
    let rank = u32::try_from(weights.rank).map_err(|_| Error::InvalidArgument {
        name: "LoRA weights",
        reason: format!("rank {} does not fit a GGUF u32", weights.rank),
    })?;
    let mut metadata: Vec<(&str, Meta)> = vec![
        (KEY_ARCHITECTURE, Meta::Str(&meta.base_architecture)),
        (KEY_GENERAL_TYPE, Meta::Str("adapter")),
        (KEY_ADAPTER_TYPE, Meta::Str("lora")),
        (KEY_ALPHA, Meta::F32(weights.alpha)),
        (KEY_FORMAT, Meta::U32(FORMAT_VERSION)),
        (KEY_FINGERPRINT, Meta::Str(&meta.base_fingerprint)),
        (KEY_RANK, Meta::U32(rank)),
        (KEY_TARGETS, Meta::Str(&targets)),
        (KEY_OBJECTIVE, Meta::Str(&meta.objective)),
        (KEY_TRAINING, Meta::Str(&training)),
    ];
    if let Some(name) = &meta.base_name {
        metadata.push((KEY_BASE_NAME, Meta::Str(name)));
    }

    // (name, ne innermost first, values), in file order.
    let mut tensors: Vec<(String, [usize; 2], &[f32])> = Vec::new();
    for pair in weights.sorted_pairs() {
        let stem = format!("blk.{}.{}.weight", pair.layer, pair.target.gguf_name());
        tensors.push((
            format!("{stem}.lora_a"),
            [pair.n_in, weights.rank],
            &pair.lora_a,
        ));
        tensors.push((
            format!("{stem}.lora_b"),
            [weights.rank, pair.n_out],
            &pair.lora_b,
        ));
    }

    let data_len: usize = tensors
        .iter()
        .map(|(_, _, v)| (v.len() * 4).next_multiple_of(ALIGNMENT))
        .sum();
    let mut out = Vec::with_capacity(data_len + 4096);
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in &metadata {
        put_str(&mut out, key);
        out.extend_from_slice(&value.type_id().to_le_bytes());
        match value {
            Meta::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Meta::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Meta::Str(s) => put_str(&mut out, s),
        }
    }

    let mut offset = 0usize;
    for (name, ne, values) in &tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&2u32.to_le_bytes());
        for &dim in ne {
            out.extend_from_slice(&(dim as u64).to_le_bytes());
        }
        out.extend_from_slice(&0u32.to_le_bytes()); // GGML_TYPE_F32
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += (values.len() * 4).next_multiple_of(ALIGNMENT);
    }

    pad_to_alignment(&mut out);
    for (_, _, values) in &tensors {
        for v in values.iter() {
            out.extend_from_slice(&v.to_le_bytes());
        }
        pad_to_alignment(&mut out);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::LoraTarget;

    pub(crate) fn tiny_weights() -> LoraWeights {
        let pair = |layer, target, n_out: usize, n_in: usize, seed: f32| LoraPair {
            layer,
            target,
            n_in,
            n_out,
            lora_a: (0..2 * n_in).map(|i| seed + i as f32 * 0.25).collect(),
            lora_b: (0..n_out * 2).map(|i| seed - i as f32 * 0.5).collect(),
        };
        LoraWeights {
            rank: 2,
            alpha: 4.0,
            pairs: vec![
                pair(0, LoraTarget::Q, 8, 8, 1.0),
                pair(0, LoraTarget::V, 4, 8, 2.0),
                pair(1, LoraTarget::Q, 8, 8, 3.0),
            ],
        }
    }

    fn tiny_meta() -> AdapterMeta {
        AdapterMeta {
            base_architecture: "llama".into(),
            base_fingerprint: "ab".repeat(32),
            base_name: Some("tiny".into()),
            objective: "nextquill".into(),
            training: serde_json::json!({"steps": 3, "last_loss": 1.5}),
        }
    }

    #[test]
    fn roundtrip_keeps_weights_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        write_gguf(&tiny_weights(), &tiny_meta(), &path).unwrap();
        let (weights, meta) = read_gguf(&path).unwrap();
        assert_eq!(weights, tiny_weights());
        assert_eq!(meta, tiny_meta());
        // Nothing but the file itself is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn tensors_are_stored_innermost_dimension_first() {
        let bytes = encode(&tiny_weights(), &tiny_meta()).unwrap();
        let content =
            candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes))
                .unwrap();
        // candle reverses GGUF's ne into row-major dims.
        let a = &content.tensor_infos["blk.0.attn_v.weight.lora_a"];
        let b = &content.tensor_infos["blk.0.attn_v.weight.lora_b"];
        assert_eq!(a.shape.dims(), &[2, 8]);
        assert_eq!(b.shape.dims(), &[4, 2]);
        assert_eq!(content.metadata[KEY_ALPHA].to_f32().unwrap(), 4.0);
        assert_eq!(content.tensor_data_offset % 32, 0);
        assert_eq!(content.tensor_infos.len(), 6);
    }

    #[test]
    fn writing_is_deterministic_and_independent_of_pair_order() {
        let mut shuffled = tiny_weights();
        shuffled.pairs.reverse();
        assert_eq!(
            encode(&tiny_weights(), &tiny_meta()).unwrap(),
            encode(&shuffled, &tiny_meta()).unwrap()
        );
    }

    #[test]
    fn bad_weights_are_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        let mut weights = tiny_weights();
        weights.pairs[1].lora_b.pop();
        assert!(matches!(
            write_gguf(&weights, &tiny_meta(), &path),
            Err(Error::InvalidArgument { .. })
        ));
        let mut weights = tiny_weights();
        weights.pairs[2].layer = 0;
        assert!(matches!(
            write_gguf(&weights, &tiny_meta(), &path),
            Err(Error::InvalidArgument { .. })
        ));
        let meta = AdapterMeta {
            base_fingerprint: String::new(),
            ..tiny_meta()
        };
        assert!(matches!(
            write_gguf(&tiny_weights(), &meta, &path),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(!path.exists());
    }
}
