//! The NextQuill loss and its SFT baseline, on logits taken only at response
//! positions (row `t` predicts response token `t`).
//!
//! `L_n = sum_t w_t CE(with_t, y_t)` fits the preference-bearing tokens,
//! `L_p = mean_t CE(with_t - without_t, y_t)` aligns the model's effect of the
//! history with the data's, and the loss is `L_n + alpha L_p`. The token weights
//! are constants: no gradient flows through them. Gradients of `L_p` reach both
//! passes.

use candle_core::Tensor;

use super::config::LpReduction;
use super::ops::RowCrossEntropy;
use crate::error::{Error, Result};

/// NextQuill token weights from the probabilities of the labels, with and
/// without the history in the prompt.
///
/// A token is preference-bearing (`is_high`) when `p_with - p_without > delta`
/// (strictly); it gets raw weight `lambda`, the others `epsilon`, and the weights
/// are normalised to sum to 1. Returns `(weights, is_high)`, one entry a token.
/// The paper's defaults are `delta = 0.05`, `lambda = 0.9`, `epsilon = 0.1`.
pub fn nextquill_weights(
    p_with: &[f32],
    p_without: &[f32],
    delta: f32,
    lambda: f32,
    epsilon: f32,
) -> Result<(Vec<f32>, Vec<bool>)> {
    if p_with.len() != p_without.len() {
        return Err(Error::InvalidArgument {
            name: "p_without",
            reason: format!(
                "has {} probabilities but p_with has {}; pass one per response token to both",
                p_without.len(),
                p_with.len()
            ),
        });
    }
    if !(lambda > 0.0 && epsilon > 0.0) {
        return Err(Error::InvalidArgument {
            name: "lambda/epsilon",
            reason: format!("{lambda}/{epsilon}: both raw weights must be > 0"),
        });
    }

    let is_high: Vec<bool> = p_with
        .iter()
        .zip(p_without)
        .map(|(a, b)| a - b > delta)
        .collect();
    let raw: Vec<f64> = is_high
        .iter()
        .map(|&h| if h { lambda } else { epsilon } as f64)
        .collect();
    let total: f64 = raw.iter().sum();
    let weights = raw.iter().map(|w| (w / total) as f32).collect();
    Ok((weights, is_high))
}

/// Parameters of [`nextquill_loss`], split out of the objective.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NextQuillParams {
    pub(crate) alpha: f32,
    pub(crate) delta: f32,
    pub(crate) lambda: f32,
    pub(crate) epsilon: f32,
    pub(crate) lp: LpReduction,
}

/// The parts of one example's NextQuill loss. The trainer steps on `loss`;
/// the other parts are what the reference-vector tests check.
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct NextQuillTerms {
    /// `L_n + alpha L_p`, a scalar with a graph.
    pub(crate) loss: Tensor,
    /// The weighted cross-entropy term.
    pub(crate) l_n: Tensor,
    /// The logit-difference term.
    pub(crate) l_p: Tensor,
    /// Token weights used, 0 at ignored rows.
    pub(crate) weights: Vec<f32>,
    /// Which tokens counted as preference-bearing (false at ignored rows).
    pub(crate) is_high: Vec<bool>,
}

/// Cross-entropy of every row; `None` labels are ignored rows.
pub(crate) fn cross_entropy_rows(
    logits: &Tensor,
    labels: &[Option<u32>],
) -> candle_core::Result<Tensor> {
    RowCrossEntropy::new(labels).forward(logits)
}

/// Probability of each row's label under `logits`, without a graph (0 at ignored rows).
pub(crate) fn label_probabilities(
    logits: &Tensor,
    labels: &[Option<u32>],
) -> candle_core::Result<Vec<f32>> {
    let ce = cross_entropy_rows(&logits.detach(), labels)?.to_vec1::<f32>()?;
    Ok(ce
        .iter()
        .zip(labels)
        .map(|(ce, y)| if y.is_some() { (-ce).exp() } else { 0.0 })
        .collect())
}

