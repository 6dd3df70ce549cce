//! Tensors and comparisons the train module's unit tests share.

use candle_core::{Device, Shape, Tensor};

/// A deterministic tensor of values in about [-1.6, 1.6]; `salt` shifts the pattern.
pub(crate) fn ramp(n: usize, shape: impl Into<Shape>, salt: usize) -> Tensor {
    let v: Vec<f32> = (0..n)
        .map(|i| (((i + salt) * 37 % 23) as f32 - 11.0) / 7.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The largest absolute value of `t`.
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The largest absolute difference between `a` and `b`.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}
