//! The training loop: examples to steps, AdamW with warmup and decay,
//! clipping, accumulation, epochs, validation with keep-best, progress and
//! cancellation, checkpoints and resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{self, Checkpoint, LoopState};
use super::config::{LrSchedule, Objective, ResumePolicy, TrainConfig, WeightSource};
use super::lora::{Dropout, LoraSet};
use super::loss::{nextquill_loss, sft_loss, NextQuillParams};
use super::model::{Adapter, BaseModel};
use crate::adapter::LoraWeights;
use crate::error::{Error, Result};

/// One training example: a response the user wrote and the two prompts it answers.
///
/// Token ids come from llama.cpp's tokenizer. The trainer feeds `prompt ++ response`
/// and computes logits only at response positions: row `t` predicts `response[t]`
/// from the position before it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainExample {
    /// Prompt with the user's history, ending where the response begins.
    pub with_history: Vec<u32>,
    /// The same prompt with the history replaced by `None` (unused by SFT).
    pub counterfactual: Vec<u32>,
    /// The text the user wrote.
    pub response: Vec<u32>,
    /// Precomputed NextQuill weights, one per response token; needed with
    /// [`WeightSource::Fixed`], ignored otherwise.
    pub fixed_weights: Option<Vec<f32>>,
}

/// What the progress callback wants the loop to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Go on.
    Continue,
    /// Stop after this step; the outcome holds the adapter so far.
    Stop,
}

/// An event of a running training loop.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// An optimizer step finished.
    Step {
        /// Steps done, from 1.
        step: usize,
        /// Steps the whole run will take.
        total_steps: usize,
        /// Epoch in progress, from 0.
        epoch: usize,
        /// Mean loss of the step's examples.
        loss: f32,
        /// Learning rate the step used.
        learning_rate: f64,
        /// Tokens through the model per second, over the run so far.
        tokens_per_second: f64,
        /// Estimated seconds to the end of the run.
        eta_seconds: f64,
    },
    /// A step's loss or gradient was not finite: the adapter was left unchanged.
    Skipped {
        /// The step, from 1.
        step: usize,
        /// What was not finite.
        reason: String,
    },
    /// Validation loss at the end of an epoch.
    Validation {
        /// The epoch, from 0.
        epoch: usize,
        /// Mean loss on the validation examples.
        loss: f32,
        /// Whether this is the best so far (and the adapter kept).
        best: bool,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Steps it holds.
        step: usize,
        /// The file.
        path: PathBuf,
    },
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Every epoch ran.
    Finished,
    /// The progress callback asked to stop.
    Stopped,
}

/// Numbers of a finished (or stopped) run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Optimizer steps taken, including skipped ones and those before a resume.
    pub steps: usize,
    /// Steps skipped because the loss or a gradient was not finite.
    pub skipped_non_finite: usize,
    /// Examples whose response was cut to fit the memory budget.
    pub truncated_examples: usize,
    /// Examples left out because even their prompt did not fit the memory budget.
    pub dropped_examples: usize,
    /// Loss of the first step.
    pub first_loss: Option<f32>,
    /// Loss of the last step.
    pub last_loss: Option<f32>,
    /// Lowest step loss.
    pub best_loss: Option<f32>,
    /// Lowest end-of-epoch validation loss, when validation examples were given.
    pub best_validation_loss: Option<f32>,
    /// Tokens through the model per second (both passes count), in this process.
    pub tokens_per_second: f64,
    /// Wall-clock seconds of this process's part of the run.
    pub seconds: f64,
    /// Whether the run finished or was stopped.
    pub completion: Completion,
}

/// The trained adapter and the run's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// The adapter: the best by validation loss when validation examples were
    /// given, else the last. Never holds values from a skipped (non-finite) step.
    pub weights: LoraWeights,
    /// What happened.
    pub summary: TrainSummary,
}

/// Trains LoRA adapters on one frozen GGUF base model.
#[derive(Debug)]
pub struct Trainer {
    model: BaseModel,
    config: TrainConfig,
    pool: rayon::ThreadPool,
}

/// Bytes of one f32.
const F32: u64 = 4;

/// Keeps candle's own helper threads within the trainer's thread budget.
///
/// candle runs large elementwise ops (the residual adds, the gradient sums of
/// backprop) on a process-wide pool that it sizes from `CANDLE_NUM_THREADS`
/// (default: one thread per physical core) and whose threads spin for about a
/// millisecond after every op before they sleep. Both are read once, when the
/// pool first starts. Left at the defaults, the spinning takes a core from the
/// trainer's matrix products after each of the step's hundreds of small ops
/// (one NextQuill step on 2 cores: 3.22 s with the defaults, 2.99 s without
/// the spinning), and on a phone the pool ignores the thread count the app
/// chose. So before candle's first use the pool gets the trainer's thread
/// count and threads that sleep as soon as their work is done. A variable the
/// application has already set is left as it is, and only the first trainer
/// of a process decides.
fn tame_candle_threads(threads: usize) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let settings = [
            ("CANDLE_NUM_THREADS", threads.to_string()),
            ("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1".to_string()),
        ];
        for (name, value) in settings {
            if std::env::var_os(name).is_none() {
                std::env::set_var(name, value);
            }
        }
    });
}

