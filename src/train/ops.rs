//! Differentiable operations that candle either lacks or differentiates
//! wastefully: a matmul against a frozen (quantized) weight, a causal softmax
//! and a per-row cross-entropy.
//!
//! Each is a candle custom op with its own backward pass. On the CPU they run
//! their own kernels; on other devices (the `metal` and `cuda` features) they
//! fall back to candle's basic differentiable ops on that device, which give the
//! same values and gradients but keep more intermediate tensors alive.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::QTensor;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// The rows of a contiguous f32 CPU tensor, or an error naming the op.
pub(super) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op} needs f32 input, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op} needs a contiguous input"),
    }
}

/// A frozen weight matrix `(n_out, n_in)` as it is kept in memory.
#[derive(Debug)]
pub(crate) enum FrozenWeight {
    /// Kept in its GGUF quantization; dequantized for the length of one matmul.
    Quantized(QTensor),
    /// Already f32 (the tied token embedding, which the embedding lookup needs anyway).
    Dense(Tensor),
}

impl FrozenWeight {
    fn to_f32(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Quantized(q) => q.dequantize(device),
            FrozenWeight::Dense(t) => t.to_device(device),
        }
    }
}

/// `y = x W^T` for a frozen `W`, whose backward pass returns only `dL/dx`.
///
/// candle's own `QMatMul` has no backward pass (the graph is silently cut), and
/// a plain matmul against a dequantized copy would also compute, and hold until
/// the end of the backward pass, a gradient for every frozen matrix. On the CPU
/// this op dequantizes `W` into a temporary for the forward product and again
/// for the backward product, so only the quantized bytes stay resident. On
/// Metal or CUDA it dequantizes on that device and runs a plain matmul on the
/// detached copy: correct, but its backward pass computes the unused weight
/// gradient as well.
#[derive(Debug, Clone)]
pub(crate) struct FrozenLinear {
    weight: Arc<FrozenWeight>,
    n_out: usize,
    n_in: usize,
}

impl FrozenLinear {
    pub(crate) fn new(weight: FrozenWeight) -> candle_core::Result<Self> {
        let dims = match &weight {
            FrozenWeight::Quantized(q) => q.shape().dims().to_vec(),
            FrozenWeight::Dense(t) => t.dims().to_vec(),
        };
        let [n_out, n_in] = dims[..] else {
            bail!("a linear weight must be 2-d, got shape {dims:?}")
        };
        Ok(FrozenLinear {
            weight: Arc::new(weight),
            n_out,
            n_in,
        })
    }

    /// Output width.
    pub(crate) fn n_out(&self) -> usize {
        self.n_out
    }

    /// Input width.
    pub(crate) fn n_in(&self) -> usize {
        self.n_in
    }

    /// Applies the layer to `x` of shape `(.., n_in)`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() {
            x.apply_op1(self.clone())
        } else {
            let w = self.weight.to_f32(x.device())?.detach();
            x.broadcast_matmul(&w.t()?)
        }
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let dims = layout.dims();
        if dims.last() != Some(&self.n_in) {
            bail!(
                "frozen-linear expects input width {}, got shape {dims:?}",
                self.n_in
            )
        }
        let rows = x.len() / self.n_in;

        let x = Tensor::from_slice(x, (rows, self.n_in), &Device::Cpu)?;
        let w = self.weight.to_f32(&Device::Cpu)?;
        let y = x.matmul(&w.t()?)?;

        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked non-empty above") = self.n_out;
        Ok((
            CpuStorage::F32(y.flatten_all()?.to_vec1()?),
            Shape::from(out_dims),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let rows = arg.elem_count() / self.n_in;
        let w = self.weight.to_f32(grad_res.device())?;
        let grad = grad_res.reshape((rows, self.n_out))?.matmul(&w)?;
        Ok(Some(grad.reshape(arg.shape())?))
    }
}

