//! Hyper-parameters of a training run, with their defaults and the checks
//! that refuse a run before it wastes minutes of CPU.

use std::path::PathBuf;

use crate::adapter::LoraTarget;
use crate::error::{Error, Result};

/// Where the NextQuill token weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightSource {
    /// Recomputed at every step from the two passes of the model being trained
    /// (what the authors' code does). Default.
    Dynamic,
    /// Taken from [`TrainExample::fixed_weights`](super::TrainExample::fixed_weights),
    /// precomputed once with the frozen base model by the effect module.
    Fixed,
}

/// How the logit-difference term `L_p` averages over response tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LpReduction {
    /// Plain mean over response tokens, as in the authors' code. Default.
    Mean,
    /// Weighted by the NextQuill token weights, as in the paper's Eq. 7.
    Weighted,
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// `L_n + alpha * L_p` with preference-bearing tokens weighted up.
    NextQuill {
        /// Weight of `L_p` in the total loss. Default 0.1.
        alpha: f32,
        /// Probability gain above which a token is preference-bearing. Default 0.05.
        delta: f32,
        /// Raw weight of preference-bearing tokens. Default 0.9.
        lambda: f32,
        /// Raw weight of the other tokens. Default 0.1.
        epsilon: f32,
        /// Where the token weights come from. Default [`WeightSource::Dynamic`].
        weights: WeightSource,
        /// How `L_p` is averaged. Default [`LpReduction::Mean`].
        lp: LpReduction,
    },
    /// Mean cross-entropy on the response with the history in the prompt (the baseline).
    Sft,
}

impl Objective {
    /// NextQuill with the paper's and the authors' code's defaults.
    pub fn nextquill() -> Objective {
        Objective::NextQuill {
            alpha: 0.1,
            delta: 0.05,
            lambda: 0.9,
            epsilon: 0.1,
            weights: WeightSource::Dynamic,
            lp: LpReduction::Mean,
        }
    }

    fn validate(&self) -> Result<()> {
        let Objective::NextQuill {
            alpha,
            delta,
            lambda,
            epsilon,
            ..
        } = *self
        else {
            return Ok(());
        };
        if !(alpha.is_finite() && alpha >= 0.0) {
            return Err(invalid(
                "objective.alpha",
                format!("{alpha} must be finite and >= 0"),
            ));
        }
        if !(delta.is_finite() && delta > -1.0 && delta < 1.0) {
            return Err(invalid(
                "objective.delta",
                format!("{delta} is a probability gain and must lie in (-1, 1)"),
            ));
        }
        for (name, w) in [("objective.lambda", lambda), ("objective.epsilon", epsilon)] {
            if !(w.is_finite() && w > 0.0) {
                return Err(invalid(name, format!("{w} must be finite and > 0")));
            }
        }
        Ok(())
    }
}

impl Default for Objective {
    fn default() -> Self {
        Objective::nextquill()
    }
}

/// The LoRA adapter's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of every pair. Default 8.
    pub rank: usize,
    /// Scaling numerator: updates are scaled by `alpha / rank`. Default 16.
    pub alpha: f32,
    /// Dropout probability on the LoRA branch's input, in [0, 1). Default 0 (PEFT's default).
    pub dropout: f32,
    /// Projections to adapt in every block. Default q and v.
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![LoraTarget::Q, LoraTarget::V],
        }
    }
}

/// How the learning rate moves after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrSchedule {
    /// Linear decay to 0 at the last optimizer step. Default.
    LinearDecay,
    /// Stays at the peak rate.
    Constant,
}

/// What to do when the checkpoint folder already holds a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumePolicy {
    /// Continue from it (the run must use the same examples and config). Default.
    Resume,
    /// Ignore it and overwrite it with the new run's checkpoints.
    StartOver,
}

/// Periodic checkpoints of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointConfig {
    /// Folder that holds `checkpoint.safetensors`; created if missing.
    pub dir: PathBuf,
    /// Optimizer steps between checkpoints. Default 50.
    pub every_steps: usize,
    /// Whether an existing checkpoint is resumed. Default [`ResumePolicy::Resume`].
    pub resume: ResumePolicy,
}

impl CheckpointConfig {
    /// A checkpoint every 50 steps into `dir`, resuming what is there.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CheckpointConfig {
            dir: dir.into(),
            every_steps: 50,
            resume: ResumePolicy::Resume,
        }
    }
}

