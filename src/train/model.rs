//! The trainable forward pass: a LLaMA-family or Qwen2-family decoder read
//! from the same GGUF file llama.cpp runs, built only from operations that
//! have a backward pass.
//!
//! candle's fused `rms_norm`, `softmax_last_dim`, `rope` and `QMatMul` have no
//! backward pass (the graph is silently cut), so this file builds the forward
//! from basic ops and the custom ops of [`super::ops`] and [`super::fused`].
//! Base weights stay in their GGUF quantization and are frozen; only the LoRA
//! pairs are variables.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::fused::{swiglu, Attention, RmsNorm, Rope};
use super::lora::{Dropout, LoraSet};
use super::ops::{FrozenLinear, FrozenWeight};
use crate::adapter::LoraTarget;
use crate::error::{Error, Result};

/// The decoder families the trainer understands, from `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    /// `llama`: SmolLM2, TinyLlama, Llama 3.x. llama.cpp's converter permutes the
    /// q/k rows so that rotary pairs are adjacent (its "normal" rope).
    Llama,
    /// `qwen2`: Qwen2 / Qwen2.5. Biases on q, k, v; rotary pairs split in halves
    /// ("neox" rope), rows not permuted.
    Qwen2,
}

/// Sizes of a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelDims {
    pub(crate) arch: Arch,
    pub(crate) n_embd: usize,
    pub(crate) n_layer: usize,
    pub(crate) n_head: usize,
    pub(crate) n_head_kv: usize,
    pub(crate) head_dim: usize,
    pub(crate) n_ff: usize,
    pub(crate) n_vocab: usize,
    pub(crate) rope_theta: f32,
    pub(crate) rms_eps: f64,
}

#[derive(Debug)]
struct Block {
    attn_norm: RmsNorm,
    q: FrozenLinear,
    k: FrozenLinear,
    v: FrozenLinear,
    o: FrozenLinear,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    ffn_norm: RmsNorm,
    gate: FrozenLinear,
    up: FrozenLinear,
    down: FrozenLinear,
}

/// The frozen base model.
#[derive(Debug)]
pub(crate) struct BaseModel {
    pub(crate) dims: ModelDims,
    /// Token embedding in f32 `(n_vocab, n_embd)`; also the output head when tied.
    embedding: Tensor,
    lm_head: FrozenLinear,
    output_norm: RmsNorm,
    blocks: Vec<Block>,
    /// Bytes the base weights occupy in memory.
    pub(crate) resident_bytes: u64,
}

/// The LoRA state a forward pass applies, if any.
pub(crate) struct Adapter<'a> {
    pub(crate) lora: &'a LoraSet,
    pub(crate) dropout: Option<&'a mut Dropout>,
}

impl BaseModel {
    /// Loads a GGUF model onto `device`, keeping its matrices quantized.
    pub(crate) fn load(path: &Path, device: &Device) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidModel {
            path: path.to_path_buf(),
            reason,
        };
        if !path.exists() {
            return Err(Error::MissingFile {
                what: "model file",
                path: path.to_path_buf(),
                fix: "fetch it with models/fetch.sh or point NEXTQUILL_MODEL at a GGUF file",
            });
        }
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content =
            Content::read(&mut file).map_err(|e| invalid(format!("cannot read GGUF: {e}")))?;

        let dims = read_dims(&content).map_err(invalid)?;
        let mut resident_bytes = 0u64;
        let mut tensor = |name: &str| {
            let q = content
                .tensor(&mut file, name, device)
                .map_err(|e| invalid(format!("tensor {name}: {e}")))?;
            resident_bytes += q.storage_size_in_bytes() as u64;
            Ok::<_, Error>(q)
        };
        let dense = |q: QTensor, name: &str| -> Result<Tensor> {
            q.dequantize(device)
                .map_err(|e| invalid(format!("tensor {name}: {e}")))
        };
        macro_rules! dense {
            ($name:expr) => {{
                let name: &str = &$name;
                dense(tensor(name)?, name)
            }};
        }
        // Norm weights are read once here, not at every forward pass.
        let rms_eps = dims.rms_eps;
        macro_rules! norm {
            ($name:expr) => {{
                let name: &str = &$name;
                RmsNorm::new(dense!(name)?, rms_eps)
                    .map_err(|e| invalid(format!("tensor {name}: {e}")))
            }};
        }