/// The NextQuill loss of one example.
///
/// `fixed_weights`, when given, are used instead of the dynamic weights (one a
/// row; they are renormalised to sum to 1 over the non-ignored rows, so a
/// response cut to fit the memory budget keeps a proper weighting).
pub(crate) fn nextquill_loss(
    logits_with: &Tensor,
    logits_without: &Tensor,
    labels: &[Option<u32>],
    fixed_weights: Option<&[f32]>,
    params: NextQuillParams,
) -> Result<NextQuillTerms> {
    let tensor_err = |source| Error::Tensor {
        during: "computing the NextQuill loss",
        source,
    };
    let valid: Vec<usize> = (0..labels.len()).filter(|&t| labels[t].is_some()).collect();
    if valid.is_empty() {
        return Err(Error::InvalidArgument {
            name: "labels",
            reason: "every response token is ignored; give at least one".into(),
        });
    }

    let ce_with = cross_entropy_rows(logits_with, labels).map_err(tensor_err)?;
    let p_with = label_probabilities(logits_with, labels).map_err(tensor_err)?;
    let p_without = label_probabilities(logits_without, labels).map_err(tensor_err)?;
    let pick = |p: &[f32]| valid.iter().map(|&t| p[t]).collect::<Vec<_>>();
    let (dynamic, high) = nextquill_weights(
        &pick(&p_with),
        &pick(&p_without),
        params.delta,
        params.lambda,
        params.epsilon,
    )?;

    let mut weights = vec![0f32; labels.len()];
    let mut is_high = vec![false; labels.len()];
    for (i, &t) in valid.iter().enumerate() {
        is_high[t] = high[i];
        weights[t] = dynamic[i];
    }
    if let Some(fixed) = fixed_weights {
        if fixed.len() != labels.len() {
            return Err(Error::InvalidArgument {
                name: "fixed_weights",
                reason: format!(
                    "{} weights for {} response tokens",
                    fixed.len(),
                    labels.len()
                ),
            });
        }
        let total: f64 = valid.iter().map(|&t| fixed[t] as f64).sum();
        if !(total.is_finite() && total > 0.0) {
            return Err(Error::InvalidArgument {
                name: "fixed_weights",
                reason: format!("they sum to {total}; recompute them with the effect module"),
            });
        }
        for &t in &valid {
            weights[t] = (fixed[t] as f64 / total) as f32;
        }
    }

    let device = logits_with.device();
    let terms = || -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let w = Tensor::from_slice(&weights, labels.len(), device)?;
        let l_n = (&ce_with * &w)?.sum_all()?;
        let ce_diff = cross_entropy_rows(&(logits_with - logits_without)?, labels)?;
        let l_p = match params.lp {
            LpReduction::Mean => (ce_diff.sum_all()? / valid.len() as f64)?,
            LpReduction::Weighted => (&ce_diff * &w)?.sum_all()?,
        };
        let loss = (&l_n + l_p.affine(params.alpha as f64, 0.0)?)?;
        Ok((loss, l_n, l_p))
    };
    let (loss, l_n, l_p) = terms().map_err(tensor_err)?;
    Ok(NextQuillTerms {
        loss,
        l_n,
        l_p,
        weights,
        is_high,
    })
}

