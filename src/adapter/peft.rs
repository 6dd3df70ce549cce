//! PEFT folders: the form Hugging Face tools load (`PeftModel.from_pretrained`).
//!
//! A folder holds `adapter_config.json` (PEFT's `LoraConfig`) and
//! `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (and
//! `.mlp.` for gate/up/down), f32. nextquill's [`AdapterMeta`] travels in the
//! safetensors header metadata under `nextquill`, which PEFT ignores.
//!
//! Row order: llama.cpp's converter permutes the rows of LLaMA's q and k
//! projections (so that its rope can rotate adjacent pairs), and nextquill
//! trains on the GGUF weights, so q/k `lora_b` rows are in GGUF order. The
//! export puts them back in Hugging Face order ([`gguf_rows_to_hf`]) and the
//! import re-permutes them ([`hf_rows_to_gguf`]); `lora_a` and every other
//! projection are unchanged.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::gguf::AdapterMeta;
use super::lora::{LoraPair, LoraTarget, LoraWeights};
use super::write_atomic;
use crate::{Error, Result};

/// File name of the PEFT configuration inside an adapter folder.
pub const PEFT_CONFIG_FILE: &str = "adapter_config.json";
/// File name of the PEFT weights inside an adapter folder.
pub const PEFT_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// safetensors header key that carries nextquill's [`AdapterMeta`] as JSON.
const META_KEY: &str = "nextquill";
const KEY_PREFIX: &str = "base_model.model.model.layers.";

/// A tensor's row-major shape and its values, widened to f32.
type ShapedValues = (Vec<usize>, Vec<f32>);

/// What [`import_peft`] read from a PEFT folder.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftImport {
    /// The adapter, q/k `lora_b` rows in GGUF order, ready for [`write_gguf`](super::write_gguf).
    pub weights: LoraWeights,
    /// `base_model_name_or_path` of the configuration, when set.
    pub base_model_name_or_path: Option<String>,
    /// nextquill's metadata, present when nextquill exported the folder.
    pub meta: Option<AdapterMeta>,
}

/// Reorders the rows of a q or k projection (or of its `lora_b`) from
/// Hugging Face order to llama.cpp's GGUF order.
///
/// `values` is row-major with `n_cols` columns; `n_head` is the number of
/// heads the rows belong to (`head_count` for q, `head_count_kv` for k). Within
/// each head, HF keeps the two rotary halves apart (rows `j * d/2 + i`) while
/// GGUF interleaves them (rows `2 i + j`), as `convert_hf_to_gguf.py`'s
/// `permute` does. Fails unless the rows split into `n_head` heads of an even
/// size.
pub fn hf_rows_to_gguf(values: &[f32], n_cols: usize, n_head: usize) -> Result<Vec<f32>> {
    permute_rows(values, n_cols, n_head, true)
}

/// The inverse of [`hf_rows_to_gguf`]: GGUF order back to Hugging Face order.
pub fn gguf_rows_to_hf(values: &[f32], n_cols: usize, n_head: usize) -> Result<Vec<f32>> {
    permute_rows(values, n_cols, n_head, false)
}

fn permute_rows(values: &[f32], n_cols: usize, n_head: usize, to_gguf: bool) -> Result<Vec<f32>> {
    let n_rows = values.len().checked_div(n_cols).unwrap_or(0);
    if n_cols == 0 || n_head == 0 || values.len() % n_cols != 0 || n_rows % (2 * n_head) != 0 {
        return Err(Error::InvalidArgument {
            name: "n_head",
            reason: format!(
                "{} values in rows of {n_cols} do not split into {n_head} heads of an even \
                 number of rows; pass the model's head counts",
                values.len()
            ),
        });
    }
    let half = n_rows / n_head / 2;
    let mut out = vec![0.0f32; values.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let gguf_row = h * 2 * half + i * 2 + j;
                let hf_row = h * 2 * half + j * half + i;
                let (from, to) = if to_gguf {
                    (hf_row, gguf_row)
                } else {
                    (gguf_row, hf_row)
                };
                out[to * n_cols..(to + 1) * n_cols]
                    .copy_from_slice(&values[from * n_cols..(from + 1) * n_cols]);
            }
        }
    }
    Ok(out)
}