        let embedding = dense!("token_embd.weight")?;
        let output_norm = norm!("output_norm.weight")?;
        let mut blocks = Vec::with_capacity(dims.n_layer);
        for i in 0..dims.n_layer {
            let attn_norm = norm!(format!("blk.{i}.attn_norm.weight"))?;
            let ffn_norm = norm!(format!("blk.{i}.ffn_norm.weight"))?;
            let (q_bias, k_bias, v_bias) = match dims.arch {
                Arch::Qwen2 => (
                    Some(dense!(format!("blk.{i}.attn_q.bias"))?),
                    Some(dense!(format!("blk.{i}.attn_k.bias"))?),
                    Some(dense!(format!("blk.{i}.attn_v.bias"))?),
                ),
                Arch::Llama => (None, None, None),
            };
            macro_rules! linear {
                ($stem:expr) => {{
                    let name = format!("blk.{i}.{}.weight", $stem);
                    let q = tensor(&name)?;
                    FrozenLinear::new(FrozenWeight::Quantized(q))
                        .map_err(|e| invalid(format!("{name}: {e}")))
                }};
            }
            blocks.push(Block {
                q: linear!("attn_q")?,
                k: linear!("attn_k")?,
                v: linear!("attn_v")?,
                o: linear!("attn_output")?,
                gate: linear!("ffn_gate")?,
                up: linear!("ffn_up")?,
                down: linear!("ffn_down")?,
                attn_norm,
                ffn_norm,
                q_bias,
                k_bias,
                v_bias,
            });
        }

        // SmolLM2 and the small Qwen2.5 models tie the output head to the embedding.
        let lm_head = if content.tensor_infos.contains_key("output.weight") {
            FrozenWeight::Quantized(tensor("output.weight")?)
        } else {
            FrozenWeight::Dense(embedding.clone())
        };
        let lm_head =
            FrozenLinear::new(lm_head).map_err(|e| invalid(format!("output head: {e}")))?;
        resident_bytes += (embedding.elem_count() * 4) as u64;