/// Row-wise softmax of `scale * scores` under a causal mask, for grouped heads.
///
/// `scores` is `(groups, rows, q_len)` where row `r` belongs to the query at
/// position `r % q_len` and may attend to key positions `0..=r % q_len`. The op
/// keeps only its output for the backward pass, instead of the four
/// intermediate tensors a composition of basic ops would keep.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CausalSoftmax {
    /// Multiplier applied to the scores before the softmax (`1 / sqrt(head_dim)`).
    pub(crate) scale: f32,
}

impl CausalSoftmax {
    /// Applies the op to `scores` of shape `(groups, rows, q_len)`.
    pub(crate) fn forward(self, scores: &Tensor) -> candle_core::Result<Tensor> {
        if scores.device().is_cpu() {
            return scores.apply_op1(self);
        }
        let (_, rows, q_len) = scores.dims3()?;
        let mask: Vec<f32> = (0..rows)
            .flat_map(|r| {
                (0..q_len).map(move |k| {
                    if k <= r % q_len {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (rows, q_len), scores.device())?;
        let z = scores
            .affine(self.scale as f64, 0.0)?
            .broadcast_add(&mask)?;
        let z = z
            .broadcast_sub(&z.max_keepdim(D::Minus1)?.detach())?
            .exp()?;
        z.broadcast_div(&z.sum_keepdim(D::Minus1)?)
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let scores = contiguous_f32(storage, layout, self.name())?;
        let (_, rows, q_len) = layout.shape().dims3()?;
        if rows % q_len != 0 {
            bail!("causal-softmax needs whole query groups, got {rows} rows of {q_len} keys")
        }
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(q_len)
            .zip(scores.par_chunks(q_len))
            .enumerate()
            .for_each(|(row, (y, s))| {
                let visible = row % q_len + 1;
                let max = s[..visible]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &v| m.max(v * self.scale));
                let mut sum = 0f32;
                for (y, &s) in y[..visible].iter_mut().zip(&s[..visible]) {
                    *y = (s * self.scale - max).exp();
                    sum += *y;
                }
                let inv = 1.0 / sum;
                y[..visible].iter_mut().for_each(|y| *y *= inv);
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let y = res.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let q_len = res.dim(D::Minus1)?;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(q_len)
            .zip(y.par_chunks(q_len).zip(g.par_chunks(q_len)))
            .for_each(|(dx, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = self.scale * y * (g - dot);
                }
            });
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// Cross-entropy `logsumexp(z) - z[label]` of every row of `(rows, vocab)`
/// logits, in natural log; rows whose label is `None` give 0 and no gradient.
///
/// On the CPU the log-sum-exp is accumulated in f64 and the backward pass
/// recomputes the softmax from the logits, so nothing of size `rows x vocab`
/// is kept beyond the logits themselves.
#[derive(Debug, Clone)]
pub(crate) struct RowCrossEntropy {
    labels: Arc<[Option<u32>]>,
}

impl RowCrossEntropy {
    pub(crate) fn new(labels: &[Option<u32>]) -> Self {
        RowCrossEntropy {
            labels: labels.into(),
        }
    }

    /// Per-row cross-entropy `(rows,)` of `logits` `(rows, vocab)`.
    pub(crate) fn forward(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, vocab) = logits.dims2()?;
        if rows != self.labels.len() {
            bail!(
                "cross-entropy got {rows} rows of logits for {} labels",
                self.labels.len()
            )
        }
        if let Some(bad) = self.labels.iter().flatten().find(|&&y| y as usize >= vocab) {
            bail!("label {bad} is outside the vocabulary of {vocab} tokens")
        }
        if logits.device().is_cpu() {
            return logits.contiguous()?.apply_op1(self.clone());
        }
        let index: Vec<u32> = self.labels.iter().map(|y| y.unwrap_or(0)).collect();
        let keep: Vec<f32> = self.labels.iter().map(|y| y.map_or(0.0, |_| 1.0)).collect();
        let index = Tensor::from_vec(index, (rows, 1), logits.device())?;
        let keep = Tensor::from_vec(keep, rows, logits.device())?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let picked = shifted.gather(&index, D::Minus1)?;
        (lse - picked)?.squeeze(D::Minus1)?.mul(&keep)
    }
}

impl CustomOp1 for RowCrossEntropy {
    fn name(&self) -> &'static str {
        "row-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let logits = contiguous_f32(storage, layout, self.name())?;
        let (rows, vocab) = layout.shape().dims2()?;
        let ce: Vec<f32> = logits
            .par_chunks(vocab)
            .zip(self.labels.par_iter())
            .map(|(z, label)| match label {
                Some(y) => (log_sum_exp(z) - z[*y as usize] as f64) as f32,
                None => 0.0,
            })
            .collect();
        Ok((CpuStorage::F32(ce), Shape::from(rows)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, vocab) = arg.dims2()?;
        let logits = arg.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let mut grad = vec![0f32; logits.len()];
        grad.par_chunks_mut(vocab)
            .zip(logits.par_chunks(vocab))
            .zip(self.labels.par_iter().zip(g.par_iter()))
            .for_each(|((dz, z), (label, &g))| {
                let Some(y) = label else { return };
                let lse = log_sum_exp(z);
                for (dz, &z) in dz.iter_mut().zip(z) {
                    *dz = g * ((z as f64 - lse).exp() as f32);
                }
                dz[*y as usize] -= g;
            });
        Ok(Some(Tensor::from_vec(grad, arg.shape(), arg.device())?))
    }
}

/// `log(sum(exp(z)))` accumulated in f64.
fn log_sum_exp(z: &[f32]) -> f64 {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = z.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::testing::{max_abs, max_abs_diff, ramp};
    use candle_core::quantized::GgmlDType;
    use candle_core::Var;

    #[test]
    fn frozen_linear_matches_plain_matmul_and_its_input_gradient() {
        let w = ramp(64 * 32, (32, 64), 0);
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let w_deq = q.dequantize(&Device::Cpu).unwrap();
        let layer = FrozenLinear::new(FrozenWeight::Quantized(q)).unwrap();
        let x = Var::from_tensor(&ramp(3 * 5 * 64, (3, 5, 64), 0)).unwrap();

        let y = layer.forward(&x).unwrap();
        let y_ref = x.broadcast_matmul(&w_deq.t().unwrap()).unwrap();
        assert_eq!(y.dims(), &[3, 5, 32]);
        assert!(max_abs_diff(&y, &y_ref) < 1e-4);

        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = y_ref.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (gx, gx_ref) = (g.get(&x).unwrap(), g_ref.get(&x).unwrap());
        let scale = max_abs(gx_ref);
        assert!(
            max_abs_diff(gx, gx_ref) < 1e-5 * scale,
            "input gradients differ"
        );
    }

    #[test]
    fn causal_softmax_matches_the_basic_op_composition() {
        let (groups, rep, q_len) = (2, 3, 5);
        let scores = Var::from_tensor(&ramp(
            groups * rep * q_len * q_len,
            (groups, rep * q_len, q_len),
            0,
        ))
        .unwrap();
        let op = CausalSoftmax { scale: 0.7 };
        let y = op.forward(&scores).unwrap();

        let mask: Vec<f32> = (0..rep * q_len)
            .flat_map(|r| {
                (0..q_len).map(move |k| {
                    if k <= r % q_len {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (rep * q_len, q_len), &Device::Cpu).unwrap();
        let z = scores
            .affine(0.7, 0.0)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let z = z.exp().unwrap();
        let y_ref = z.broadcast_div(&z.sum_keepdim(D::Minus1).unwrap()).unwrap();
        assert!(max_abs_diff(&y, &y_ref) < 1e-6);

        let weights = ramp(y.elem_count(), y.shape(), 0);
        let g = (&y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (&y_ref * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_abs_diff(g.get(&scores).unwrap(), g_ref.get(&scores).unwrap()) < 1e-6);
    }
}