impl Trainer {
    /// Loads the base model from `gguf_path` (kept quantized) after validating `config`.
    pub fn new(gguf_path: impl AsRef<Path>, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        tame_candle_threads(config.threads);
        let model = BaseModel::load(gguf_path.as_ref(), &Device::Cpu)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .build()
            .map_err(|e| Error::InvalidArgument {
                name: "threads",
                reason: format!("cannot start {} threads: {e}", config.threads),
            })?;
        tracing::debug!(
            layers = model.dims.n_layer,
            resident_mb = model.resident_bytes / 1_000_000,
            "loaded base model for training"
        );
        Ok(Trainer {
            model,
            config,
            pool,
        })
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Logits of the f32 forward pass for the positions from `first_row` on
    /// (row `i` predicts the token after position `first_row + i`), with
    /// `adapter` applied when given. For checks against other implementations.
    pub fn logits(
        &self,
        tokens: &[u32],
        first_row: usize,
        adapter: Option<&LoraWeights>,
    ) -> Result<Vec<Vec<f32>>> {
        let lora = match adapter {
            Some(weights) => Some(
                LoraSet::from_weights(weights, &self.model, &Device::Cpu).map_err(|reason| {
                    Error::InvalidArgument {
                        name: "adapter",
                        reason: format!("{reason}; train it for this model"),
                    }
                })?,
            ),
            None => None,
        };
        self.pool.install(|| {
            let adapter = lora.as_ref().map(|lora| Adapter {
                lora,
                dropout: None,
            });
            self.model
                .logits(tokens, first_row, adapter)
                .and_then(|l| l.to_vec2::<f32>())
                .map_err(|source| Error::Tensor {
                    during: "the forward pass",
                    source,
                })
        })
    }

    /// Estimated peak bytes of one example's step with prompts of `with_len` and
    /// `without_len` tokens (0 for SFT) and `response_len` response tokens: the
    /// resident base weights plus the activations the backward pass keeps.
    ///
    /// An estimate from the model's sizes, not a measurement; the benches measure
    /// the real peak.
    pub fn estimated_step_bytes(
        &self,
        with_len: usize,
        without_len: usize,
        response_len: usize,
    ) -> u64 {
        let d = &self.model.dims;
        let pass = |prompt: usize| -> u64 {
            if prompt == 0 {
                return 0;
            }
            let t = (prompt + response_len) as u64;
            // What one layer keeps for the backward pass (norms, projections,
            // rotated heads, attention output, residual sums, the gate),
            // calibrated on measured peaks of the default model.
            let per_layer = t * (8 * d.n_embd as u64 + 3 * d.n_ff as u64);
            d.n_layer as u64 * per_layer * F32 + 3 * response_len as u64 * d.n_vocab as u64 * F32
        };
        // Alive for one op at a time: a dequantized matrix (the largest is the
        // output head) and one layer's attention scores and probabilities.
        let longest = (with_len.max(without_len) + response_len) as u64;
        let transient =
            (d.n_vocab * d.n_embd) as u64 * F32 + 2 * d.n_head as u64 * longest * longest * F32;
        self.model.resident_bytes + transient + pass(with_len) + pass(without_len)
    }

    /// Trains a fresh adapter (or resumes a checkpointed one) on `examples`,
    /// reporting to `progress` after every step and stopping when it says so.
    ///
    /// `validation` examples are scored at the end of every epoch and the best
    /// adapter is kept; pass an empty slice to keep the last one. Cancellation is
    /// checked between steps, never inside one. Examples whose tokens do not fit
    /// `memory_budget_bytes` get their response cut at the end; if even one
    /// response token does not fit, the example is left out (both are counted in
    /// the summary).
    pub fn train(
        &self,
        examples: &[TrainExample],
        validation: &[TrainExample],
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<TrainOutcome> {
        // The loop runs on the trainer's own thread pool, so `threads` bounds the
        // matrix kernels; the caller's thread only relays progress, which lets the
        // callback stay non-`Send` (a progress bar, a UI handle).
        let (events, event_rx) = std::sync::mpsc::channel::<Progress>();
        let (control_tx, controls) = std::sync::mpsc::channel::<Control>();
        std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                self.pool.install(move || {
                    let mut relay = |event: Progress| {
                        if events.send(event).is_err() {
                            return Control::Stop;
                        }
                        controls.recv().unwrap_or(Control::Stop)
                    };
                    self.train_inner(examples, validation, &mut relay)
                })
            });
            for event in event_rx {
                // The worker waits for this answer; a closed channel means it ended.
                let _ = control_tx.send(progress(event));
            }
            match worker.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    fn train_inner(
        &self,
        examples: &[TrainExample],
        validation: &[TrainExample],
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<TrainOutcome> {
        let started = Instant::now();
        let config = &self.config;
        let (examples, truncated, dropped) = self.fit_to_budget(examples)?;
        let (validation, _, _) = self.fit_to_budget(validation)?;
        if examples.is_empty() {
            return Err(Error::InvalidArgument {
                name: "examples",
                reason: format!("no example to train on ({dropped} did not fit the memory budget)"),
            });
        }

        let tensor_err = |during| move |source| Error::Tensor { during, source };
        let lora = LoraSet::new(
            &self.model,
            config.lora.rank,
            config.lora.alpha,
            &config.lora.targets,
            config.seed,
            &Device::Cpu,
        )
        .map_err(tensor_err("initialising the adapter"))?;
        let vars: Vec<Var> = lora.vars().into_iter().cloned().collect();
        let mut adam =
            AdamW::new(&vars, config.weight_decay).map_err(tensor_err("initialising AdamW"))?;

        let per_epoch = examples.len().div_ceil(config.accumulation_steps);
        let total_steps = per_epoch * config.epochs;
        let fingerprint = format!("{config:?} examples={}", examples.len());
        let mut state = LoopState {
            fingerprint: fingerprint.clone(),
            step: 0,
            epoch: 0,
            position: 0,
            adam_steps: 0,
            skipped_non_finite: 0,
            first_loss: None,
            last_loss: None,
            best_loss: None,
            best_validation_loss: None,
            tokens: 0,
        };
        let mut best: Option<Vec<Tensor>> = None;

        if let Some(ck) = &config.checkpoint {
            if ck.resume == ResumePolicy::Resume {
                if let Some(saved) = checkpoint::load(&ck.dir, &Device::Cpu)? {
                    let path = ck.dir.join(checkpoint::FILE_NAME);
                    if saved.state.fingerprint != fingerprint || saved.lora.len() != vars.len() {
                        return Err(Error::Checkpoint {
                            path,
                            reason: "it was written by a run with other settings or examples"
                                .into(),
                        });
                    }
                    lora.restore(&saved.lora)
                        .map_err(tensor_err("restoring the adapter"))?;
                    adam.m = saved.adam_m;
                    adam.v = saved.adam_v;
                    adam.steps = saved.state.adam_steps;
                    best = saved.best;
                    state = saved.state;
                    tracing::info!(
                        step = state.step,
                        "resuming training from {}",
                        path.display()
                    );
                }
            }
        }

        let tokens_at_start = state.tokens;
        let mut completion = Completion::Finished;
        'epochs: while state.epoch < config.epochs {
            let order = epoch_order(examples.len(), config.seed, state.epoch);
            while state.position < order.len() {
                let end = (state.position + config.accumulation_steps).min(order.len());
                let batch: Vec<&TrainExample> = order[state.position..end]
                    .iter()
                    .map(|&i| &examples[i])
                    .collect();
                let step_started = Instant::now();
                let lr = learning_rate(config, state.step, total_steps);

                let outcome = self.accumulate(&lora, &batch, state.step)?;
                state.tokens += outcome.tokens;
                state.position = end;
                state.step += 1;
                let step = state.step;
                let loss = outcome.loss;

                match outcome.check(config.max_grad_norm) {
                    Err(reason) => {
                        state.skipped_non_finite += 1;
                        tracing::warn!(step, "skipped training step: {reason}");
                        if progress(Progress::Skipped { step, reason }) == Control::Stop {
                            completion = Completion::Stopped;
                        }
                    }
                    Ok(grads) => {
                        adam.step(&vars, &grads, lr)
                            .map_err(tensor_err("updating the adapter"))?;
                        state.first_loss.get_or_insert(loss);
                        state.last_loss = Some(loss);
                        state.best_loss = Some(state.best_loss.map_or(loss, |b: f32| b.min(loss)));

                        let seconds = started.elapsed().as_secs_f64();
                        let tokens_per_second =
                            (state.tokens - tokens_at_start) as f64 / seconds.max(1e-9);
                        let eta_seconds =
                            step_started.elapsed().as_secs_f64() * (total_steps - step) as f64;
                        tracing::debug!(step, loss, lr, "training step");
                        let event = Progress::Step {
                            step,
                            total_steps,
                            epoch: state.epoch,
                            loss,
                            learning_rate: lr,
                            tokens_per_second,
                            eta_seconds,
                        };
                        if progress(event) == Control::Stop {
                            completion = Completion::Stopped;
                        }
                    }
                }

                let epoch_done = state.position == order.len();
                if epoch_done {
                    self.end_epoch(&lora, &validation, &mut state, &mut best, progress)?;
                    state.epoch += 1;
                    state.position = 0;
                }
                if let Some(ck) = &config.checkpoint {
                    if step % ck.every_steps == 0 || completion == Completion::Stopped {
                        // Adam's bias correction depends on its step count: a
                        // resume without it takes different steps.
                        state.adam_steps = adam.steps;
                        let saved = Checkpoint {
                            state: state.clone(),
                            lora: lora.snapshot().map_err(tensor_err("copying the adapter"))?,
                            adam_m: adam.m.clone(),
                            adam_v: adam.v.clone(),
                            best: best.clone(),
                        };
                        let path = checkpoint::save(&ck.dir, &saved)?;
                        if progress(Progress::Checkpoint { step, path }) == Control::Stop {
                            completion = Completion::Stopped;
                        }
                    }
                }
                if completion == Completion::Stopped {
                    break 'epochs;
                }
                if epoch_done {
                    // The next epoch draws its own order; the last one ends the run.
                    continue 'epochs;
                }
            }
        }

        let weights = lora
            .to_weights(best.as_deref())
            .map_err(tensor_err("copying the adapter"))?;
        let seconds = started.elapsed().as_secs_f64();
        let summary = TrainSummary {
            steps: state.step,
            skipped_non_finite: state.skipped_non_finite,
            truncated_examples: truncated,
            dropped_examples: dropped,
            first_loss: state.first_loss,
            last_loss: state.last_loss,
            best_loss: state.best_loss,
            best_validation_loss: state.best_validation_loss,
            tokens_per_second: (state.tokens - tokens_at_start) as f64 / seconds.max(1e-9),
            seconds,
            completion,
        };
        tracing::info!(
            "trained adapter: {} steps, loss {:?} -> {:?}, {:.0} s",
            summary.steps,
            summary.first_loss,
            summary.last_loss,
            summary.seconds
        );
        Ok(TrainOutcome { weights, summary })
    }

    /// Scores the validation examples at the end of an epoch and keeps the best adapter.
    fn end_epoch(
        &self,
        lora: &LoraSet,
        validation: &[TrainExample],
        state: &mut LoopState,
        best: &mut Option<Vec<Tensor>>,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<()> {
        if validation.is_empty() {
            return Ok(());
        }
        let mut total = 0f64;
        for example in validation {
            let (loss, _) = self.example_loss(lora, example, None)?;
            total += loss.to_scalar::<f32>().map_err(|source| Error::Tensor {
                during: "scoring validation examples",
                source,
            })? as f64;
        }
        let loss = (total / validation.len() as f64) as f32;
        let is_best = state.best_validation_loss.is_none_or(|b| loss < b);
        if is_best {
            state.best_validation_loss = Some(loss);
            *best = Some(lora.snapshot().map_err(|source| Error::Tensor {
                during: "copying the adapter",
                source,
            })?);
        }
        tracing::info!(epoch = state.epoch, loss, best = is_best, "validation loss");
        // A stop request here takes effect after the step that ended the epoch.
        let _ = progress(Progress::Validation {
            epoch: state.epoch,
            loss,
            best: is_best,
        });
        Ok(())
    }

    /// Forward and backward passes of a step's examples, gradients averaged.
    fn accumulate(
        &self,
        lora: &LoraSet,
        batch: &[&TrainExample],
        step: usize,
    ) -> Result<StepGradients> {
        let vars = lora.vars();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0f64;
        let mut tokens = 0u64;
        let scale = 1.0 / batch.len() as f64;
        let tensor_err = |source| Error::Tensor {
            during: "the backward pass",
            source,
        };

        for (i, example) in batch.iter().enumerate() {
            let mut dropout = Dropout::new(
                self.config.lora.dropout,
                mix(self.config.seed, step as u64, i as u64),
            );
            let (loss, n_tokens) = self.example_loss(lora, example, Some(&mut dropout))?;
            tokens += n_tokens;
            loss_sum += loss.to_scalar::<f32>().map_err(tensor_err)? as f64;
            let store = loss.backward().map_err(tensor_err)?;
            for (acc, var) in grads.iter_mut().zip(&vars) {
                let Some(g) = store.get(var.as_tensor()) else {
                    continue;
                };
                let g = g.affine(scale, 0.0).map_err(tensor_err)?;
                *acc = Some(match acc.take() {
                    Some(sum) => (sum + g).map_err(tensor_err)?,
                    None => g,
                });
            }
        }
        let grads = grads
            .into_iter()
            .zip(&vars)
            .map(|(g, var)| match g {
                Some(g) => Ok(g),
                // A pair the loss does not reach (B = 0 blocks A's gradient at the start).
                None => var.zeros_like(),
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(tensor_err)?;
        Ok(StepGradients {
            loss: (loss_sum * scale) as f32,
            grads,
            tokens,
        })
    }

    /// One example's loss under the configured objective, with its token count.
    fn example_loss(
        &self,
        lora: &LoraSet,
        example: &TrainExample,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, u64)> {
        let tensor_err = |source| Error::Tensor {
            during: "the forward pass",
            source,
        };
        let labels: Vec<Option<u32>> = example.response.iter().map(|&y| Some(y)).collect();
        let mut pass = |prompt: &[u32]| {
            let adapter = Adapter {
                lora,
                dropout: dropout.as_deref_mut(),
            };
            let tokens = response_input(prompt, &example.response);
            self.model
                .logits(&tokens, prompt.len() - 1, Some(adapter))
                .map(|logits| (logits, tokens.len() as u64))
                .map_err(tensor_err)
        };

        let (with, with_tokens) = pass(&example.with_history)?;
        match self.config.objective {
            Objective::Sft => Ok((sft_loss(&with, &labels)?, with_tokens)),
            Objective::NextQuill {
                alpha,
                delta,
                lambda,
                epsilon,
                weights,
                lp,
            } => {
                let (without, without_tokens) = pass(&example.counterfactual)?;
                let fixed = match weights {
                    WeightSource::Dynamic => None,
                    WeightSource::Fixed => Some(example.fixed_weights.as_deref().ok_or_else(|| {
                        Error::InvalidArgument {
                            name: "fixed_weights",
                            reason: "WeightSource::Fixed needs precomputed weights on every example; \
                                     compute them with the effect module or use Dynamic"
                                .into(),
                        }
                    })?),
                };
                let params = NextQuillParams {
                    alpha,
                    delta,
                    lambda,
                    epsilon,
                    lp,
                };
                let terms = nextquill_loss(&with, &without, &labels, fixed, params)?;
                Ok((terms.loss, with_tokens + without_tokens))
            }
        }
    }

    /// Checks every example and cuts responses to the memory budget.
    fn fit_to_budget(
        &self,
        examples: &[TrainExample],
    ) -> Result<(Vec<TrainExample>, usize, usize)> {
        let nextquill = matches!(self.config.objective, Objective::NextQuill { .. });
        let budget = self.config.memory_budget_bytes;
        let (mut kept, mut truncated, mut dropped) = (Vec::new(), 0, 0);
        for (i, example) in examples.iter().enumerate() {
            let invalid = |reason: String| Error::InvalidArgument {
                name: "examples",
                reason: format!("example {i}: {reason}"),
            };
            if example.with_history.is_empty() || (nextquill && example.counterfactual.is_empty()) {
                return Err(invalid(
                    "a prompt is empty; every prompt needs at least one token".into(),
                ));
            }
            if example.response.is_empty() {
                return Err(invalid("the response is empty".into()));
            }
            if let Some(w) = &example.fixed_weights {
                if w.len() != example.response.len() {
                    return Err(invalid(format!(
                        "{} fixed weights for {} response tokens",
                        w.len(),
                        example.response.len()
                    )));
                }
            }
            let without = if nextquill {
                example.counterfactual.len()
            } else {
                0
            };
            let fits = |r: usize| {
                self.estimated_step_bytes(example.with_history.len(), without, r) <= budget
            };
            let mut r = example.response.len();
            while r > 0 && !fits(r) {
                r -= 1;
            }
            if r == 0 {
                dropped += 1;
                continue;
            }
            let mut example = example.clone();
            if r < example.response.len() {
                truncated += 1;
                example.response.truncate(r);
                if let Some(w) = &mut example.fixed_weights {
                    w.truncate(r);
                }
            }
            kept.push(example);
        }
        if truncated + dropped > 0 {
            tracing::info!(truncated, dropped, "examples cut to the memory budget");
        }
        Ok((kept, truncated, dropped))
    }
}

/// `prompt ++ response` without the response's last token, whose successor is never scored.
fn response_input(prompt: &[u32], response: &[u32]) -> Vec<u32> {
    let mut tokens = Vec::with_capacity(prompt.len() + response.len());
    tokens.extend_from_slice(prompt);
    tokens.extend_from_slice(&response[..response.len() - 1]);
    tokens
}

/// The examples' order in `epoch`: a permutation drawn from (seed, epoch).
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(
        seed,
        0x005e_ed0f_e90c,
        epoch as u64,
    )));
    order
}

/// A 64-bit seed for one purpose of one step (splitmix64 finaliser over the inputs).
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Learning rate of optimizer step `step` (0-based), as Hugging Face's linear
/// schedule with warmup computes it.
fn learning_rate(config: &TrainConfig, step: usize, total_steps: usize) -> f64 {
    let peak = config.learning_rate;
    if step < config.warmup_steps {
        return peak * step as f64 / config.warmup_steps as f64;
    }
    match config.schedule {
        LrSchedule::Constant => peak,
        LrSchedule::LinearDecay => {
            let remaining = total_steps.saturating_sub(step) as f64;
            let span = total_steps.saturating_sub(config.warmup_steps).max(1) as f64;
            peak * (remaining / span).max(0.0)
        }
    }
}

/// Averaged gradients of one step.
struct StepGradients {
    loss: f32,
    grads: Vec<Tensor>,
    tokens: u64,
}

impl StepGradients {
    /// The gradients to apply (clipped), or why the step must be skipped.
    fn check(self, max_norm: Option<f32>) -> std::result::Result<Vec<Tensor>, String> {
        if !self.loss.is_finite() {
            return Err(format!("loss is {}", self.loss));
        }
        let mut sum_sq = 0f64;
        for g in &self.grads {
            let sq = g
                .sqr()
                .and_then(|s| s.sum_all())
                .and_then(|s| s.to_scalar::<f32>());
            sum_sq += sq.map_err(|e| e.to_string())? as f64;
        }
        let norm = sum_sq.sqrt();
        if !norm.is_finite() {
            return Err(format!("gradient norm is {norm}"));
        }
        match max_norm {
            Some(max) if norm > max as f64 => {
                let coef = max as f64 / (norm + 1e-6);
                self.grads
                    .iter()
                    .map(|g| g.affine(coef, 0.0))
                    .collect::<candle_core::Result<_>>()
                    .map_err(|e| e.to_string())
            }
            _ => Ok(self.grads),
        }
    }
}

/// AdamW as PyTorch computes it, with f32 moments the checkpoint can hold.
struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: u64,
    weight_decay: f64,
}