        let model = BaseModel {
            dims,
            embedding,
            lm_head,
            output_norm,
            blocks,
            resident_bytes,
        };
        model.check_shapes().map_err(invalid)?;
        Ok(model)
    }

    fn check_shapes(&self) -> std::result::Result<(), String> {
        let d = &self.dims;
        let (q_out, kv_out) = (d.n_head * d.head_dim, d.n_head_kv * d.head_dim);
        for (i, b) in self.blocks.iter().enumerate() {
            let expected = [
                ("attn_q", &b.q, q_out, d.n_embd),
                ("attn_k", &b.k, kv_out, d.n_embd),
                ("attn_v", &b.v, kv_out, d.n_embd),
                ("attn_output", &b.o, d.n_embd, q_out),
                ("ffn_gate", &b.gate, d.n_ff, d.n_embd),
                ("ffn_up", &b.up, d.n_ff, d.n_embd),
                ("ffn_down", &b.down, d.n_embd, d.n_ff),
            ];
            for (name, linear, n_out, n_in) in expected {
                if (linear.n_out(), linear.n_in()) != (n_out, n_in) {
                    return Err(format!(
                        "blk.{i}.{name} is {}x{}, expected {n_out}x{n_in} from the metadata",
                        linear.n_out(),
                        linear.n_in()
                    ));
                }
            }
        }
        if (self.lm_head.n_out(), self.lm_head.n_in()) != (d.n_vocab, d.n_embd) {
            return Err(format!(
                "output head is {}x{}",
                self.lm_head.n_out(),
                self.lm_head.n_in()
            ));
        }
        Ok(())
    }

    /// The frozen projection `target` of block `layer`.
    pub(crate) fn linear(&self, layer: usize, target: LoraTarget) -> &FrozenLinear {
        let b = &self.blocks[layer];
        match target {
            LoraTarget::Q => &b.q,
            LoraTarget::K => &b.k,
            LoraTarget::V => &b.v,
            LoraTarget::O => &b.o,
            LoraTarget::Gate => &b.gate,
            LoraTarget::Up => &b.up,
            LoraTarget::Down => &b.down,
        }
    }

    /// Logits `(tokens.len() - first_row, n_vocab)` of the positions from
    /// `first_row` on; row `i` predicts the token after position `first_row + i`.
    ///
    /// The output head runs only on those rows, which is what keeps a training
    /// step small: the vocabulary is 49152 wide.
    pub(crate) fn logits(
        &self,
        tokens: &[u32],
        first_row: usize,
        mut adapter: Option<Adapter<'_>>,
    ) -> candle_core::Result<Tensor> {
        let t = tokens.len();
        if first_row >= t {
            candle_core::bail!("no rows to score: first row {first_row} of {t} tokens")
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= self.dims.n_vocab) {
            candle_core::bail!(
                "token id {bad} is outside the vocabulary of {}",
                self.dims.n_vocab
            )
        }
        let device = self.embedding.device();
        let ids = Tensor::from_slice(tokens, t, device)?;
        let mut x = self.embedding.index_select(&ids, 0)?;
        let (cos, sin) = rope_tables(&self.dims, t, device)?;
        let rope = Rope::new(cos, sin, self.dims.arch)?;

        for (layer, block) in self.blocks.iter().enumerate() {
            x = self.block_forward(layer, block, &x, &rope, adapter.as_mut())?;
        }

        let x = x.narrow(0, first_row, t - first_row)?;
        let x = self.output_norm.forward(&x)?;
        self.lm_head.forward(&x)
    }

    fn block_forward(
        &self,
        layer: usize,
        b: &Block,
        x: &Tensor,
        rope: &Rope,
        mut adapter: Option<&mut Adapter<'_>>,
    ) -> candle_core::Result<Tensor> {
        let d = &self.dims;
        let t = x.dim(0)?;
        let mut project = |target: LoraTarget, x: &Tensor| -> candle_core::Result<Tensor> {
            let linear = self.linear(layer, target);
            let Some(adapter) = adapter.as_deref_mut() else {
                return linear.forward(x);
            };
            let Some(pair) = adapter.lora.get(layer, target) else {
                return linear.forward(x);
            };
            let scale = adapter.lora.scale();
            match adapter.dropout.as_deref_mut().filter(|d| d.is_active()) {
                // The LoRA branch sees another input than the frozen layer.
                Some(dropout) => {
                    let dropped = dropout.apply(x)?;
                    let update = dropped.matmul(&pair.a.t()?)?.matmul(&pair.b.t()?)?;
                    linear.forward(x)? + update.affine(scale, 0.0)?
                }
                None => linear.forward_lora(x, &pair.a, &pair.b, scale as f32),
            }
        };
        let with_bias = |y: Tensor, bias: &Option<Tensor>| match bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        };

        let h = b.attn_norm.forward(x)?;
        let q = with_bias(project(LoraTarget::Q, &h)?, &b.q_bias)?;
        let k = with_bias(project(LoraTarget::K, &h)?, &b.k_bias)?;
        let v = with_bias(project(LoraTarget::V, &h)?, &b.v_bias)?;
        let q = rope.forward_heads(&q, d.n_head)?;
        let k = rope.forward_heads(&k, d.n_head_kv)?;
        let v = v
            .reshape((t, d.n_head_kv, d.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;

        // Query heads that share a key/value head are stacked along the rows, so
        // grouped-query attention needs no copy of k and v.
        let group = d.n_head / d.n_head_kv;
        let q = q.reshape((d.n_head_kv, group * t, d.head_dim))?;
        let mixed = Attention {
            scale: 1.0 / (d.head_dim as f32).sqrt(),
        }
        .forward(&q, &k, &v)?;
        let x = (x + project(LoraTarget::O, &mixed)?)?;

        let h = b.ffn_norm.forward(&x)?;
        let gated = swiglu(
            &project(LoraTarget::Gate, &h)?,
            &project(LoraTarget::Up, &h)?,
        )?;
        x + project(LoraTarget::Down, &gated)?
    }
}

/// Cosine and sine of the rotary angles, `(t, head_dim / 2)`.
fn rope_tables(d: &ModelDims, t: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let half = d.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / d.rope_theta.powf(2.0 * i as f32 / d.head_dim as f32))
        .collect();
    let angles: Vec<f32> = (0..t)
        .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
        .collect();
    let angles = Tensor::from_vec(angles, (t, half), device)?;
    Ok((angles.cos()?, angles.sin()?))
}

