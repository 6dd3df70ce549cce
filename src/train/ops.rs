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
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, D,
};
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
        let out_shape = self.out_shape(layout)?;
        let rows = x.len() / self.n_in;
        let mut y = vec![0f32; rows * self.n_out];
        self.with_weight(|w| {
            matmul_into(
                &mut y,
                MatRef::new(x, rows, self.n_in),
                MatRef::new(w, self.n_out, self.n_in).t(),
                Accumulate::No,
                1.0,
                Threads::Pool,
            )
        })?;
        Ok((CpuStorage::F32(y), out_shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if !grad_res.device().is_cpu() {
            let rows = arg.elem_count() / self.n_in;
            let w = self.weight.to_f32(grad_res.device())?;
            let grad = grad_res.reshape((rows, self.n_out))?.matmul(&w)?;
            return Ok(Some(grad.reshape(arg.shape())?));
        }
        let rows = arg.elem_count() / self.n_in;
        let mut dx = vec![0f32; rows * self.n_in];
        with_f32(grad_res, self.name(), |dy| {
            self.with_weight(|w| {
                matmul_into(
                    &mut dx,
                    MatRef::new(dy, rows, self.n_out),
                    MatRef::new(w, self.n_out, self.n_in),
                    Accumulate::No,
                    1.0,
                    Threads::Pool,
                )
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

impl FrozenLinear {
    /// Runs `f` on the weight as f32 values `(n_out, n_in)`, dequantized into
    /// a temporary that lives only as long as the call.
    fn with_weight<R>(
        &self,
        f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let w = self.weight.to_f32(&Device::Cpu)?;
        with_f32(&w, "frozen weight", f)
    }

    /// The output shape for an input of `layout`: the last dimension becomes `n_out`.
    fn out_shape(&self, layout: &Layout) -> candle_core::Result<Shape> {
        let dims = layout.dims();
        if dims.last() != Some(&self.n_in) {
            bail!(
                "frozen-linear expects input width {}, got shape {dims:?}",
                self.n_in
            )
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("checked non-empty above") = self.n_out;
        Ok(Shape::from(out_dims))
    }

    /// `x W^T + scale * (x A^T) B^T`: the layer with a LoRA pair `a` `(r, n_in)`,
    /// `b` `(n_out, r)` added, as one op.
    ///
    /// On the CPU the op keeps nothing but its output: the backward pass
    /// recomputes the `(rows, r)` product `x A^T`, and the gradients of `x`, `a`
    /// and `b` come from five matrix products without a single intermediate the
    /// size of the output. Elsewhere it is the composition of the frozen layer and
    /// two plain matmuls, with the same values and gradients.
    pub(crate) fn forward_lora(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        scale: f32,
    ) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() {
            let op = LoraLinear {
                linear: self.clone(),
                scale,
            };
            x.contiguous()?
                .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
        } else {
            let update = x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
            self.forward(x)? + update.affine(scale as f64, 0.0)?
        }
    }
}

/// The CPU op behind [`FrozenLinear::forward_lora`].
#[derive(Debug, Clone)]
struct LoraLinear {
    linear: FrozenLinear,
    scale: f32,
}

impl LoraLinear {
    /// Rank of the pair, after checking `a` and `b` against the layer.
    fn rank(&self, a: &Layout, b: &Layout) -> candle_core::Result<usize> {
        let (n_out, n_in) = (self.linear.n_out, self.linear.n_in);
        match (a.dims(), b.dims()) {
            (&[r, a_in], &[b_out, r_b]) if a_in == n_in && b_out == n_out && r == r_b => Ok(r),
            (a, b) => bail!(
                "a LoRA pair for a {n_out}x{n_in} layer needs a (r, {n_in}) and b ({n_out}, r), got {a:?} and {b:?}"
            ),
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        a_storage: &CpuStorage,
        a_layout: &Layout,
        b_storage: &CpuStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n_out, n_in) = (self.linear.n_out, self.linear.n_in);
        let out_shape = self.linear.out_shape(x_layout)?;
        let r = self.rank(a_layout, b_layout)?;
        let x = contiguous_f32(x_storage, x_layout, self.name())?;
        let a = contiguous_f32(a_storage, a_layout, self.name())?;
        let b = contiguous_f32(b_storage, b_layout, self.name())?;
        let rows = x.len() / n_in;
        let x = MatRef::new(x, rows, n_in);

        let mut y = vec![0f32; rows * n_out];
        self.linear.with_weight(|w| {
            matmul_into(
                &mut y,
                x,
                MatRef::new(w, n_out, n_in).t(),
                Accumulate::No,
                1.0,
                Threads::Pool,
            )
        })?;
        let mut u = vec![0f32; rows * r];
        matmul_into(
            &mut u,
            x,
            MatRef::new(a, r, n_in).t(),
            Accumulate::No,
            1.0,
            Threads::One,
        )?;
        matmul_into(
            &mut y,
            MatRef::new(&u, rows, r),
            MatRef::new(b, n_out, r).t(),
            Accumulate::Yes,
            self.scale,
            Threads::One,
        )?;
        Ok((CpuStorage::F32(y), out_shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n_out, n_in) = (self.linear.n_out, self.linear.n_in);
        let (r, _) = a.dims2()?;
        let rows = x.elem_count() / n_in;
        let name = self.name();
        let (mut dx, mut da, mut db) = (
            vec![0f32; rows * n_in],
            vec![0f32; r * n_in],
            vec![0f32; n_out * r],
        );
        with_f32(grad_res, name, |dy| {
            with_f32(x, name, |x| {
                with_f32(a, name, |a| {
                    with_f32(b, name, |b| {
                        let dy = MatRef::new(dy, rows, n_out);
                        let x = MatRef::new(x, rows, n_in);
                        let a = MatRef::new(a, r, n_in);
                        let b = MatRef::new(b, n_out, r);
                        // dx = dy W + du A, with du = scale * dy B.
                        self.linear.with_weight(|w| {
                            matmul_into(
                                &mut dx,
                                dy,
                                MatRef::new(w, n_out, n_in),
                                Accumulate::No,
                                1.0,
                                Threads::Pool,
                            )
                        })?;
                        let mut du = vec![0f32; rows * r];
                        matmul_into(&mut du, dy, b, Accumulate::No, self.scale, Threads::One)?;
                        let du = MatRef::new(&du, rows, r);
                        matmul_into(&mut dx, du, a, Accumulate::Yes, 1.0, Threads::One)?;
                        // dA = du^T x; dB = scale * dy^T u, with u = x A^T recomputed.
                        matmul_into(&mut da, du.t(), x, Accumulate::No, 1.0, Threads::One)?;
                        let mut u = vec![0f32; rows * r];
                        matmul_into(&mut u, x, a.t(), Accumulate::No, 1.0, Threads::One)?;
                        matmul_into(
                            &mut db,
                            dy.t(),
                            MatRef::new(&u, rows, r),
                            Accumulate::No,
                            self.scale,
                            Threads::One,
                        )
                    })
                })
            })
        })?;
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(da, a.shape(), device)?),
            Some(Tensor::from_vec(db, b.shape(), device)?),
        ))
    }
}

/// Runs `f` on the f32 values of a CPU tensor, copying only if the tensor is
/// not contiguous.
pub(super) fn with_f32<R>(
    t: &Tensor,
    op: &'static str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("{op} runs its CPU kernel on a {:?} tensor", t.device())
    };
    f(contiguous_f32(cpu, layout, op)?)
}

/// A row-major f32 matrix, or the transpose of one, borrowed for a product.
#[derive(Debug, Clone, Copy)]
pub(super) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    /// Whether `data` holds the `(cols, rows)` matrix whose transpose this is.
    transposed: bool,
}

impl<'a> MatRef<'a> {
    /// The `(rows, cols)` matrix stored row by row in `data`.
    pub(super) fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    /// The transpose, without moving any value.
    pub(super) fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            transposed: !self.transposed,
            ..self
        }
    }

    /// Element strides `(row, column)` in `data`.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.rows as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// Whether a product overwrites its destination or adds to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Accumulate {
    No,
    Yes,
}

