//! Checking a GGUF LoRA file before llama.cpp sees it.
//!
//! llama.cpp answers every refused adapter with a bare null pointer (the
//! reason only goes to its log), and two kinds of malformed file are worse: a
//! `general.type` / `general.architecture` / `adapter.type` that is not a
//! string, or an `adapter.lora.alpha` that is not an f32, trip a GGML assert
//! that ends the host process. [`validate`](fn@validate) reads the header and tensor table
//! with candle's bounds-checked GGUF reader and refuses all of these, and
//! everything llama.cpp would refuse, with a typed error that says what is
//! wrong.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use serde::Serialize;

use super::gguf::{
    KEY_ADAPTER_TYPE, KEY_ALIGNMENT, KEY_ALORA_TOKENS, KEY_ALPHA, KEY_ARCHITECTURE,
    KEY_FINGERPRINT, KEY_GENERAL_TYPE, KEY_OBJECTIVE, KEY_RANK,
};
use super::lora::LoraTarget;
use crate::{Error, Result};

/// The shape of one adapted projection in an adapter file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PairShape {
    /// Transformer block index, from 0.
    pub layer: usize,
    /// Which projection of the block.
    pub target: LoraTarget,
    /// Output width of the frozen projection (rows of `lora_b`).
    pub n_out: usize,
    /// Input width of the frozen projection (columns of `lora_a`).
    pub n_in: usize,
}

/// What [`validate`](fn@validate) found in an adapter file that passed every check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterReport {
    /// The adapter file.
    pub path: PathBuf,
    /// File size in bytes.
    pub file_size: u64,
    /// `general.architecture`: the base architecture the adapter is for.
    pub architecture: String,
    /// `nextquill.base_fingerprint`, absent in files nextquill did not write.
    pub base_fingerprint: Option<String>,
    /// `nextquill.objective`, absent in files nextquill did not write.
    pub objective: Option<String>,
    /// Rank shared by every pair.
    pub rank: usize,
    /// `adapter.lora.alpha`; llama.cpp scales each update by `alpha / rank`.
    pub alpha: f32,
    /// The adapted targets, in block order.
    pub targets: Vec<LoraTarget>,
    /// Every adapted projection, by layer then target.
    pub pairs: Vec<PairShape>,
}

/// Checks the GGUF LoRA adapter at `path` for a base model of architecture
/// `expected_arch` (and, when given, fingerprint `expected_fingerprint`)
/// without loading it into llama.cpp.
///
/// Refused with [`Error::InvalidAdapter`]: a file that is not GGUF or is
/// truncated, a missing or non-f32 `adapter.lora.alpha`, a tensor other than
/// `blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>.weight.lora_a|lora_b`,
/// a tensor that is not f32 or f16, a pair with one half missing, shapes of
/// `lora_a` and `lora_b` that do not share a rank, and pairs whose ranks
/// differ. Refused with [`Error::AdapterBaseMismatch`]: another architecture,
/// or, when `expected_fingerprint` is given, a file naming another base
/// fingerprint or none. A missing file is [`Error::MissingFile`].
///
/// Shapes are not compared to the base model's tensors here;
/// [`Model::load_adapter`](crate::llm::Model::load_adapter) does that.
pub fn validate(
    path: impl AsRef<Path>,
    expected_arch: &str,
    expected_fingerprint: Option<&str>,
) -> Result<AdapterReport> {
    let path = path.as_ref();
    let report = parse(path)?.report;
    let mismatch = |expected: &str, found: &str| Error::AdapterBaseMismatch {
        path: path.to_path_buf(),
        expected: expected.to_owned(),
        found: found.to_owned(),
    };
    if report.architecture != expected_arch {
        return Err(mismatch(
            &format!("architecture {expected_arch}"),
            &format!("architecture {}", report.architecture),
        ));
    }
    if let Some(expected) = expected_fingerprint {
        match report.base_fingerprint.as_deref() {
            Some(found) if found == expected => {}
            Some(found) => {
                return Err(mismatch(
                    &format!("fingerprint {expected}"),
                    &format!("fingerprint {found}"),
                ))
            }
            None => {
                return Err(mismatch(
                    &format!("fingerprint {expected}"),
                    &format!("an unknown model (the file has no {KEY_FINGERPRINT} key)"),
                ))
            }
        }
    }
    Ok(report)
}