fn read_dims(content: &Content) -> std::result::Result<ModelDims, String> {
    let meta = &content.metadata;
    let get = |key: &str| {
        meta.get(key)
            .ok_or_else(|| format!("metadata {key} is missing"))
    };
    let arch_name = get("general.architecture")?
        .to_string()
        .map_err(|e| e.to_string())?
        .clone();
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(format!(
                "architecture {other} cannot be trained; the trainer supports llama and qwen2"
            ))
        }
    };
    let int = |key: &str| -> std::result::Result<usize, String> {
        let key = format!("{arch_name}.{key}");
        let value = get(&key)?;
        let n = match value {
            Value::U64(_) | Value::I64(_) => value.to_u64().map_err(|e| e.to_string())?,
            _ => value.to_u32().map_err(|e| format!("{key}: {e}"))? as u64,
        };
        Ok(n as usize)
    };
    let float = |key: &str, default: f32| -> std::result::Result<f32, String> {
        match meta.get(&format!("{arch_name}.{key}")) {
            Some(v) => v.to_f32().map_err(|e| format!("{key}: {e}")),
            None => Ok(default),
        }
    };

    let n_embd = int("embedding_length")?;
    let n_head = int("attention.head_count")?;
    let n_head_kv = int("attention.head_count_kv").unwrap_or(n_head);
    let head_dim = int("attention.key_length").unwrap_or(n_embd / n_head.max(1));
    let n_vocab = match content.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims()[0],
        None => return Err("tensor token_embd.weight is missing".into()),
    };
    if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 || head_dim % 2 != 0 {
        return Err(format!(
            "head counts {n_head}/{n_head_kv} with head size {head_dim} do not form a valid attention"
        ));
    }
    Ok(ModelDims {
        arch,
        n_embd,
        n_layer: int("block_count")?,
        n_head,
        n_head_kv,
        head_dim,
        n_ff: int("feed_forward_length")?,
        n_vocab,
        rope_theta: float("rope.freq_base", 10_000.0)?,
        rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5)? as f64,
    })
}

/// Tiny random models written as real GGUF files, so tests run the same
/// loader and forward as the default model in milliseconds.
#[cfg(test)]
pub(crate) mod tiny {
    use std::path::Path;

    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::Arch;

    /// Sizes of the tiny model: 2 blocks, 64 wide, 4 query heads on 2 kv heads.
    pub(crate) const N_EMBD: usize = 64;
    pub(crate) const N_FF: usize = 96;
    pub(crate) const N_VOCAB: usize = 80;
    pub(crate) const N_HEAD: usize = 4;
    pub(crate) const N_HEAD_KV: usize = 2;
    pub(crate) const N_LAYER: usize = 2;

    /// Writes a random model of `arch` to `path`; matrices in Q4_1 like the default model.
    pub(crate) fn write(path: &Path, arch: Arch, seed: u64) {
        write_inner(path, arch, seed, false)
    }

    /// Like [`write`], with a NaN in the output norm so every loss is NaN.
    pub(crate) fn write_poisoned(path: &Path) {
        write_inner(path, Arch::Llama, 1, true)
    }