/// Mean cross-entropy over the non-ignored rows: the SFT baseline's loss.
pub(crate) fn sft_loss(logits_with: &Tensor, labels: &[Option<u32>]) -> Result<Tensor> {
    let n_valid = labels.iter().flatten().count();
    if n_valid == 0 {
        return Err(Error::InvalidArgument {
            name: "labels",
            reason: "every response token is ignored; give at least one".into(),
        });
    }
    cross_entropy_rows(logits_with, labels)
        .and_then(|ce| ce.sum_all()? / n_valid as f64)
        .map_err(|source| Error::Tensor {
            during: "computing the SFT loss",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use serde_json::Value;

    const VECTORS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/vectors/nextquill_loss_vectors.json"
    );

    fn matrix(v: &Value) -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    }

    fn numbers(v: &Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    fn var(m: &[Vec<f64>]) -> Var {
        let flat: Vec<f32> = m.iter().flatten().map(|&x| x as f32).collect();
        Var::from_vec(flat, (m.len(), m[0].len()), &Device::Cpu).unwrap()
    }

    fn assert_close(what: &str, case: &str, got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{case}: {what} length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= tol,
                "{case}: {what}[{i}] = {g}, expected {w}"
            );
        }
    }

    fn scalar(t: &Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn loss_reproduces_every_reference_case() {
        let text = std::fs::read_to_string(VECTORS).expect("shared loss vectors");
        let doc: Value = serde_json::from_str(&text).unwrap();
        let params = &doc["params"];
        let nq = NextQuillParams {
            alpha: params["alpha"].as_f64().unwrap() as f32,
            delta: params["threshold"].as_f64().unwrap() as f32,
            lambda: params["high_weight"].as_f64().unwrap() as f32,
            epsilon: params["low_weight"].as_f64().unwrap() as f32,
            lp: LpReduction::Mean,
        };
        let cases = doc["cases"].as_array().unwrap();
        assert!(cases.len() >= 4);

        for case in cases {
            let name = case["name"].as_str().unwrap();
            let a = var(&matrix(&case["logits_a"]));
            let b = var(&matrix(&case["logits_b"]));
            let labels: Vec<Option<u32>> = numbers(&case["labels"])
                .iter()
                .map(|&y| (y >= 0.0).then_some(y as u32))
                .collect();

            let terms = nextquill_loss(&a, &b, &labels, None, nq).unwrap();
            assert_close(
                "weights",
                name,
                &terms.weights,
                &numbers(&case["weights"]),
                1e-6,
            );
            let want_high: Vec<bool> = case["is_high"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_bool().unwrap())
                .collect();
            assert_eq!(terms.is_high, want_high, "{name}: is_high");
            assert_close(
                "L_n",
                name,
                &[scalar(&terms.l_n)],
                &[case["L_n"].as_f64().unwrap()],
                1e-6,
            );
            assert_close(
                "L_p",
                name,
                &[scalar(&terms.l_p)],
                &[case["L_p"].as_f64().unwrap()],
                1e-6,
            );
            assert_close(
                "loss",
                name,
                &[scalar(&terms.loss)],
                &[case["loss"].as_f64().unwrap()],
                1e-6,
            );

            let grads = terms.loss.backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want_a: Vec<f64> = matrix(&case["grad_loss_wrt_logits_a"]).concat();
            let want_b: Vec<f64> = matrix(&case["grad_loss_wrt_logits_b"]).concat();
            assert_close(
                "dloss/da",
                name,
                &flat(grads.get(&a).unwrap()),
                &want_a,
                1e-6,
            );
            assert_close(
                "dloss/db",
                name,
                &flat(grads.get(&b).unwrap()),
                &want_b,
                1e-6,
            );

            let sft = sft_loss(&a, &labels).unwrap();
            assert_close(
                "sft_loss",
                name,
                &[scalar(&sft)],
                &[case["sft_loss"].as_f64().unwrap()],
                1e-6,
            );
            let grads = sft.backward().unwrap();
            let want: Vec<f64> = matrix(&case["grad_sft_wrt_logits_a"]).concat();
            assert_close("dsft/da", name, &flat(grads.get(&a).unwrap()), &want, 1e-6);
        }
    }

    #[test]
    fn weights_follow_the_strict_threshold_and_sum_to_one() {
        let (w, high) =
            nextquill_weights(&[0.5, 0.28, 0.2], &[0.1, 0.25, 0.3], 0.05, 0.9, 0.1).unwrap();
        assert_eq!(high, vec![true, false, false]);
        assert_close(
            "weights",
            "tiny",
            &w,
            &[0.9 / 1.1, 0.1 / 1.1, 0.1 / 1.1],
            1e-7,
        );
        assert!(nextquill_weights(&[0.1], &[], 0.05, 0.9, 0.1).is_err());
    }

    #[test]
    fn weighted_lp_uses_the_token_weights() {
        let a = Var::from_vec(vec![2.0f32, 0.0, 0.0, 1.0], (2, 2), &Device::Cpu).unwrap();
        let b = Var::from_vec(vec![0.0f32, 0.0, 0.0, 0.0], (2, 2), &Device::Cpu).unwrap();
        let labels = [Some(0), Some(0)];
        let params = NextQuillParams {
            alpha: 1.0,
            delta: 0.05,
            lambda: 0.9,
            epsilon: 0.1,
            lp: LpReduction::Weighted,
        };
        let terms = nextquill_loss(&a, &b, &labels, Some(&[3.0, 1.0]), params).unwrap();
        // Fixed weights renormalise to 0.75 / 0.25; with b = 0 the diff CE equals the CE of a.
        let ce = |z0: f64, z1: f64| (z0.exp() + z1.exp()).ln() - z0;
        let want = 0.75 * ce(2.0, 0.0) + 0.25 * ce(0.0, 1.0);
        assert!((scalar(&terms.l_p) as f64 - want).abs() < 1e-6);
        assert!((scalar(&terms.l_n) as f64 - want).abs() < 1e-6);
    }
}
