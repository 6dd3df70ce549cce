//! The decoder's elementwise blocks as single differentiable ops: RMS norm,
//! rotary embedding and the SwiGLU gate.
//!
//! Composed from candle's basic ops, each of these keeps three to eight
//! intermediate tensors the size of its input alive until the backward pass,
//! and most of a training step's memory was those copies. As custom ops they
//! keep only their output (and their inputs, which the graph holds anyway),
//! and the backward pass recomputes what it needs from them. On the CPU they
//! run their own kernels; on Metal or CUDA they fall back to the composition
//! of basic ops, which gives the same values and gradients with the memory
//! cost above.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::model::Arch;
use super::ops::{contiguous_f32, with_f32, CausalSoftmax};

/// The f32 contents of a contiguous CPU tensor.
fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// RMS norm over the last dimension with a frozen weight:
/// `y = x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    values: Arc<[f32]>,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn new(weight: Tensor, eps: f64) -> candle_core::Result<Self> {
        let values = values(&weight)?.into();
        Ok(RmsNorm {
            weight,
            values,
            eps: eps as f32,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() {
            x.contiguous()?.apply_op1(self.clone())
        } else {
            rms_norm_composed(x, &self.weight, self.eps as f64)
        }
    }

    /// `1 / sqrt(mean(x^2) + eps)` of one row.
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let mean = row.iter().map(|&v| v * v).sum::<f32>() / row.len() as f32;
        1.0 / (mean + self.eps).sqrt()
    }
}