/// The heads whose rows `target` permutes, if any.
fn heads_of(target: LoraTarget, n_head: usize, n_head_kv: usize) -> Option<usize> {
    match target {
        LoraTarget::Q => Some(n_head),
        LoraTarget::K => Some(n_head_kv),
        _ => None,
    }
}

fn module_path(target: LoraTarget) -> &'static str {
    match target {
        LoraTarget::Q | LoraTarget::K | LoraTarget::V | LoraTarget::O => "self_attn",
        LoraTarget::Gate | LoraTarget::Up | LoraTarget::Down => "mlp",
    }
}

/// Writes `weights` as a PEFT LoRA folder `dir` (created if missing):
/// `adapter_config.json` and `adapter_model.safetensors`, each replaced whole.
///
/// `n_head` and `n_head_kv` are the base model's head counts
/// ([`ModelInfo`](crate::llm::ModelInfo)); q/k `lora_b` rows are reordered to
/// Hugging Face order with them. `lora_dropout` is written as 0.0 (the
/// trainer uses none) and `base_model_name_or_path` is `meta.base_name`: the
/// GGUF name, which may differ from the Hugging Face repository id; edit it
/// before loading with `from_pretrained` when it does.
pub fn export_peft(
    weights: &LoraWeights,
    meta: &AdapterMeta,
    n_head: usize,
    n_head_kv: usize,
    dir: impl AsRef<Path>,
) -> Result<()> {
    let dir = dir.as_ref();
    weights.check()?;

    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for pair in weights.sorted_pairs() {
        let lora_b = match heads_of(pair.target, n_head, n_head_kv) {
            Some(heads) => gguf_rows_to_hf(&pair.lora_b, weights.rank, heads)?,
            None => pair.lora_b.clone(),
        };
        let stem = format!(
            "{KEY_PREFIX}{}.{}.{}",
            pair.layer,
            module_path(pair.target),
            pair.target.peft_name()
        );
        tensors.push((
            format!("{stem}.lora_A.weight"),
            vec![weights.rank, pair.n_in],
            le_bytes(&pair.lora_a),
        ));
        tensors.push((
            format!("{stem}.lora_B.weight"),
            vec![pair.n_out, weights.rank],
            le_bytes(&lora_b),
        ));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes).map(|view| (name.as_str(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| safetensors_error(dir, e))?;
    let meta_json = serde_json::to_string(meta).map_err(|e| Error::InvalidArgument {
        name: "adapter metadata",
        reason: format!("cannot be written as JSON: {e}"),
    })?;
    let header = HashMap::from([
        ("format".to_owned(), "pt".to_owned()),
        (META_KEY.to_owned(), meta_json),
    ]);
    let safetensors_bytes =
        safetensors::serialize(views, Some(header)).map_err(|e| safetensors_error(dir, e))?;

    let target_modules: Vec<&str> = weights.targets().iter().map(|t| t.peft_name()).collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta.base_name,
        "r": weights.rank,
        "lora_alpha": weights.alpha,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let config_bytes = serde_json::to_vec_pretty(&config).map_err(|e| Error::InvalidArgument {
        name: "adapter metadata",
        reason: format!("PEFT configuration cannot be written: {e}"),
    })?;

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_atomic(&dir.join(PEFT_WEIGHTS_FILE), &safetensors_bytes)?;
    write_atomic(&dir.join(PEFT_CONFIG_FILE), &config_bytes)?;
    tracing::debug!(
        "exported PEFT adapter {} ({} pairs, rank {})",
        dir.display(),
        weights.pairs.len(),
        weights.rank
    );
    Ok(())
}

/// Reads a PEFT LoRA folder (as [`export_peft`] writes it, or as PEFT saves a
/// LLaMA-family adapter) into GGUF-ordered [`LoraWeights`].
///
/// `n_head` / `n_head_kv` are the base model's head counts, used to reorder
/// q/k `lora_b` rows. f16 and bf16 tensors are widened to f32. An rsLoRA
/// adapter (`use_rslora`, update scaled by `alpha / sqrt(r)`) is converted by
/// scaling alpha by `sqrt(r)`, so llama.cpp's `alpha / r` gives the same
/// update. Refused with [`Error::InvalidAdapter`]: DoRA, `fan_in_fan_out`,
/// per-module ranks or alphas (`rank_pattern`, `alpha_pattern`), and any
/// tensor that is not a LoRA pair of a known projection (trained biases,
/// `modules_to_save`, embeddings).
pub fn import_peft(dir: impl AsRef<Path>, n_head: usize, n_head_kv: usize) -> Result<PeftImport> {
    let dir = dir.as_ref();
    let invalid = |reason: String| Error::InvalidAdapter {
        path: dir.to_path_buf(),
        reason,
    };
    let config = read_config(dir)?;
    let (rank, alpha) = config.rank_and_alpha().map_err(&invalid)?;

    let weights_path = dir.join(PEFT_WEIGHTS_FILE);
    let bytes = read_file(&weights_path)?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| Error::InvalidAdapter {
        path: weights_path.clone(),
        reason: format!("it is not a readable safetensors file ({e})"),
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| safetensors_error(dir, e))?;
    let meta = match header.metadata().as_ref().and_then(|m| m.get(META_KEY)) {
        None => None,
        Some(json) => Some(
            serde_json::from_str(json)
                .map_err(|e| invalid(format!("its {META_KEY} metadata is not valid JSON ({e})")))?,
        ),
    };

    let mut halves: BTreeMap<(usize, LoraTarget), [Option<ShapedValues>; 2]> = BTreeMap::new();
    for (name, view) in tensors.iter() {
        let (layer, target, is_b) = parse_key(name).ok_or_else(|| {
            invalid(format!(
                "it holds tensor {name:?}, which is not a LoRA pair of a LLaMA-family \
                 projection ({KEY_PREFIX}N.self_attn|mlp.<module>.lora_A|lora_B.weight)"
            ))
        })?;
        let values = to_f32(&view).ok_or_else(|| {
            invalid(format!(
                "tensor {name} is {:?}; only f32, f16 and bf16 are read",
                view.dtype()
            ))
        })?;
        halves.entry((layer, target)).or_default()[is_b as usize] =
            Some((view.shape().to_vec(), values));
    }

    let mut pairs = Vec::with_capacity(halves.len());
    for ((layer, target), [a, b]) in halves {
        let name = format!("layer {layer} {}", target.peft_name());
        let (Some((a_shape, lora_a)), Some((b_shape, lora_b))) = (a, b) else {
            return Err(invalid(format!("{name} lacks lora_A or lora_B")));
        };
        let (&[a_rank, n_in], &[n_out, b_rank]) = (a_shape.as_slice(), b_shape.as_slice()) else {
            return Err(invalid(format!(
                "{name}: lora_A is {a_shape:?} and lora_B {b_shape:?}; both must be 2-D"
            )));
        };
        if a_rank != rank || b_rank != rank {
            return Err(invalid(format!(
                "{name}: lora_A is {a_shape:?} and lora_B {b_shape:?}, but the configuration \
                 says r = {rank}"
            )));
        }
        let lora_b = match heads_of(target, n_head, n_head_kv) {
            Some(heads) => hf_rows_to_gguf(&lora_b, rank, heads)?,
            None => lora_b,
        };
        pairs.push(LoraPair {
            layer,
            target,
            n_in,
            n_out,
            lora_a,
            lora_b,
        });
    }
    let weights = LoraWeights { rank, alpha, pairs };
    weights.check().map_err(|e| invalid(e.to_string()))?;
    Ok(PeftImport {
        weights,
        base_model_name_or_path: config.base_model_name_or_path,
        meta,
    })
}

/// The fields of PEFT's `LoraConfig` that change how weights are read.
#[derive(serde::Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
}

impl PeftConfig {
    /// Rank and the alpha that gives llama.cpp's `alpha / rank` the same scale.
    fn rank_and_alpha(&self) -> std::result::Result<(usize, f32), String> {
        if self.peft_type.as_deref() != Some("LORA") {
            return Err(format!(
                "peft_type is {:?}, not \"LORA\"",
                self.peft_type.as_deref().unwrap_or("missing")
            ));
        }
        let unsupported = [
            (self.use_dora, "use_dora (DoRA)"),
            (self.fan_in_fan_out, "fan_in_fan_out"),
            (
                self.rank_pattern.as_ref().is_some_and(|m| !m.is_empty()),
                "rank_pattern (per-module ranks)",
            ),
            (
                self.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty()),
                "alpha_pattern (per-module alphas)",
            ),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(set, _)| *set) {
            return Err(format!("it uses {what}, which llama.cpp cannot apply"));
        }
        let rank = self.r.filter(|&r| r > 0).ok_or("r is missing or 0")?;
        let alpha = self
            .lora_alpha
            .filter(|a| a.is_finite())
            .ok_or("lora_alpha is missing or not a number")?;
        let alpha = if self.use_rslora {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        };
        Ok((rank, alpha as f32))
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            what: "PEFT adapter file",
            path: path.to_path_buf(),
            fix: "pass a folder holding adapter_config.json and adapter_model.safetensors",
        },
        _ => Error::io(path, e),
    })
}