/// Everything a training run needs besides the model and the examples.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Loss to minimise. Default NextQuill with the paper's parameters.
    pub objective: Objective,
    /// Adapter shape. Default rank 8, alpha 16, q and v.
    pub lora: LoraConfig,
    /// Peak AdamW learning rate. Default 2e-4.
    pub learning_rate: f64,
    /// Optimizer steps of linear warmup from 0 to the peak rate. Default 10.
    pub warmup_steps: usize,
    /// Rate after warmup. Default [`LrSchedule::LinearDecay`].
    pub schedule: LrSchedule,
    /// AdamW decoupled weight decay. Default 0 (the Hugging Face trainer's default).
    pub weight_decay: f64,
    /// Global L2 norm the adapter gradient is clipped to; `None` disables clipping. Default 1.0.
    pub max_grad_norm: Option<f32>,
    /// Examples whose gradients are summed before one optimizer step. Default 1.
    pub accumulation_steps: usize,
    /// Passes over the training examples. Default 1.
    pub epochs: usize,
    /// Seed of the adapter initialisation, the shuffling and the dropout masks. Default 42.
    pub seed: u64,
    /// CPU threads of the matrix kernels. Default 2.
    pub threads: usize,
    /// Periodic checkpoints; `None` writes none. Default `None`.
    pub checkpoint: Option<CheckpointConfig>,
    /// Memory the run may use, in bytes, by [`Trainer::estimated_step_bytes`](super::Trainer::estimated_step_bytes);
    /// caps the tokens of one step. Default 6 GB (a NextQuill step with a
    /// 600-token history prompt and a 100-token response estimates about 1.5 GB).
    pub memory_budget_bytes: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            objective: Objective::default(),
            lora: LoraConfig::default(),
            learning_rate: 2e-4,
            warmup_steps: 10,
            schedule: LrSchedule::LinearDecay,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            accumulation_steps: 1,
            epochs: 1,
            seed: 42,
            threads: 2,
            checkpoint: None,
            memory_budget_bytes: 6_000_000_000,
        }
    }
}

impl TrainConfig {
    /// Refuses values that would make a run fail late or train nothing.
    pub fn validate(&self) -> Result<()> {
        self.objective.validate()?;

        let lora = &self.lora;
        if lora.rank == 0 || lora.rank > 256 {
            return Err(invalid(
                "lora.rank",
                format!("{} must be in 1..=256", lora.rank),
            ));
        }
        if !(lora.alpha.is_finite() && lora.alpha > 0.0) {
            return Err(invalid(
                "lora.alpha",
                format!("{} must be finite and > 0", lora.alpha),
            ));
        }
        if !(lora.dropout >= 0.0 && lora.dropout < 1.0) {
            return Err(invalid(
                "lora.dropout",
                format!("{} must be in [0, 1)", lora.dropout),
            ));
        }
        if lora.targets.is_empty() {
            return Err(invalid(
                "lora.targets",
                "name at least one projection, e.g. q,v".into(),
            ));
        }
        let mut targets = lora.targets.clone();
        targets.sort();
        targets.dedup();
        if targets.len() != lora.targets.len() {
            return Err(invalid(
                "lora.targets",
                "a projection is listed twice".into(),
            ));
        }

        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(invalid(
                "learning_rate",
                format!("{} must be finite and > 0", self.learning_rate),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid(
                "weight_decay",
                format!("{} must be >= 0", self.weight_decay),
            ));
        }
        if let Some(norm) = self.max_grad_norm {
            if !(norm.is_finite() && norm > 0.0) {
                return Err(invalid(
                    "max_grad_norm",
                    format!("{norm} must be finite and > 0"),
                ));
            }
        }
        for (name, value) in [
            ("accumulation_steps", self.accumulation_steps),
            ("epochs", self.epochs),
            ("threads", self.threads),
        ] {
            if value == 0 {
                return Err(invalid(name, "must be at least 1".into()));
            }
        }
        if let Some(checkpoint) = &self.checkpoint {
            if checkpoint.every_steps == 0 {
                return Err(invalid(
                    "checkpoint.every_steps",
                    "must be at least 1".into(),
                ));
            }
        }
        if self.memory_budget_bytes < 64 << 20 {
            return Err(invalid(
                "memory_budget_bytes",
                format!(
                    "{} bytes cannot hold a model; give at least 64 MiB",
                    self.memory_budget_bytes
                ),
            ));
        }
        Ok(())
    }
}

fn invalid(name: &'static str, reason: String) -> Error {
    Error::InvalidArgument { name, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_match_the_paper() {
        let config = TrainConfig::default();
        config.validate().unwrap();
        assert_eq!(config.lora.rank, 8);
        assert_eq!(config.lora.targets, vec![LoraTarget::Q, LoraTarget::V]);
        let Objective::NextQuill {
            alpha,
            delta,
            lambda,
            epsilon,
            ..
        } = config.objective
        else {
            panic!("default objective is not NextQuill");
        };
        assert_eq!((alpha, delta, lambda, epsilon), (0.1, 0.05, 0.9, 0.1));
    }

    #[test]
    fn bad_values_are_refused_with_their_name() {
        let mut config = TrainConfig::default();
        config.lora.targets = vec![LoraTarget::Q, LoraTarget::Q];
        let err = config.validate().unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    name: "lora.targets",
                    ..
                }
            ),
            "{err}"
        );

        let mut config = TrainConfig::default();
        config.lora.dropout = 1.0;
        assert!(matches!(
            config.validate().unwrap_err(),
            Error::InvalidArgument {
                name: "lora.dropout",
                ..
            }
        ));

        let config = TrainConfig {
            objective: Objective::NextQuill {
                alpha: 0.1,
                delta: 0.05,
                lambda: 0.0,
                epsilon: 0.1,
                weights: WeightSource::Dynamic,
                lp: LpReduction::Mean,
            },
            ..TrainConfig::default()
        };
        assert!(matches!(
            config.validate().unwrap_err(),
            Error::InvalidArgument {
                name: "objective.lambda",
                ..
            }
        ));
    }
}