impl AdamW {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vars: &[Var], weight_decay: f64) -> candle_core::Result<Self> {
        let zeros = || {
            vars.iter()
                .map(|v| v.zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        Ok(AdamW {
            m: zeros()?,
            v: zeros()?,
            steps: 0,
            weight_decay,
        })
    }

    fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let bias1 = 1.0 - Self::BETA1.powi(t);
        let bias2 = 1.0 - Self::BETA2.powi(t);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            self.m[i] = ((&self.m[i] * Self::BETA1)? + (g * (1.0 - Self::BETA1))?)?;
            self.v[i] = ((&self.v[i] * Self::BETA2)? + (g.sqr()? * (1.0 - Self::BETA2))?)?;
            let denom = ((self.v[i].sqrt()? / bias2.sqrt())? + Self::EPS)?;
            let update = (self.m[i].div(&denom)? * (lr / bias1))?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - update)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::LoraTarget;
    use crate::train::config::CheckpointConfig;
    use crate::train::model::{tiny, Arch};
    use crate::train::testing::max_abs;
    use rand::Rng;

    fn tiny_model(dir: &Path) -> PathBuf {
        let path = dir.join("tiny.gguf");
        if !path.exists() {
            tiny::write(&path, Arch::Llama, 11);
        }
        path
    }