/// The basic-op RMS norm: the fallback off the CPU and the tests' reference.
pub(crate) fn rms_norm_composed(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let d = self.values.len();
        if layout.dims().last() != Some(&d) {
            bail!("rms-norm of width {d} got shape {:?}", layout.dims())
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            let inv = self.inv_rms(x);
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(self.values.iter()) {
                *y = x * inv * w;
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let d = self.values.len();
        let (x, g) = (values(arg)?, values(grad_res)?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(dx, (x, g))| {
                let inv = self.inv_rms(x);
                // d/dx_i of x_j * inv * w_j, summed against g_j.
                let dot: f32 = x
                    .iter()
                    .zip(g)
                    .zip(self.values.iter())
                    .map(|((&x, &g), &w)| x * g * w)
                    .sum();
                let k = inv * inv * inv * dot / d as f32;
                for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(self.values.iter()) {
                    *dx = inv * g * w - x * k;
                }
            });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Rotary position embedding of `(heads, t, head_dim)` with precomputed
/// angle tables `(t, head_dim / 2)`, in the pair layout of the architecture.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
    cos_values: Arc<[f32]>,
    sin_values: Arc<[f32]>,
    arch: Arch,
}

impl Rope {
    pub(crate) fn new(cos: Tensor, sin: Tensor, arch: Arch) -> candle_core::Result<Self> {
        Ok(Rope {
            cos_values: values(&cos)?.into(),
            sin_values: values(&sin)?.into(),
            cos,
            sin,
            arch,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() {
            x.contiguous()?.apply_op1(self.clone())
        } else {
            rope_composed(x, &self.cos, &self.sin, self.arch)
        }
    }

    /// Rotates every `(t, head_dim)` row block of `x` into `y` by the angles
    /// of its position; `sign = -1` rotates back (the backward pass).
    fn rotate(&self, x: &[f32], y: &mut [f32], t: usize, head_dim: usize, sign: f32) {
        y.par_chunks_mut(head_dim)
            .zip(x.par_chunks(head_dim))
            .enumerate()
            .for_each(|(row, (y, x))| self.rotate_row(x, y, row % t, sign));
    }

    /// Rotates one head's `x` at position `p` into `y`.
    fn rotate_row(&self, x: &[f32], y: &mut [f32], p: usize, sign: f32) {
        let half = x.len() / 2;
        let (cos, sin) = (
            &self.cos_values[p * half..(p + 1) * half],
            &self.sin_values[p * half..(p + 1) * half],
        );
        for i in 0..half {
            // Index pairs (first, second) of rotary pair i within a row.
            let (a, b) = match self.arch {
                Arch::Llama => (2 * i, 2 * i + 1),
                Arch::Qwen2 => (i, i + half),
            };
            let (c, s) = (cos[i], sign * sin[i]);
            y[a] = x[a] * c - x[b] * s;
            y[b] = x[a] * s + x[b] * c;
        }
    }

    /// Rotates a projection's output `(t, heads * head_dim)` straight into
    /// attention's layout `(heads, t, head_dim)`.
    ///
    /// One op instead of a transposed copy and a rotation: the copy would stay
    /// alive until the backward pass, for every layer.
    pub(crate) fn forward_heads(&self, x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        let (t, width) = x.dims2()?;
        if heads == 0 || width % heads != 0 {
            bail!("rope cannot split width {width} into {heads} heads")
        }
        if x.device().is_cpu() {
            x.contiguous()?.apply_op1(RopeHeads {
                rope: self.clone(),
                heads,
            })
        } else {
            let x = x.reshape((t, heads, width / heads))?.transpose(0, 1)?;
            self.forward(&x.contiguous()?)
        }
    }

    fn check(&self, dims: &[usize]) -> candle_core::Result<(usize, usize)> {
        let &[_, t, head_dim] = dims else {
            bail!("rope needs (heads, t, head_dim), got {dims:?}")
        };
        if head_dim % 2 != 0 || self.cos_values.len() != t * (head_dim / 2) {
            bail!(
                "rope tables of {} angles do not fit shape {dims:?}",
                self.cos_values.len()
            )
        }
        Ok((t, head_dim))
    }
}

/// The basic-op rotary embedding: the fallback off the CPU and the tests' reference.
pub(crate) fn rope_composed(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    arch: Arch,
) -> candle_core::Result<Tensor> {
    let (heads, t, head_dim) = x.dims3()?;
    let half = head_dim / 2;
    match arch {
        Arch::Llama => {
            let pairs = x.reshape((heads, t, half, 2))?;
            let (even, odd) = (pairs.narrow(3, 0, 1)?, pairs.narrow(3, 1, 1)?);
            let (cos, sin) = (cos.unsqueeze(2)?, sin.unsqueeze(2)?);
            let first = (even.broadcast_mul(&cos)? - odd.broadcast_mul(&sin)?)?;
            let second = (even.broadcast_mul(&sin)? + odd.broadcast_mul(&cos)?)?;
            Tensor::cat(&[first, second], 3)?.reshape((heads, t, head_dim))
        }
        Arch::Qwen2 => {
            let (low, high) = (x.narrow(2, 0, half)?, x.narrow(2, half, half)?);
            let first = (low.broadcast_mul(cos)? - high.broadcast_mul(sin)?)?;
            let second = (high.broadcast_mul(cos)? + low.broadcast_mul(sin)?)?;
            Tensor::cat(&[first, second], 2)
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let (t, head_dim) = self.check(layout.dims())?;
        let mut y = vec![0f32; x.len()];
        self.rotate(x, &mut y, t, head_dim, 1.0);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // A rotation's transpose is the rotation by the opposite angle.
        let (t, head_dim) = self.check(arg.dims())?;
        let g = values(grad_res)?;
        let mut dx = vec![0f32; g.len()];
        self.rotate(&g, &mut dx, t, head_dim, -1.0);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// The CPU op behind [`Rope::forward_heads`].
#[derive(Debug, Clone)]
struct RopeHeads {
    rope: Rope,
    heads: usize,
}

impl RopeHeads {
    /// `(t, head_dim)` of a token-major input of `dims`.
    fn check(&self, dims: &[usize]) -> candle_core::Result<(usize, usize)> {
        let &[t, width] = dims else {
            bail!("rope-heads needs (t, heads * head_dim), got {dims:?}")
        };
        let head_dim = width / self.heads;
        self.rope.check(&[self.heads, t, head_dim])?;
        Ok((t, head_dim))
    }
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let (t, head_dim) = self.check(layout.dims())?;
        let width = self.heads * head_dim;
        let mut y = vec![0f32; x.len()];
        // Output row `h * t + p` is head h of token p.
        y.par_chunks_mut(head_dim).enumerate().for_each(|(row, y)| {
            let (h, p) = (row / t, row % t);
            let x = &x[p * width + h * head_dim..][..head_dim];
            self.rope.rotate_row(x, y, p, 1.0);
        });
        Ok((CpuStorage::F32(y), Shape::from((self.heads, t, head_dim))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (t, head_dim) = self.check(arg.dims())?;
        let mut dx = vec![0f32; arg.elem_count()];
        with_f32(grad_res, self.name(), |g| {
            // Input row `p * heads + h` is head h of token p.
            dx.par_chunks_mut(head_dim)
                .enumerate()
                .for_each(|(row, dx)| {
                    let (p, h) = (row / self.heads, row % self.heads);
                    let g = &g[(h * t + p) * head_dim..][..head_dim];
                    self.rope.rotate_row(g, dx, p, -1.0);
                });
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `silu(gate) * up`, the feed-forward gate of LLaMA-family blocks.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.device().is_cpu() {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
    } else {
        gate.silu()? * up
    }
}

#[derive(Debug, Clone, Copy)]
struct SwiGlu;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if gate_layout.shape() != up_layout.shape() {
            bail!(
                "swiglu needs equal shapes, got {:?} and {:?}",
                gate_layout.dims(),
                up_layout.dims()
            )
        }
        let gate = contiguous_f32(gate, gate_layout, self.name())?;
        let up = contiguous_f32(up, up_layout, self.name())?;
        let y: Vec<f32> = gate
            .par_iter()
            .zip(up.par_iter())
            .map(|(&a, &u)| a * sigmoid(a) * u)
            .collect();
        Ok((CpuStorage::F32(y), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (a, u, g) = (values(gate)?, values(up)?, values(grad_res)?);
        let (d_gate, d_up): (Vec<f32>, Vec<f32>) = a
            .par_iter()
            .zip(u.par_iter().zip(g.par_iter()))
            .map(|(&a, (&u, &g))| {
                let s = sigmoid(a);
                let silu = a * s;
                (g * u * s * (1.0 + a * (1.0 - s)), g * silu)
            })
            .unzip();
        Ok((
            Some(Tensor::from_vec(d_gate, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(d_up, up.shape(), up.device())?),
        ))
    }
}

/// Causal grouped-query attention `softmax(scale * q k^T) v` that keeps no
/// score matrix for the backward pass.
///
/// `q` is `(kv_heads, group * t, head_dim)`, the query heads that share a
/// key/value head stacked along the rows (row `r` is position `r % t`); `k`
/// and `v` are `(kv_heads, t, head_dim)`. The two `rows x t` matrices (scores
/// and probabilities) are built for one layer at a time inside the op and
/// rebuilt in the backward pass from `q` and `k`: a little more arithmetic
/// instead of keeping `2 * heads * t^2` floats per layer for the whole step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attention {
    /// Multiplier applied to the scores before the softmax (`1 / sqrt(head_dim)`).
    pub(crate) scale: f32,
}

impl Attention {
    /// The heads' outputs side by side per token, `(t, heads * head_dim)`:
    /// the layout the output projection reads, so no transposed copy of them
    /// has to stay alive until the backward pass.
    pub(crate) fn forward(self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        if q.device().is_cpu() {
            q.contiguous()?
                .apply_op3(&k.contiguous()?, &v.contiguous()?, self)
        } else {
            let (kv_heads, rows, head_dim) = q.dims3()?;
            let t = k.dim(1)?;
            let heads = kv_heads * (rows / t);
            let probabilities = CausalSoftmax { scale: self.scale }.forward(&q.matmul(&k.t()?)?)?;
            probabilities
                .matmul(v)?
                .reshape((heads, t, head_dim))?
                .transpose(0, 1)?
                .reshape((t, heads * head_dim))
        }
    }

    /// The attention probabilities `(kv_heads, rows, t)`, from detached inputs.
    fn probabilities(self, q: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
        CausalSoftmax { scale: self.scale }.forward(&q.matmul(&k.t()?)?)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let tensor = |s: &CpuStorage, l: &Layout| -> candle_core::Result<Tensor> {
            let data = contiguous_f32(s, l, "attention")?;
            Tensor::from_slice(data, l.shape(), &candle_core::Device::Cpu)
        };
        let (q, k, v) = (
            tensor(q, q_layout)?,
            tensor(k, k_layout)?,
            tensor(v, v_layout)?,
        );
        let (heads, rows, head_dim) = q.dims3()?;
        let (k_heads, t, k_dim) = k.dims3()?;
        if heads != k_heads || head_dim != k_dim || v.dims() != k.dims() || rows % t != 0 {
            bail!(
                "attention got q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            )
        }
        let out = self.probabilities(&q, &k)?.matmul(&v)?;
        // `out` is `(heads, t, head_dim)`; row `p * heads + h` of the result is
        // head h of token p.
        let n_head = heads * (rows / t);
        let mut y = vec![0f32; out.elem_count()];
        with_f32(&out, "attention", |out| {
            y.par_chunks_mut(head_dim).enumerate().for_each(|(i, y)| {
                let (p, h) = (i / n_head, i % n_head);
                y.copy_from_slice(&out[(h * t + p) * head_dim..][..head_dim]);
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), Shape::from((t, n_head * head_dim))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (kv_heads, rows, head_dim) = q.dims3()?;
        let t = k.dim(1)?;
        let n_head = kv_heads * (rows / t);
        // Back from token-major `(t, heads * head_dim)` to `(kv_heads, rows, head_dim)`.
        let mut heads_major = vec![0f32; grad_res.elem_count()];
        with_f32(grad_res, "attention", |g| {
            heads_major
                .par_chunks_mut(head_dim)
                .enumerate()
                .for_each(|(i, row)| {
                    let (h, p) = (i / t, i % t);
                    row.copy_from_slice(&g[(p * n_head + h) * head_dim..][..head_dim]);
                });
            Ok(())
        })?;
        let grad = Tensor::from_vec(heads_major, (kv_heads, rows, head_dim), q.device())?;
        let p = self.probabilities(&q, &k)?;
        let d_v = p.t()?.matmul(&grad)?;
        let d_p = grad.matmul(&v.t()?)?;
        let d_scores = CausalSoftmax { scale: self.scale }
            .bwd(&p, &p, &d_p)?
            .expect("the softmax has an input gradient");
        let d_q = d_scores.matmul(&k)?;
        let d_k = d_scores.t()?.matmul(&q)?;
        Ok((Some(d_q), Some(d_k), Some(d_v)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::train::testing::{max_abs_diff, ramp};

    /// Values and input gradients (under a fixed random-looking upstream
    /// gradient) of `fused` and `composed` agree to `tol`.
    fn assert_same(inputs: &[&Var], fused: &Tensor, composed: &Tensor, tol: f32) {
        assert_eq!(fused.dims(), composed.dims());
        assert!(max_abs_diff(fused, composed) < tol, "values differ");
        let upstream = ramp(fused.elem_count(), fused.shape(), 5);
        let g = (fused * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (composed * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, x) in inputs.iter().enumerate() {
            let diff = max_abs_diff(g.get(x).unwrap(), g_ref.get(x).unwrap());
            assert!(diff < tol, "gradient of input {i} differs by {diff}");
        }
    }

    #[test]
    fn rms_norm_matches_the_basic_op_composition() {
        let x = Var::from_tensor(&ramp(4 * 3 * 16, (4, 3, 16), 0)).unwrap();
        let w = ramp(16, 16, 3);
        let norm = RmsNorm::new(w.clone(), 1e-5).unwrap();
        let fused = norm.forward(&x).unwrap();
        let composed = rms_norm_composed(&x, &w, 1e-5).unwrap();
        assert_same(&[&x], &fused, &composed, 1e-5);
    }

    #[test]
    fn rope_matches_the_basic_op_composition_for_both_pair_layouts() {
        let (heads, t, head_dim) = (3, 5, 8);
        let angles: Vec<f32> = (0..t * head_dim / 2).map(|i| i as f32 * 0.37).collect();
        let angles = Tensor::from_vec(angles, (t, head_dim / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        for arch in [Arch::Llama, Arch::Qwen2] {
            let x = Var::from_tensor(&ramp(heads * t * head_dim, (heads, t, head_dim), 1)).unwrap();
            let rope = Rope::new(cos.clone(), sin.clone(), arch).unwrap();
            let fused = rope.forward(&x).unwrap();
            let composed = rope_composed(&x, &cos, &sin, arch).unwrap();
            assert_same(&[&x], &fused, &composed, 1e-5);
        }
    }

    #[test]
    fn rope_into_heads_matches_a_transpose_then_rope() {
        let (heads, t, head_dim) = (3, 5, 8);
        let angles: Vec<f32> = (0..t * head_dim / 2).map(|i| i as f32 * 0.37).collect();
        let angles = Tensor::from_vec(angles, (t, head_dim / 2), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        for arch in [Arch::Llama, Arch::Qwen2] {
            let x =
                Var::from_tensor(&ramp(t * heads * head_dim, (t, heads * head_dim), 2)).unwrap();
            let rope = Rope::new(cos.clone(), sin.clone(), arch).unwrap();
            let fused = rope.forward_heads(&x, heads).unwrap();
            let by_heads = x
                .reshape((t, heads, head_dim))
                .unwrap()
                .transpose(0, 1)
                .unwrap();
            let composed = rope_composed(&by_heads, &cos, &sin, arch).unwrap();
            assert_same(&[&x], &fused, &composed, 1e-5);
        }
    }

    #[test]
    fn swiglu_matches_the_basic_op_composition() {
        let gate = Var::from_tensor(&ramp(6 * 10, (6, 10), 2)).unwrap();
        let up = Var::from_tensor(&ramp(6 * 10, (6, 10), 7)).unwrap();
        let fused = swiglu(&gate, &up).unwrap();
        let composed = (gate.silu().unwrap() * up.as_tensor()).unwrap();
        assert_same(&[&gate, &up], &fused, &composed, 1e-5);
    }

    #[test]
    fn attention_matches_the_softmax_and_matmul_composition() {
        let (kv_heads, group, t, head_dim) = (2, 3, 5, 4);
        let q = Var::from_tensor(&ramp(
            kv_heads * group * t * head_dim,
            (kv_heads, group * t, head_dim),
            1,
        ))
        .unwrap();
        let k =
            Var::from_tensor(&ramp(kv_heads * t * head_dim, (kv_heads, t, head_dim), 4)).unwrap();
        let v =
            Var::from_tensor(&ramp(kv_heads * t * head_dim, (kv_heads, t, head_dim), 9)).unwrap();
        let op = Attention { scale: 0.5 };
        let fused = op.forward(&q, &k, &v).unwrap();
        let composed = CausalSoftmax { scale: 0.5 }
            .forward(&q.matmul(&k.t().unwrap()).unwrap())
            .unwrap()
            .matmul(&v)
            .unwrap()
            .reshape((kv_heads * group, t, head_dim))
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .reshape((t, kv_heads * group * head_dim))
            .unwrap();
        assert_same(&[&q, &k, &v], &fused, &composed, 1e-5);
    }
}
