//! The trainable LoRA pairs: f32 variables `A (rank, n_in)` and `B (n_out, rank)`
//! for each adapted projection of each block, initialised as PEFT does.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::model::BaseModel;
use crate::adapter::{LoraPair, LoraTarget, LoraWeights};

/// One adapted projection.
#[derive(Debug)]
pub(crate) struct LoraParam {
    pub(crate) layer: usize,
    pub(crate) target: LoraTarget,
    pub(crate) a: Var,
    pub(crate) b: Var,
}

/// Every LoRA pair of a run, in layer-then-target order.
#[derive(Debug)]
pub(crate) struct LoraSet {
    pub(crate) rank: usize,
    pub(crate) alpha: f32,
    pub(crate) params: Vec<LoraParam>,
    index: HashMap<(usize, LoraTarget), usize>,
}

impl LoraSet {
    /// New pairs for `targets` of every block: `A` uniform in `±1/sqrt(n_in)`
    /// (PEFT's Kaiming-uniform bound), `B = 0`, so the adapter starts as a no-op.
    pub(crate) fn new(
        model: &BaseModel,
        rank: usize,
        alpha: f32,
        targets: &[LoraTarget],
        seed: u64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let mut targets = targets.to_vec();
        targets.sort();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = Vec::new();
        for layer in 0..model.dims.n_layer {
            for &target in &targets {
                let linear = model.linear(layer, target);
                let (n_in, n_out) = (linear.n_in(), linear.n_out());
                let bound = 1.0 / (n_in as f32).sqrt();
                let a: Vec<f32> = (0..rank * n_in)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                params.push(LoraParam {
                    layer,
                    target,
                    a: Var::from_vec(a, (rank, n_in), device)?,
                    b: Var::zeros((n_out, rank), candle_core::DType::F32, device)?,
                });
            }
        }
        Ok(Self::from_params(rank, alpha, params))
    }

    /// Pairs holding the values of an existing adapter, checked against `model`.
    pub(crate) fn from_weights(
        weights: &LoraWeights,
        model: &BaseModel,
        device: &Device,
    ) -> std::result::Result<Self, String> {
        let mut params = Vec::with_capacity(weights.pairs.len());
        for pair in &weights.pairs {
            if pair.layer >= model.dims.n_layer {
                return Err(format!("layer {} does not exist in this model", pair.layer));
            }
            let linear = model.linear(pair.layer, pair.target);
            let shape_ok = (pair.n_in, pair.n_out) == (linear.n_in(), linear.n_out())
                && pair.lora_a.len() == weights.rank * pair.n_in
                && pair.lora_b.len() == pair.n_out * weights.rank;
            if !shape_ok {
                return Err(format!(
                    "blk.{}.{} does not fit a {}x{} projection at rank {}",
                    pair.layer,
                    pair.target.gguf_name(),
                    linear.n_out(),
                    linear.n_in(),
                    weights.rank
                ));
            }
            let var = |v: &[f32], shape: (usize, usize)| {
                Var::from_slice(v, shape, device).map_err(|e| e.to_string())
            };
            params.push(LoraParam {
                layer: pair.layer,
                target: pair.target,
                a: var(&pair.lora_a, (weights.rank, pair.n_in))?,
                b: var(&pair.lora_b, (pair.n_out, weights.rank))?,
            });
        }
        Ok(Self::from_params(weights.rank, weights.alpha, params))
    }

    fn from_params(rank: usize, alpha: f32, params: Vec<LoraParam>) -> Self {
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| ((p.layer, p.target), i))
            .collect();
        LoraSet {
            rank,
            alpha,
            params,
            index,
        }
    }

    /// The scale applied to `B (A x)`: `alpha / rank`.
    pub(crate) fn scale(&self) -> f64 {
        self.alpha as f64 / self.rank as f64
    }

    /// The pair adapting `target` of block `layer`, if any.
    pub(crate) fn get(&self, layer: usize, target: LoraTarget) -> Option<&LoraParam> {
        self.index.get(&(layer, target)).map(|&i| &self.params[i])
    }

    /// Every variable, `A` then `B` for each pair, in a fixed order.
    pub(crate) fn vars(&self) -> Vec<&Var> {
        self.params.iter().flat_map(|p| [&p.a, &p.b]).collect()
    }

    /// A copy of the current values, in [`Self::vars`] order.
    pub(crate) fn snapshot(&self) -> candle_core::Result<Vec<Tensor>> {
        self.vars().iter().map(|v| v.as_tensor().copy()).collect()
    }

    /// Overwrites the values from a [`Self::snapshot`].
    pub(crate) fn restore(&self, values: &[Tensor]) -> candle_core::Result<()> {
        for (var, value) in self.vars().into_iter().zip(values) {
            var.set(value)?;
        }
        Ok(())
    }

    /// The adapter as plain f32 weights, from a snapshot (or the current values).
    pub(crate) fn to_weights(&self, values: Option<&[Tensor]>) -> candle_core::Result<LoraWeights> {
        let current;
        let values = match values {
            Some(v) => v,
            None => {
                current = self.snapshot()?;
                &current
            }
        };
        let pairs = self
            .params
            .iter()
            .zip(values.chunks(2))
            .map(|(p, ab)| {
                let (_, n_in) = ab[0].dims2()?;
                let (n_out, _) = ab[1].dims2()?;
                Ok(LoraPair {
                    layer: p.layer,
                    target: p.target,
                    n_in,
                    n_out,
                    lora_a: ab[0].flatten_all()?.to_vec1()?,
                    lora_b: ab[1].flatten_all()?.to_vec1()?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(LoraWeights {
            rank: self.rank,
            alpha: self.alpha,
            pairs,
        })
    }
}

/// Inverted dropout on the LoRA branch's input, with masks drawn from a seeded stream.
#[derive(Debug)]
pub(crate) struct Dropout {
    p: f32,
    rng: ChaCha8Rng,
}

impl Dropout {
    /// Dropout with probability `p`, masks drawn from `seed`.
    pub(crate) fn new(p: f32, seed: u64) -> Self {
        Dropout {
            p,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Whether any value is ever dropped (`p > 0`).
    pub(crate) fn is_active(&self) -> bool {
        self.p > 0.0
    }

    /// Applies dropout to `x` (a no-op when `p` is 0).
    pub(crate) fn apply(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if self.rng.random::<f32>() < self.p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }
}