fn read_config(dir: &Path) -> Result<PeftConfig> {
    let path = dir.join(PEFT_CONFIG_FILE);
    let bytes = read_file(&path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::InvalidAdapter {
        path,
        reason: format!("it is not a PEFT configuration ({e})"),
    })
}

/// Splits `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`.
fn parse_key(name: &str) -> Option<(usize, LoraTarget, bool)> {
    let rest = name.strip_prefix(KEY_PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (module, is_b) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, false)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, true)
    };
    let target = LoraTarget::ALL
        .into_iter()
        .find(|t| module == format!("{}.{}", module_path(*t), t.peft_name()))?;
    (name == format!("{KEY_PREFIX}{layer}.{rest}")).then_some((layer, target, is_b))
}

fn to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let data = view.data();
    Some(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn safetensors_error(dir: &Path, e: safetensors::SafeTensorError) -> Error {
    Error::InvalidAdapter {
        path: PathBuf::from(dir),
        reason: format!("safetensors: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32).collect()
    }

    #[test]
    fn permute_matches_convert_hf_to_gguf() {
        // One head of 4 rows, 1 column: HF rows [0, 1 | 2, 3] (two rotary
        // halves) interleave to [0, 2, 1, 3], as numpy's
        // w.reshape(1, 2, 2, 1).swapaxes(1, 2).reshape(4, 1) gives.
        assert_eq!(
            hf_rows_to_gguf(&numbered(4), 1, 1).unwrap(),
            vec![0.0, 2.0, 1.0, 3.0]
        );
        // Two heads of 4 rows each, 2 columns: each head permuted on its own.
        let got = hf_rows_to_gguf(&numbered(16), 2, 2).unwrap();
        let rows: Vec<f32> = got.chunks(2).map(|r| r[0] / 2.0).collect();
        assert_eq!(rows, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }

    #[test]
    fn permute_then_unpermute_is_identity() {
        for (rows, cols, heads) in [(576, 8, 9), (192, 8, 3), (64, 3, 4), (4, 5, 1)] {
            let values = numbered(rows * cols);
            let there = hf_rows_to_gguf(&values, cols, heads).unwrap();
            assert_ne!(there, values);
            assert_eq!(gguf_rows_to_hf(&there, cols, heads).unwrap(), values);
            let back = gguf_rows_to_hf(&values, cols, heads).unwrap();
            assert_eq!(hf_rows_to_gguf(&back, cols, heads).unwrap(), values);
        }
    }

    #[test]
    fn permute_refuses_rows_that_do_not_split_into_heads() {
        assert!(hf_rows_to_gguf(&numbered(12), 2, 2).is_err());
        assert!(hf_rows_to_gguf(&numbered(12), 0, 1).is_err());
        assert!(gguf_rows_to_hf(&numbered(8), 2, 0).is_err());
    }

    #[test]
    fn peft_keys_parse_only_in_canonical_form() {
        assert_eq!(
            parse_key("base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"),
            Some((3, LoraTarget::Q, true))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"),
            Some((0, LoraTarget::Down, false))
        );
        for bad in [
            "base_model.model.model.layers.3.mlp.q_proj.lora_B.weight",
            "base_model.model.model.layers.03.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.layers.3.self_attn.q_proj.lora_B.default.weight",
            "base_model.model.model.layers.3.self_attn.q_proj.bias",
            "base_model.model.lm_head.lora_A.weight",
        ] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }
}