/// Where one tensor's values lie in the file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TensorSlot {
    /// F32 or F16.
    pub dtype: GgmlDType,
    /// Row-major rows.
    pub rows: usize,
    /// Row-major columns.
    pub cols: usize,
    /// Absolute byte offset of the first value.
    pub start: u64,
}

/// One adapted projection's two tensors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PairLayout {
    pub layer: usize,
    pub target: LoraTarget,
    pub a: TensorSlot,
    pub b: TensorSlot,
}

/// A GGUF adapter whose structure passed every check.
pub(crate) struct Parsed {
    pub report: AdapterReport,
    pub metadata: HashMap<String, Value>,
    /// By layer, then target.
    pub pairs: Vec<PairLayout>,
}

/// Reads and checks the header and tensor table of a GGUF adapter; no
/// expectations about the base model.
pub(crate) fn parse(path: &Path) -> Result<Parsed> {
    let invalid = |reason: String| Error::InvalidAdapter {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            what: "adapter",
            path: path.to_path_buf(),
            fix: "train an adapter first or pass the path of an existing .gguf adapter",
        },
        _ => Error::io(path, e),
    })?;
    let file_size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 16];
    if file.read_exact(&mut head).is_err() || &head[..4] != b"GGUF" {
        return Err(invalid(format!(
            "it does not start with the GGUF magic bytes ({file_size} bytes long)"
        )));
    }
    // candle keeps tensors in a map, so a name given twice would pass
    // unnoticed; the header's own count tells.
    let declared_tensors = match u32::from_le_bytes([head[4], head[5], head[6], head[7]]) {
        1 => u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]])),
        _ => u64::from_le_bytes([
            head[8], head[9], head[10], head[11], head[12], head[13], head[14], head[15],
        ]),
    };
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut file).map_err(|e| {
        invalid(format!(
            "its header cannot be read ({e}); the file is damaged or truncated, write it again"
        ))
    })?;
    if content.tensor_infos.len() as u64 != declared_tensors {
        return Err(invalid(format!(
            "its header declares {declared_tensors} tensors but only {} distinct names; \
             a tensor name appears twice",
            content.tensor_infos.len()
        )));
    }
    let meta = Metadata {
        values: &content.metadata,
        invalid: &invalid,
    };

    meta.expect_str(KEY_GENERAL_TYPE, Some("adapter"))?;
    meta.expect_str(KEY_ADAPTER_TYPE, Some("lora"))?;
    let architecture = meta.expect_str(KEY_ARCHITECTURE, None)?.to_owned();
    let alpha = match content.metadata.get(KEY_ALPHA) {
        Some(Value::F32(alpha)) if alpha.is_finite() => *alpha,
        Some(Value::F32(alpha)) => return Err(invalid(format!("{KEY_ALPHA} is {alpha}"))),
        Some(other) => {
            return Err(invalid(format!(
                "{KEY_ALPHA} is a {:?}, not an f32 (llama.cpp would abort on it)",
                other.value_type()
            )))
        }
        None => {
            return Err(invalid(format!(
                "it has no {KEY_ALPHA}; llama.cpp would silently scale by 1 instead of alpha / rank"
            )))
        }
    };
    let alignment = match content.metadata.get(KEY_ALIGNMENT) {
        None => 32,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => {
            return Err(invalid(format!(
                "{KEY_ALIGNMENT} is {other:?}; it must be a u32 power of two"
            )))
        }
    };
    if content.metadata.contains_key(KEY_ALORA_TOKENS) {
        return Err(invalid(format!(
            "it is an activated LoRA ({KEY_ALORA_TOKENS}), which nextquill does not apply"
        )));
    }
    let base_fingerprint = meta.optional_str(KEY_FINGERPRINT)?;
    let objective = meta.optional_str(KEY_OBJECTIVE)?;

    let pairs = tensor_pairs(&content, file_size, alignment, &invalid)?;
    let rank = pairs[0].a.rows;
    if let Some(stored) = content.metadata.get(KEY_RANK) {
        if stored.to_u32().ok().map(|r| r as usize) != Some(rank) {
            return Err(invalid(format!(
                "{KEY_RANK} says {stored:?} but the tensors have rank {rank}"
            )));
        }
    }
    let mut targets: Vec<LoraTarget> = pairs.iter().map(|p| p.target).collect();
    targets.sort();
    targets.dedup();
    let report = AdapterReport {
        path: path.to_path_buf(),
        file_size,
        architecture,
        base_fingerprint,
        objective,
        rank,
        alpha,
        targets,
        pairs: pairs
            .iter()
            .map(|p| PairShape {
                layer: p.layer,
                target: p.target,
                n_out: p.b.rows,
                n_in: p.a.cols,
            })
            .collect(),
    };
    Ok(Parsed {
        report,
        metadata: content.metadata,
        pairs,
    })
}