    fn write_inner(path: &Path, arch: Arch, seed: u64, poison: bool) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut random = |shape: &[usize], scale: f32| {
            let n = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let head_dim = N_EMBD / N_HEAD;
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut matrix = |name: String, shape: &[usize], dtype| {
            let t = random(shape, 0.5 / (shape[1] as f32).sqrt() * 3.0);
            tensors.push((name, QTensor::quantize(&t, dtype).unwrap()));
        };
        matrix(
            "token_embd.weight".into(),
            &[N_VOCAB, N_EMBD],
            GgmlDType::Q4_1,
        );
        for i in 0..N_LAYER {
            matrix(
                format!("blk.{i}.attn_q.weight"),
                &[N_EMBD, N_EMBD],
                GgmlDType::Q4_1,
            );
            matrix(
                format!("blk.{i}.attn_k.weight"),
                &[N_HEAD_KV * head_dim, N_EMBD],
                GgmlDType::Q4_1,
            );
            matrix(
                format!("blk.{i}.attn_v.weight"),
                &[N_HEAD_KV * head_dim, N_EMBD],
                GgmlDType::Q4_1,
            );
            matrix(
                format!("blk.{i}.attn_output.weight"),
                &[N_EMBD, N_EMBD],
                GgmlDType::Q4_1,
            );
            matrix(
                format!("blk.{i}.ffn_gate.weight"),
                &[N_FF, N_EMBD],
                GgmlDType::Q4_1,
            );
            matrix(
                format!("blk.{i}.ffn_up.weight"),
                &[N_FF, N_EMBD],
                GgmlDType::Q4_1,
            );
            // ffn_down's rows are N_FF = 96 wide: a multiple of Q4_1's block of 32.
            matrix(
                format!("blk.{i}.ffn_down.weight"),
                &[N_EMBD, N_FF],
                GgmlDType::Q4_1,
            );
        }
        let mut vector = |name: String, len: usize, center: f32, spread: f32| {
            let v: Vec<f32> = (0..len)
                .map(|_| center + rng.random_range(-spread..spread))
                .collect();
            let t = Tensor::from_vec(v, len, &Device::Cpu).unwrap();
            tensors.push((name, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
        };
        let norm_center = if poison { f32::NAN } else { 1.0 };
        vector("output_norm.weight".into(), N_EMBD, norm_center, 0.2);
        for i in 0..N_LAYER {
            vector(format!("blk.{i}.attn_norm.weight"), N_EMBD, 1.0, 0.2);
            vector(format!("blk.{i}.ffn_norm.weight"), N_EMBD, 1.0, 0.2);
            if arch == Arch::Qwen2 {
                vector(format!("blk.{i}.attn_q.bias"), N_EMBD, 0.0, 0.3);
                vector(
                    format!("blk.{i}.attn_k.bias"),
                    N_HEAD_KV * head_dim,
                    0.0,
                    0.3,
                );
                vector(
                    format!("blk.{i}.attn_v.bias"),
                    N_HEAD_KV * head_dim,
                    0.0,
                    0.3,
                );
            }
        }

        let name = match arch {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        };
        let key = |k: &str| format!("{name}.{k}");
        let metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(name.into())),
            (key("embedding_length"), Value::U32(N_EMBD as u32)),
            (key("block_count"), Value::U32(N_LAYER as u32)),
            (key("feed_forward_length"), Value::U32(N_FF as u32)),
            (key("attention.head_count"), Value::U32(N_HEAD as u32)),
            (key("attention.head_count_kv"), Value::U32(N_HEAD_KV as u32)),
            (key("rope.freq_base"), Value::F32(10_000.0)),
            (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ];
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::tiny::*;
    use super::*;

    /// Reads a tensor by name: its values and its shape.
    type TensorGetter<'a> = dyn FnMut(&str) -> (Vec<f32>, Vec<usize>) + 'a;

    /// A direct, loop-by-loop f32 decoder over dequantized weights, written
    /// independently of the tensor code above: the reference for parity.
    fn reference_logits(path: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
        let mut file = File::open(path).unwrap();
        let content = Content::read(&mut file).unwrap();
        let dims = read_dims(&content).unwrap();
        let mut get = |name: &str| -> (Vec<f32>, Vec<usize>) {
            let t = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            let t = t.dequantize(&Device::Cpu).unwrap();
            (
                t.flatten_all().unwrap().to_vec1().unwrap(),
                t.dims().to_vec(),
            )
        };
        let matvec = |(w, shape): &(Vec<f32>, Vec<usize>), x: &[f32]| -> Vec<f32> {
            (0..shape[0])
                .map(|r| (0..shape[1]).map(|c| w[r * shape[1] + c] * x[c]).sum())
                .collect()
        };
        let norm = |x: &[f32], w: &[f32]| -> Vec<f32> {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
            let inv = 1.0 / (ms + dims.rms_eps as f32).sqrt();
            x.iter().zip(w).map(|(v, w)| v * inv * w).collect()
        };
        let hd = dims.head_dim;
        let rotate = |v: &mut [f32], pos: usize| {
            for i in 0..hd / 2 {
                let angle = pos as f32 / dims.rope_theta.powf(2.0 * i as f32 / hd as f32);
                let (c, s) = (angle.cos(), angle.sin());
                let (a, b) = match dims.arch {
                    Arch::Llama => (2 * i, 2 * i + 1),
                    Arch::Qwen2 => (i, i + hd / 2),
                };
                let (x0, x1) = (v[a], v[b]);
                v[a] = x0 * c - x1 * s;
                v[b] = x0 * s + x1 * c;
            }
        };

        let (emb, emb_shape) = get("token_embd.weight");
        let n = dims.n_embd;
        let mut xs: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&id| emb[id as usize * n..(id as usize + 1) * n].to_vec())
            .collect();
        for l in 0..dims.n_layer {
            let attn_norm = get(&format!("blk.{l}.attn_norm.weight")).0;
            let ffn_norm = get(&format!("blk.{l}.ffn_norm.weight")).0;
            let wq = get(&format!("blk.{l}.attn_q.weight"));
            let wk = get(&format!("blk.{l}.attn_k.weight"));
            let wv = get(&format!("blk.{l}.attn_v.weight"));
            let wo = get(&format!("blk.{l}.attn_output.weight"));
            let wg = get(&format!("blk.{l}.ffn_gate.weight"));
            let wu = get(&format!("blk.{l}.ffn_up.weight"));
            let wd = get(&format!("blk.{l}.ffn_down.weight"));
            let bias = |name: &str, len: usize, get: &mut TensorGetter<'_>| {
                if dims.arch == Arch::Qwen2 {
                    get(&format!("blk.{l}.{name}.bias")).0
                } else {
                    vec![0.0; len]
                }
            };
            let bq = bias("attn_q", dims.n_head * hd, &mut get);
            let bk = bias("attn_k", dims.n_head_kv * hd, &mut get);
            let bv = bias("attn_v", dims.n_head_kv * hd, &mut get);

            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let h = norm(x, &attn_norm);
                let add = |y: Vec<f32>, b: &[f32]| {
                    y.iter().zip(b).map(|(y, b)| y + b).collect::<Vec<_>>()
                };
                let mut q = add(matvec(&wq, &h), &bq);
                let mut k = add(matvec(&wk, &h), &bk);
                for head in q.chunks_mut(hd) {
                    rotate(head, pos);
                }
                for head in k.chunks_mut(hd) {
                    rotate(head, pos);
                }
                qs.push(q);
                ks.push(k);
                vs.push(add(matvec(&wv, &h), &bv));
            }
            let group = dims.n_head / dims.n_head_kv;
            for pos in 0..xs.len() {
                let mut mixed = vec![0f32; dims.n_head * hd];
                for head in 0..dims.n_head {
                    let kv = head / group;
                    let q = &qs[pos][head * hd..(head + 1) * hd];
                    let scores: Vec<f32> = (0..=pos)
                        .map(|j| {
                            let k = &ks[j][kv * hd..(kv + 1) * hd];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f32 = exps.iter().sum();
                    for (j, e) in exps.iter().enumerate() {
                        for c in 0..hd {
                            mixed[head * hd + c] += e / sum * vs[j][kv * hd + c];
                        }
                    }
                }
                let o = matvec(&wo, &mixed);
                xs[pos].iter_mut().zip(&o).for_each(|(x, o)| *x += o);
                let h = norm(&xs[pos], &ffn_norm);
                let g = matvec(&wg, &h);
                let u = matvec(&wu, &h);
                let act: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let down = matvec(&wd, &act);
                xs[pos].iter_mut().zip(&down).for_each(|(x, d)| *x += d);
            }
        }
        let out_norm = get("output_norm.weight").0;
        let head = (emb, emb_shape);
        xs.iter()
            .map(|x| matvec(&head, &norm(x, &out_norm)))
            .collect()
    }

    fn parity(arch: Arch) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write(&path, arch, 3);
        let model = BaseModel::load(&path, &Device::Cpu).unwrap();
        assert_eq!(model.dims.arch, arch);
        let tokens: Vec<u32> = vec![1, 17, 42, 5, 79, 0, 33, 12, 64];
        let logits = model.logits(&tokens, 2, None).unwrap();
        assert_eq!(logits.dims(), &[tokens.len() - 2, N_VOCAB]);
        let got = logits.to_vec2::<f32>().unwrap();
        let want = reference_logits(&path, &tokens);
        for (row, want_row) in got.iter().zip(&want[2..]) {
            for (g, w) in row.iter().zip(want_row) {
                assert!((g - w).abs() < 1e-4, "{arch:?}: logit {g} vs reference {w}");
            }
        }
    }

    #[test]
    fn llama_forward_matches_a_loop_by_loop_reference() {
        parity(Arch::Llama);
    }

    #[test]
    fn qwen2_forward_with_biases_matches_a_loop_by_loop_reference() {
        parity(Arch::Qwen2);
    }

    #[test]
    fn unknown_architecture_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpt.gguf");
        let arch = Value::String("gpt2".into());
        let mut file = File::create(&path).unwrap();
        candle_core::quantized::gguf_file::write(
            &mut file,
            &[("general.architecture", &arch)],
            &[],
        )
        .unwrap();
        let err = BaseModel::load(&path, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("gpt2"), "{err}");
    }
}