/// The threads a product may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Threads {
    /// Every thread of the current rayon pool (the trainer's own).
    Pool,
    /// The calling thread only: for the thin LoRA products, where waking other
    /// threads costs more than the arithmetic.
    One,
}

/// `dst = [dst +] scale * lhs rhs` for a row-major `dst` of `(lhs.rows, rhs.cols)`.
pub(super) fn matmul_into(
    dst: &mut [f32],
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    accumulate: Accumulate,
    scale: f32,
    threads: Threads,
) -> candle_core::Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst.len() != m * n || lhs.data.len() != m * k || rhs.data.len() != k * n {
        bail!(
            "matmul of {}x{} ({} values) by {}x{} ({} values) into {} values",
            lhs.rows,
            lhs.cols,
            lhs.data.len(),
            rhs.rows,
            rhs.cols,
            rhs.data.len(),
            dst.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if accumulate == Accumulate::No {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let parallelism = match threads {
        Threads::Pool if rayon::current_num_threads() > 1 => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => gemm::Parallelism::None,
    };
    let (lhs_rs, lhs_cs) = lhs.strides();
    let (rhs_rs, rhs_cs) = rhs.strides();
    // SAFETY: the lengths checked above hold every element the strides reach:
    // lhs (m, k), rhs (k, n) and dst (m, n), the last written through the only
    // mutable borrow.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate == Accumulate::Yes,
            lhs.data.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.data.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
    Ok(())
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
    fn lora_linear_matches_the_composed_layer_and_its_three_gradients() {
        let (n_out, n_in, r) = (48, 64, 4);
        let w = ramp(n_out * n_in, (n_out, n_in), 0);
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let w_deq = q.dequantize(&Device::Cpu).unwrap();
        let layer = FrozenLinear::new(FrozenWeight::Quantized(q)).unwrap();
        let x = Var::from_tensor(&ramp(2 * 7 * n_in, (2, 7, n_in), 1)).unwrap();
        let a = Var::from_tensor(&ramp(r * n_in, (r, n_in), 2)).unwrap();
        let b = Var::from_tensor(&ramp(n_out * r, (n_out, r), 3)).unwrap();
        let scale = 2.5;

        let y = layer.forward_lora(&x, &a, &b, scale).unwrap();
        let update = x
            .broadcast_matmul(&a.t().unwrap())
            .unwrap()
            .broadcast_matmul(&b.t().unwrap())
            .unwrap();
        let y_ref = (x.broadcast_matmul(&w_deq.t().unwrap()).unwrap()
            + update.affine(scale as f64, 0.0).unwrap())
        .unwrap();
        assert_eq!(y.dims(), &[2, 7, n_out]);
        assert!(max_abs_diff(&y, &y_ref) < 1e-4 * max_abs(&y_ref));

        let weights = ramp(y.elem_count(), y.shape(), 4);
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let g = loss(&y).backward().unwrap();
        let g_ref = loss(&y_ref).backward().unwrap();
        for (name, var) in [("x", &x), ("a", &a), ("b", &b)] {
            let (got, want) = (g.get(var).unwrap(), g_ref.get(var).unwrap());
            assert!(
                max_abs(want) > 0.0,
                "{name}: the reference gradient is zero"
            );
            assert!(
                max_abs_diff(got, want) < 1e-5 * max_abs(want),
                "gradient of {name} differs by {}",
                max_abs_diff(got, want)
            );
        }
    }

    #[test]
    fn matmul_into_handles_every_transpose_and_accumulates() {
        let (m, k, n) = (5, 3, 4);
        let lhs = ramp(m * k, (m, k), 0);
        let rhs = ramp(k * n, (k, n), 1);
        let want = lhs.matmul(&rhs).unwrap();
        let (lhs_v, rhs_v) = (values(&lhs), values(&rhs));
        let (lhs_t, rhs_t) = (values(&lhs.t().unwrap()), values(&rhs.t().unwrap()));
        let cases = [
            (MatRef::new(&lhs_v, m, k), MatRef::new(&rhs_v, k, n)),
            (MatRef::new(&lhs_t, k, m).t(), MatRef::new(&rhs_v, k, n)),
            (MatRef::new(&lhs_v, m, k), MatRef::new(&rhs_t, n, k).t()),
            (MatRef::new(&lhs_t, k, m).t(), MatRef::new(&rhs_t, n, k).t()),
        ];
        for (i, (l, r)) in cases.into_iter().enumerate() {
            let mut dst = vec![1f32; m * n];
            matmul_into(&mut dst, l, r, Accumulate::Yes, 2.0, Threads::Pool).unwrap();
            let got = Tensor::from_vec(dst, (m, n), &Device::Cpu).unwrap();
            let expected = (want.affine(2.0, 1.0)).unwrap();
            assert!(max_abs_diff(&got, &expected) < 1e-5, "case {i}");
        }
        let mut wrong = vec![0f32; m * n + 1];
        let err = matmul_into(
            &mut wrong,
            MatRef::new(&lhs_v, m, k),
            MatRef::new(&rhs_v, k, n),
            Accumulate::No,
            1.0,
            Threads::One,
        );
        assert!(
            err.is_err(),
            "a destination of the wrong size must be refused"
        );
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
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