/// Typed access to the metadata, refusing wrong types with `invalid`.
struct Metadata<'a, F: Fn(String) -> Error> {
    values: &'a HashMap<String, Value>,
    invalid: &'a F,
}

impl<'a, F: Fn(String) -> Error> Metadata<'a, F> {
    /// The string under `key`, which must be present and, when `want` is
    /// given, equal to it.
    fn expect_str(&self, key: &str, want: Option<&str>) -> Result<&'a str> {
        let found = match self.values.get(key) {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err((self.invalid)(format!(
                    "{key} is a {:?}, not a string (llama.cpp would abort on it)",
                    other.value_type()
                )))
            }
            None => return Err((self.invalid)(format!("it has no {key} key"))),
        };
        match want {
            Some(want) if found != want => Err((self.invalid)(format!(
                "{key} is {found:?}, not {want:?}; it is not a LoRA adapter"
            ))),
            _ if found.is_empty() => Err((self.invalid)(format!("{key} is empty"))),
            _ => Ok(found),
        }
    }

    fn optional_str(&self, key: &str) -> Result<Option<String>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err((self.invalid)(format!(
                "{key} is a {:?}, not a string",
                other.value_type()
            ))),
        }
    }
}

/// Which half of a pair a tensor is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Half {
    A,
    B,
}

/// Splits `blk.N.<stem>.weight.lora_a|lora_b` into its parts; `None` for any
/// other name (including `blk.01...`, which names no base tensor).
fn parse_tensor_name(name: &str) -> Option<(usize, LoraTarget, Half)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    if name != format!("blk.{layer}.{rest}") {
        return None;
    }
    let (stem, half) = if let Some(stem) = rest.strip_suffix(".weight.lora_a") {
        (stem, Half::A)
    } else {
        (rest.strip_suffix(".weight.lora_b")?, Half::B)
    };
    let target = LoraTarget::ALL
        .into_iter()
        .find(|t| t.gguf_name() == stem)?;
    Some((layer, target, half))
}