    fn tiny_config() -> TrainConfig {
        TrainConfig {
            learning_rate: 1e-2,
            warmup_steps: 1,
            lora: crate::train::LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                targets: LoraTarget::ALL.to_vec(),
            },
            ..TrainConfig::default()
        }
    }

    /// Examples of random token ids: a shared request, a history only in the first prompt.
    fn examples(n: usize, seed: u64) -> Vec<TrainExample> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut ids = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| rng.random_range(0..tiny::N_VOCAB as u32))
                .collect()
        };
        (0..n)
            .map(|_| {
                let (history, request, response) = (ids(6), ids(4), ids(5));
                TrainExample {
                    with_history: [vec![1], history, request.clone()].concat(),
                    counterfactual: [vec![1, 2], request].concat(),
                    response,
                    fixed_weights: None,
                }
            })
            .collect()
    }

    #[test]
    fn every_lora_parameter_of_every_layer_gets_a_gradient() {
        let dir = tempfile::tempdir().unwrap();
        let trainer = Trainer::new(tiny_model(dir.path()), tiny_config()).unwrap();
        let lora = LoraSet::new(&trainer.model, 4, 8.0, &LoraTarget::ALL, 3, &Device::Cpu).unwrap();
        assert_eq!(lora.params.len(), tiny::N_LAYER * LoraTarget::ALL.len());
        let example = &examples(1, 5)[0];

        // B starts at 0 as in PEFT, so at step 0 only B can have a gradient.
        let (loss, _) = trainer.example_loss(&lora, example, None).unwrap();
        let store = loss.backward().unwrap();
        for p in &lora.params {
            let at = format!("blk.{}.{:?}", p.layer, p.target);
            assert!(
                max_abs(store.get(&p.b).expect(&at)) > 0.0,
                "{at}: B has no gradient"
            );
            assert_eq!(
                max_abs(store.get(&p.a).expect(&at)),
                0.0,
                "{at}: A moved with B = 0"
            );
        }

        let vars: Vec<Var> = lora.vars().into_iter().cloned().collect();
        let grads: Vec<Tensor> = vars.iter().map(|v| store.get(v).unwrap().clone()).collect();
        AdamW::new(&vars, 0.0)
            .unwrap()
            .step(&vars, &grads, 1e-2)
            .unwrap();

        let (loss, _) = trainer.example_loss(&lora, example, None).unwrap();
        let store = loss.backward().unwrap();
        for p in &lora.params {
            let at = format!("blk.{}.{:?}", p.layer, p.target);
            assert!(
                max_abs(store.get(&p.a).expect(&at)) > 0.0,
                "{at}: A has no gradient after a step"
            );
            assert!(
                max_abs(store.get(&p.b).expect(&at)) > 0.0,
                "{at}: B has no gradient after a step"
            );
        }
    }

    /// Central differences of the loss against the backward pass, through
    /// every kind of projection, for both objectives.
    fn finite_difference_check(objective: Objective) {
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig {
            objective,
            ..tiny_config()
        };
        let trainer = Trainer::new(tiny_model(dir.path()), config).unwrap();
        let lora = LoraSet::new(&trainer.model, 4, 8.0, &LoraTarget::ALL, 3, &Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for p in &lora.params {
            let b: Vec<f32> = (0..p.b.elem_count())
                .map(|_| rng.random_range(-0.1..0.1))
                .collect();
            p.b.set(&Tensor::from_vec(b, p.b.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let mut example = examples(1, 6).remove(0);
        example.fixed_weights = Some(vec![0.9, 0.1, 0.1, 0.9, 0.1]);
        let loss_of = |lora: &LoraSet| -> f64 {
            let (loss, _) = trainer.example_loss(lora, &example, None).unwrap();
            loss.to_scalar::<f32>().unwrap() as f64
        };

        let (loss, _) = trainer.example_loss(&lora, &example, None).unwrap();
        let store = loss.backward().unwrap();
        let mut checked = 0;
        for p in lora
            .params
            .iter()
            .filter(|p| p.layer == 0 || p.target != LoraTarget::K)
        {
            for var in [&p.a, &p.b] {
                let grad = store
                    .get(var)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let (index, &analytic) = grad
                    .iter()
                    .enumerate()
                    .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
                    .unwrap();
                let original = var.as_tensor().copy().unwrap();
                let nudged = |delta: f32| {
                    let mut values = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    values[index] += delta;
                    var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss_of(&lora)
                };
                let h = 5e-3;
                let numeric = (nudged(h) - nudged(-h)) / (2.0 * h as f64);
                var.set(&original).unwrap();
                let tolerance = 2e-4 + 2e-2 * analytic.abs() as f64;
                assert!(
                    (numeric - analytic as f64).abs() <= tolerance,
                    "blk.{}.{:?}: backward {analytic}, finite difference {numeric}",
                    p.layer,
                    p.target
                );
                checked += 1;
            }
        }
        assert!(checked >= 20);
    }

    #[test]
    fn gradients_match_finite_differences_for_nextquill() {
        finite_difference_check(Objective::NextQuill {
            alpha: 0.5,
            delta: 0.05,
            lambda: 0.9,
            epsilon: 0.1,
            weights: WeightSource::Fixed,
            lp: crate::train::LpReduction::Mean,
        });
    }

    #[test]
    fn gradients_match_finite_differences_for_sft() {
        finite_difference_check(Objective::Sft);
    }

    #[test]
    fn an_adapter_with_zero_b_leaves_the_logits_bit_identical() {
        let dir = tempfile::tempdir().unwrap();
        let trainer = Trainer::new(tiny_model(dir.path()), tiny_config()).unwrap();
        let lora = LoraSet::new(&trainer.model, 4, 8.0, &LoraTarget::ALL, 3, &Device::Cpu).unwrap();
        let tokens = &examples(1, 2)[0].with_history;
        let base = trainer
            .model
            .logits(tokens, 0, None)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let adapter = Adapter {
            lora: &lora,
            dropout: None,
        };
        let adapted = trainer
            .model
            .logits(tokens, 0, Some(adapter))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(base, adapted);
    }

    #[test]
    fn same_seed_gives_the_same_adapter_and_another_seed_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig {
            epochs: 2,
            accumulation_steps: 2,
            lora: crate::train::LoraConfig {
                dropout: 0.1,
                ..tiny_config().lora
            },
            ..tiny_config()
        };
        let data = examples(5, 1);
        let validation = examples(2, 2);
        let run = |seed: u64| {
            let trainer = Trainer::new(
                tiny_model(dir.path()),
                TrainConfig {
                    seed,
                    ..config.clone()
                },
            )
            .unwrap();
            trainer
                .train(&data, &validation, &mut |_| Control::Continue)
                .unwrap()
        };
        let (first, second, other) = (run(7), run(7), run(8));
        assert_eq!(first.summary.steps, 6, "3 steps an epoch, 2 epochs");
        assert!(first.summary.best_validation_loss.is_some());
        assert_eq!(first.weights, second.weights);
        assert_ne!(first.weights, other.weights);
        assert!(first
            .weights
            .pairs
            .iter()
            .any(|p| p.lora_b.iter().any(|&b| b != 0.0)));
    }

    #[test]
    fn non_finite_steps_are_skipped_and_never_reach_the_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("poisoned.gguf");
        tiny::write_poisoned(&path);
        let trainer = Trainer::new(&path, tiny_config()).unwrap();
        let mut skipped_events = 0;
        let outcome = trainer
            .train(&examples(3, 1), &[], &mut |event| {
                if let Progress::Skipped { reason, .. } = event {
                    assert!(reason.contains("NaN"), "{reason}");
                    skipped_events += 1;
                }
                Control::Continue
            })
            .unwrap();
        assert_eq!(
            (outcome.summary.steps, outcome.summary.skipped_non_finite),
            (3, 3)
        );
        assert_eq!(skipped_events, 3);
        assert_eq!(outcome.summary.first_loss, None);
        assert!(outcome
            .weights
            .pairs
            .iter()
            .all(|p| p.lora_b.iter().all(|&b| b == 0.0)));
    }

    #[test]
    fn stop_from_the_callback_ends_the_run_after_that_step() {
        let dir = tempfile::tempdir().unwrap();
        let trainer = Trainer::new(tiny_model(dir.path()), tiny_config()).unwrap();
        let outcome = trainer
            .train(&examples(6, 1), &[], &mut |event| match event {
                Progress::Step { step: 2, .. } => Control::Stop,
                _ => Control::Continue,
            })
            .unwrap();
        assert_eq!(outcome.summary.completion, Completion::Stopped);
        assert_eq!(outcome.summary.steps, 2);
    }

    #[test]
    fn training_ends_after_the_last_epoch() {
        // Regression: the step loop went on past the last epoch, forever.
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig {
            epochs: 2,
            ..tiny_config()
        };
        let trainer = Trainer::new(tiny_model(dir.path()), config).unwrap();
        let mut steps = Vec::new();
        let outcome = trainer
            .train(&examples(3, 1), &[], &mut |event| {
                if let Progress::Step {
                    step, total_steps, ..
                } = event
                {
                    steps.push((step, total_steps));
                }
                // A runaway loop is stopped here instead of hanging the test.
                match steps.len() > 12 {
                    true => Control::Stop,
                    false => Control::Continue,
                }
            })
            .unwrap();
        assert_eq!(outcome.summary.completion, Completion::Finished);
        assert_eq!(outcome.summary.steps, 6);
        assert_eq!(steps, (1..=6).map(|s| (s, 6)).collect::<Vec<_>>());
    }

    #[test]
    fn responses_are_cut_to_the_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut example = examples(1, 3).remove(0);
        let probe = Trainer::new(tiny_model(dir.path()), tiny_config()).unwrap();
        let (p, pc) = (example.with_history.len(), example.counterfactual.len());
        // A response length whose step needs more than the smallest budget allowed.
        let cut = (1..)
            .map(|k| k * 1000)
            .find(|&r| probe.estimated_step_bytes(p, pc, r) > 64 << 20)
            .unwrap();
        example.response = (0..3 * cut as u32)
            .map(|i| i % tiny::N_VOCAB as u32)
            .collect();
        let config = TrainConfig {
            memory_budget_bytes: probe.estimated_step_bytes(p, pc, cut),
            ..tiny_config()
        };
        let trainer = Trainer::new(tiny_model(dir.path()), config).unwrap();
        let (kept, truncated, dropped) = trainer.fit_to_budget(&[example]).unwrap();
        assert_eq!((truncated, dropped), (1, 0));
        assert_eq!(kept[0].response.len(), cut);
    }

    #[test]
    fn learning_rate_warms_up_then_decays_linearly() {
        let config = TrainConfig::default();
        let lr = |step| learning_rate(&config, step, 100);
        assert_eq!(lr(0), 0.0);
        assert!((lr(5) - 1e-4).abs() < 1e-12);
        assert!((lr(10) - 2e-4).abs() < 1e-12);
        assert!((lr(55) - 1e-4).abs() < 1e-12);
        assert!((lr(99) - 2e-4 / 90.0).abs() < 1e-12);
    }

    const CHILD_ENV: &str = "NEXTQUILL_TRAIN_SIGKILL_CHILD";

    fn resumable_config(dir: &Path) -> TrainConfig {
        TrainConfig {
            checkpoint: Some(CheckpointConfig {
                dir: dir.to_path_buf(),
                every_steps: 2,
                resume: ResumePolicy::Resume,
            }),
            lora: crate::train::LoraConfig {
                dropout: 0.1,
                ..tiny_config().lora
            },
            ..tiny_config()
        }
    }

    /// The child process: trains with checkpoints and hangs after step 5, so the
    /// parent can SIGKILL it between checkpoints.
    fn sigkill_child(dir: &Path) {
        let trainer = Trainer::new(tiny_model(dir), resumable_config(&dir.join("ck"))).unwrap();
        let _ = trainer.train(&examples(8, 4), &[], &mut |event| {
            if let Progress::Step { step: 5, .. } = event {
                std::fs::write(dir.join("at-step-5"), b"").unwrap();
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            Control::Continue
        });
    }

    #[test]
    fn a_run_killed_with_sigkill_resumes_to_the_same_adapter() {
        if let Ok(dir) = std::env::var(CHILD_ENV) {
            sigkill_child(Path::new(&dir));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "train::trainer::tests::a_run_killed_with_sigkill_resumes_to_the_same_adapter",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let marker = dir.path().join("at-step-5");
        let waited = Instant::now();
        while !marker.exists() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "child ended before step 5"
            );
            assert!(
                waited.elapsed().as_secs() < 120,
                "child never reached step 5"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();

        let data = examples(8, 4);
        let resumed_trainer = Trainer::new(
            tiny_model(dir.path()),
            resumable_config(&dir.path().join("ck")),
        )
        .unwrap();
        let mut steps_seen = Vec::new();
        let resumed = resumed_trainer
            .train(&data, &[], &mut |event| {
                if let Progress::Step { step, .. } = event {
                    steps_seen.push(step);
                }
                Control::Continue
            })
            .unwrap();
        assert_eq!(
            steps_seen,
            vec![5, 6, 7, 8],
            "resumed from the step-4 checkpoint"
        );

        let fresh_trainer = Trainer::new(
            tiny_model(dir.path()),
            resumable_config(&dir.path().join("ck2")),
        )
        .unwrap();
        let fresh = fresh_trainer
            .train(&data, &[], &mut |_| Control::Continue)
            .unwrap();
        assert_eq!(resumed.summary.steps, 8);
        let max_diff = resumed
            .weights
            .pairs
            .iter()
            .zip(&fresh.weights.pairs)
            .flat_map(|(r, f)| {
                let a = r.lora_a.iter().zip(&f.lora_a);
                let b = r.lora_b.iter().zip(&f.lora_b);
                a.chain(b).map(|(x, y)| (x - y).abs())
            })
            .fold(0f32, f32::max);
        assert_eq!(
            max_diff, 0.0,
            "resumed adapter differs from the uninterrupted one"
        );
    }
}