/// Groups the tensors into complete pairs of one rank, each inside the file.
fn tensor_pairs(
    content: &Content,
    file_size: u64,
    alignment: u64,
    invalid: &impl Fn(String) -> Error,
) -> Result<Vec<PairLayout>> {
    let mut halves: BTreeMap<(usize, LoraTarget), [Option<TensorSlot>; 2]> = BTreeMap::new();
    let mut extents: Vec<(u64, u64, &str)> = Vec::new();
    for (name, info) in &content.tensor_infos {
        let (layer, target, half) = parse_tensor_name(name).ok_or_else(|| {
            invalid(format!(
                "it holds tensor {name:?}, which is not blk.N.<attn_q|attn_k|attn_v|attn_output|\
                 ffn_gate|ffn_up|ffn_down>.weight.lora_a|lora_b; llama.cpp refuses any other tensor"
            ))
        })?;
        let width = match info.ggml_dtype {
            GgmlDType::F32 => 4,
            GgmlDType::F16 => 2,
            other => {
                return Err(invalid(format!(
                    "tensor {name} is {other:?}; LoRA tensors must be f32 or f16"
                )))
            }
        };
        let &[rows, cols] = info.shape.dims() else {
            return Err(invalid(format!(
                "tensor {name} has shape {:?}; LoRA tensors are 2-D",
                info.shape.dims()
            )));
        };
        if rows == 0 || cols == 0 {
            return Err(invalid(format!("tensor {name} is empty ({rows}x{cols})")));
        }
        let start = content.tensor_data_offset.saturating_add(info.offset);
        let end = (rows as u64)
            .saturating_mul(cols as u64)
            .saturating_mul(width)
            .saturating_add(start);
        if end > file_size {
            return Err(invalid(format!(
                "it is truncated at byte {file_size} (tensor {name} ends at byte {end}); \
                 write or copy it again"
            )));
        }
        if info.offset % alignment != 0 {
            return Err(invalid(format!(
                "tensor {name} starts at offset {}, not a multiple of the alignment {alignment}",
                info.offset
            )));
        }
        extents.push((start, end, name));
        let slot = TensorSlot {
            dtype: info.ggml_dtype,
            rows,
            cols,
            start,
        };
        let entry = halves.entry((layer, target)).or_default();
        entry[(half == Half::B) as usize] = Some(slot);
    }
    extents.sort();
    if let Some(w) = extents.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(invalid(format!(
            "the data of tensors {} and {} overlap",
            w[0].2, w[1].2
        )));
    }

    let mut pairs = Vec::with_capacity(halves.len());
    for ((layer, target), [a, b]) in halves {
        let stem = format!("blk.{layer}.{}.weight", target.gguf_name());
        let (Some(a), Some(b)) = (a, b) else {
            let missing = if a.is_none() { "lora_a" } else { "lora_b" };
            return Err(invalid(format!("{stem} has no {missing}")));
        };
        if a.rows != b.cols {
            return Err(invalid(format!(
                "{stem}: lora_a is {}x{} and lora_b {}x{}; lora_a's rows and lora_b's \
                 columns are the rank and must be equal",
                a.rows, a.cols, b.rows, b.cols
            )));
        }
        pairs.push(PairLayout {
            layer,
            target,
            a,
            b,
        });
    }
    let Some(first) = pairs.first() else {
        return Err(invalid("it holds no LoRA tensors".into()));
    };
    if let Some(other) = pairs.iter().find(|p| p.a.rows != first.a.rows) {
        return Err(invalid(format!(
            "ranks differ: blk.{}.{} has rank {} but blk.{}.{} has rank {}",
            first.layer,
            first.target.gguf_name(),
            first.a.rows,
            other.layer,
            other.target.gguf_name(),
            other.a.rows
        )));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_parse_only_in_canonical_form() {
        assert!(matches!(
            parse_tensor_name("blk.12.attn_q.weight.lora_a"),
            Some((12, LoraTarget::Q, Half::A))
        ));
        assert!(matches!(
            parse_tensor_name("blk.0.ffn_down.weight.lora_b"),
            Some((0, LoraTarget::Down, Half::B))
        ));
        for bad in [
            "blk.01.attn_q.weight.lora_a",
            "blk.+1.attn_q.weight.lora_a",
            "blk..attn_q.weight.lora_a",
            "blk.1.attn_q.weight",
            "blk.1.attn_qkv.weight.lora_a",
            "blk.1.attn_q.bias.lora_a",
            "token_embd.weight.lora_a",
            "blk.1.attn_norm.weight",
        ] {
            assert!(parse_tensor_name(bad).is_none(), "{bad}");
        }
    }
}
