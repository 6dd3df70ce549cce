//! The values that cross the boundary, as plain records and enums, and their
//! one-to-one conversions from the engine's own types.
//!
//! Counts cross as `u64` and sizes the app passes in as `u32`, because Kotlin
//! and Swift have no `usize`; paths cross as strings.

use crate::effect;
use crate::engine::{ExampleSelection, TrainRequest, TrainedAdapter};
use crate::llm::{self, Sampling};
use crate::store;
use crate::train::{self, Completion, Objective};

/// How the engine is opened. Every field has a default, so `EngineConfig()`
/// (in Python, Kotlin and Swift alike) keeps the engine's own settings.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct EngineConfig {
    /// Compute threads of llama.cpp and of training. `None`: every core, at
    /// most 4. On a phone pass fewer than the cores (llama.cpp's workers spin
    /// and collapse when other work shares the cores).
    #[uniffi(default = None)]
    pub threads: Option<u32>,
    /// Context window of each llama.cpp session, in tokens. `None`: 4096.
    #[uniffi(default = None)]
    pub context_tokens: Option<u32>,
    /// Most past texts shown in a personalized prompt. `None`: 8 (the paper's limit).
    #[uniffi(default = None)]
    pub max_history_items: Option<u32>,
    /// A user's text is cut to this many tokens for effects and training.
    /// `None`: 100 (the NextQuill reference protocol).
    #[uniffi(default = None)]
    pub max_response_tokens: Option<u32>,
}

/// One text a user wrote, with what it answers.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct HistoryItem {
    /// The user who wrote it.
    pub user_id: String,
    /// Unique per user; writing the same id again replaces the item.
    pub item_id: String,
    /// When it was written: RFC 3339 with offset, e.g. `2025-05-01T12:00:00Z`.
    /// History is ordered by this.
    pub timestamp: String,
    /// What the text answers (product, rating, title; a mail's subject).
    pub request: String,
    /// The user's own text.
    pub text: String,
    /// Where it came from (an import file, an app feature); may be empty.
    #[uniffi(default = "app")]
    pub source: String,
}

/// What writing one item did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum WriteOutcome {
    /// The item was new.
    Inserted,
    /// An item with the same ids held other content and was replaced.
    Updated,
    /// The same item was already stored.
    Unchanged,
}

/// A line an import skipped.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct BadLine {
    /// 1-based line number.
    pub line: u64,
    /// Why, naming the field.
    pub reason: String,
}

/// What an import did; counts are items.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ImportSummary {
    /// New items.
    pub imported: u64,
    /// Items that replaced stored ones with the same ids.
    pub updated: u64,
    /// Items already stored exactly so.
    pub unchanged: u64,
    /// Lines that were refused; the rest was imported.
    pub bad_lines: Vec<BadLine>,
}

/// One user in the store.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct UserSummary {
    /// The user id.
    pub user_id: String,
    /// Texts in their history.
    pub items: u64,
    /// Timestamp of their newest text, as imported.
    pub latest: Option<String>,
}

/// The history's effect on one token of the user's text.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct TokenEffect {
    /// The token id in the model's vocabulary.
    pub token: u32,
    /// The text this token completes; the texts of all tokens concatenate to
    /// the user's (possibly cut) text, so a heatmap can be drawn from them.
    pub text: String,
    /// ln p(token | request, history, text so far).
    pub logp_with: f32,
    /// ln p(token | request, no history, text so far).
    pub logp_without: f32,
    /// Δp = p_with − p_without: how much the history made this token likelier.
    pub delta_p: f32,
    /// ln p_with − ln p_without.
    pub delta_logp: f32,
    /// Whether Δp > δ: the token carries the user's preference.
    pub preference_bearing: bool,
    /// The token's NextQuill training weight (a text's weights sum to 1).
    pub weight: f32,
}

/// Which tokens of one of the user's texts their history caused.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Explanation {
    /// The user.
    pub user_id: String,
    /// The explained item.
    pub item_id: String,
    /// One entry per token, in order.
    pub tokens: Vec<TokenEffect>,
    /// The δ the `preference_bearing` flags used.
    pub delta: f32,
    /// Past texts the with-history prompt held (only texts older than the item).
    pub history_used: u64,
    /// Share of tokens that are preference-bearing, in [0, 1].
    pub preference_bearing_share: f32,
}

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum TrainObjective {
    /// NextQuill: preference-bearing tokens weighted up, plus alignment of the
    /// model's history effect with the data's.
    NextQuill,
    /// Plain fine-tuning with the history in the prompt.
    Sft,
}

/// How an adapter is trained. `TrainOptions()` is a full NextQuill run over
/// every item with history.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct TrainOptions {
    /// The objective; `None` is NextQuill.
    #[uniffi(default = None)]
    pub objective: Option<TrainObjective>,
    /// Passes over the examples. Default 1.
    #[uniffi(default = 1)]
    pub epochs: u32,
    /// Train on this many of the newest items only (each with its older items
    /// as history); `None` takes every item that has an older one. One
    /// example is one optimizer step, so this also bounds the run's length.
    #[uniffi(default = None)]
    pub latest_items: Option<u32>,
    /// LoRA rank. Default 8.
    #[uniffi(default = 8)]
    pub rank: u32,
    /// LoRA alpha; updates are scaled by alpha / rank. Default 16.
    #[uniffi(default = 16.0)]
    pub alpha: f32,
    /// Peak learning rate. Default 2e-4.
    #[uniffi(default = 0.0002)]
    pub learning_rate: f64,
    /// Steps of linear warmup. Default 10.
    #[uniffi(default = 10)]
    pub warmup_steps: u32,
    /// Seed of the initialisation and the shuffling. Default 42.
    #[uniffi(default = 42)]
    pub seed: u64,
}

/// One event of a running training.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum TrainEvent {
    /// An optimizer step finished: what a progress bar shows.
    Step {
        /// Steps done, from 1.
        step: u64,
        /// Steps the whole run takes.
        total_steps: u64,
        /// Epoch in progress, from 0.
        epoch: u64,
        /// Mean loss of the step.
        loss: f32,
        /// Learning rate the step used.
        learning_rate: f64,
        /// Tokens through the model per second so far.
        tokens_per_second: f64,
        /// Estimated seconds to the end.
        eta_seconds: f64,
    },
    /// A step's loss or gradient was not finite; the adapter was left unchanged.
    Skipped {
        /// The step, from 1.
        step: u64,
        /// What was not finite.
        reason: String,
    },
    /// Validation loss at the end of an epoch.
    Validation {
        /// The epoch, from 0.
        epoch: u64,
        /// Mean validation loss.
        loss: f32,
        /// Whether it is the best so far.
        best: bool,
    },
    /// A checkpoint was written (a stopped run resumes from it).
    Checkpoint {
        /// Steps it holds.
        step: u64,
        /// The file.
        path: String,
    },
}

/// What a listener wants the running call to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Stop at the next safe point (after the current training step, or
    /// before the next generated piece).
    Stop,
}

/// How a training call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum TrainOutcome {
    /// The new adapter passed the sanity gate and is now the user's active one.
    Activated,
    /// The new adapter is registered but failed the sanity gate; the previous
    /// adapter stays active.
    Rejected,
    /// The listener asked to stop: no adapter was registered, the previous one
    /// stays active, and a checkpoint is kept so the same call resumes the run.
    Stopped,
}

/// A registered adapter of one user.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct AdapterInfo {
    /// The owner.
    pub user_id: String,
    /// 1 for the user's first adapter, then increasing.
    pub version: i64,
    /// `nextquill` or `sft`.
    pub objective: String,
    /// Whether personalized generation applies it.
    pub active: bool,
    /// When it was registered, RFC 3339 UTC.
    pub created: String,
    /// The GGUF LoRA file.
    pub path: String,
    /// The training numbers (steps, losses, rank, ...), as JSON.
    pub metrics_json: String,
}

/// What a training call did.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct TrainResult {
    /// How it ended.
    pub outcome: TrainOutcome,
    /// Optimizer steps taken (those before a resume included).
    pub steps: u64,
    /// Loss of the first step, if one ran.
    pub first_loss: Option<f32>,
    /// Loss of the last step, if one ran.
    pub last_loss: Option<f32>,
    /// Wall-clock seconds of this call's training.
    pub seconds: f64,
    /// The new adapter, unless the run was stopped.
    pub adapter: Option<AdapterInfo>,
    /// Mean KL (nats per token) of the new adapter from the base model on
    /// neutral prompts, as the sanity gate measured it.
    pub gate_mean_kl: Option<f32>,
}

/// How text is generated. `GenerateOptions()` is greedy, at most 100 tokens.
#[derive(Debug, Clone, Copy, PartialEq, uniffi::Record)]
pub struct GenerateOptions {
    /// Most new tokens. Default 100.
    #[uniffi(default = 100)]
    pub max_tokens: u32,
    /// 0 decodes greedily (deterministic); above 0 samples at this temperature.
    #[uniffi(default = 0.0)]
    pub temperature: f32,
    /// Nucleus mass kept when sampling. Default 0.95.
    #[uniffi(default = 0.95)]
    pub top_p: f32,
    /// Seed when sampling: the same seed gives the same text. Default 42.
    #[uniffi(default = 42)]
    pub seed: u32,
    /// Repetition penalty; 1.0 disables. Default 1.2.
    #[uniffi(default = 1.2)]
    pub repetition_penalty: f32,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum FinishReason {
    /// The model ended its text.
    EndOfText,
    /// `max_tokens` were produced.
    MaxTokens,
    /// The listener asked to stop.
    Stopped,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct GenerationResult {
    /// The whole text: exactly the streamed pieces concatenated.
    pub text: String,
    /// New tokens produced.
    pub tokens: u64,
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt length in tokens (history included when personalized).
    pub prompt_tokens: u64,
    /// Seconds spent reading the prompt.
    pub prompt_seconds: f64,
    /// Seconds spent producing new tokens.
    pub generate_seconds: f64,
}

/// What forgetting a user removed.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ForgetSummary {
    /// The forgotten user.
    pub user_id: String,
    /// History items removed.
    pub items: u64,
    /// Cached effect entries removed.
    pub cached_effects: u64,
    /// Adapter files deleted (with their folder of checkpoints).
    pub adapters: u64,
    /// Files the engine could not delete and the app must: path and reason.
    pub left_for_app: Vec<String>,
}

/// Facts about the loaded model.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ModelSummary {
    /// The GGUF file.
    pub path: String,
    /// `llama`, `qwen2`, ...
    pub architecture: String,
    /// File size in bytes.
    pub file_size: u64,
    /// Vocabulary size in tokens.
    pub n_vocab: u32,
    /// What caches and adapters are keyed on.
    pub fingerprint: String,
}

impl From<store::Item> for HistoryItem {
    fn from(item: store::Item) -> Self {
        HistoryItem {
            user_id: item.user_id,
            item_id: item.item_id,
            timestamp: item.timestamp,
            request: item.request,
            text: item.text,
            source: item.source,
        }
    }
}

impl From<HistoryItem> for store::NewItem {
    fn from(item: HistoryItem) -> Self {
        store::NewItem {
            user_id: item.user_id,
            item_id: item.item_id,
            timestamp: item.timestamp,
            request: item.request,
            text: item.text,
            source: item.source,
        }
    }
}

impl From<store::WriteOutcome> for WriteOutcome {
    fn from(outcome: store::WriteOutcome) -> Self {
        match outcome {
            store::WriteOutcome::Inserted => WriteOutcome::Inserted,
            store::WriteOutcome::Updated => WriteOutcome::Updated,
            store::WriteOutcome::Unchanged => WriteOutcome::Unchanged,
        }
    }
}

impl From<store::ImportReport> for ImportSummary {
    fn from(report: store::ImportReport) -> Self {
        ImportSummary {
            imported: report.imported as u64,
            updated: report.updated as u64,
            unchanged: report.unchanged as u64,
            bad_lines: report
                .bad
                .into_iter()
                .map(|bad| BadLine {
                    line: bad.line,
                    reason: bad.reason,
                })
                .collect(),
        }
    }
}

impl From<store::UserSummary> for UserSummary {
    fn from(user: store::UserSummary) -> Self {
        UserSummary {
            user_id: user.user_id,
            items: user.items as u64,
            latest: user.latest,
        }
    }
}

impl Explanation {
    /// The effects of `user`'s item, with the share precomputed for the app.
    pub(crate) fn new(user: &str, item_id: &str, effects: effect::Effects) -> Self {
        Explanation {
            user_id: user.to_owned(),
            item_id: item_id.to_owned(),
            delta: effects.delta,
            history_used: effects.history_used as u64,
            preference_bearing_share: effects.preference_bearing_share(),
            tokens: effects
                .tokens
                .into_iter()
                .map(|t| TokenEffect {
                    token: t.token,
                    text: t.text,
                    logp_with: t.logp_with,
                    logp_without: t.logp_without,
                    delta_p: t.delta_p,
                    delta_logp: t.delta_logp,
                    preference_bearing: t.preference_bearing,
                    weight: t.weight,
                })
                .collect(),
        }
    }
}

impl TrainOptions {
    /// The engine's request; `threads` is the engine's own setting.
    pub(crate) fn to_request(&self, threads: usize) -> TrainRequest {
        let mut config = train::TrainConfig {
            objective: match self.objective {
                None | Some(TrainObjective::NextQuill) => Objective::nextquill(),
                Some(TrainObjective::Sft) => Objective::Sft,
            },
            learning_rate: self.learning_rate,
            warmup_steps: self.warmup_steps as usize,
            epochs: self.epochs as usize,
            seed: self.seed,
            threads,
            ..train::TrainConfig::default()
        };
        config.lora.rank = self.rank as usize;
        config.lora.alpha = self.alpha;
        TrainRequest {
            config,
            selection: match self.latest_items {
                Some(n) => ExampleSelection::Latest(n as usize),
                None => ExampleSelection::All,
            },
            ..TrainRequest::default()
        }
    }
}

impl From<train::Progress> for TrainEvent {
    fn from(progress: train::Progress) -> Self {
        match progress {
            train::Progress::Step {
                step,
                total_steps,
                epoch,
                loss,
                learning_rate,
                tokens_per_second,
                eta_seconds,
            } => TrainEvent::Step {
                step: step as u64,
                total_steps: total_steps as u64,
                epoch: epoch as u64,
                loss,
                learning_rate,
                tokens_per_second,
                eta_seconds,
            },
            train::Progress::Skipped { step, reason } => TrainEvent::Skipped {
                step: step as u64,
                reason,
            },
            train::Progress::Validation { epoch, loss, best } => TrainEvent::Validation {
                epoch: epoch as u64,
                loss,
                best,
            },
            train::Progress::Checkpoint { step, path } => TrainEvent::Checkpoint {
                step: step as u64,
                path: path.display().to_string(),
            },
        }
    }
}

impl From<store::AdapterRecord> for AdapterInfo {
    fn from(record: store::AdapterRecord) -> Self {
        AdapterInfo {
            user_id: record.user_id,
            version: record.version,
            objective: record.objective,
            active: record.active,
            created: record.created,
            path: record.path.display().to_string(),
            metrics_json: record.metrics.to_string(),
        }
    }
}

impl From<TrainedAdapter> for TrainResult {
    fn from(trained: TrainedAdapter) -> Self {
        let summary = trained.summary;
        let outcome = match (summary.completion, trained.activated) {
            (Completion::Stopped, _) => TrainOutcome::Stopped,
            (Completion::Finished, true) => TrainOutcome::Activated,
            (Completion::Finished, false) => TrainOutcome::Rejected,
        };
        TrainResult {
            outcome,
            steps: summary.steps as u64,
            first_loss: summary.first_loss,
            last_loss: summary.last_loss,
            seconds: summary.seconds,
            adapter: trained.record.map(AdapterInfo::from),
            gate_mean_kl: trained.gate.map(|gate| gate.mean_kl),
        }
    }
}

impl From<GenerateOptions> for llm::GenerateOptions {
    fn from(options: GenerateOptions) -> Self {
        llm::GenerateOptions {
            max_tokens: options.max_tokens as usize,
            sampling: if options.temperature > 0.0 {
                Sampling::Sample {
                    temperature: options.temperature,
                    top_p: options.top_p,
                    seed: options.seed,
                }
            } else {
                Sampling::Greedy
            },
            repetition_penalty: options.repetition_penalty,
        }
    }
}

impl From<llm::Generation> for GenerationResult {
    fn from(generation: llm::Generation) -> Self {
        GenerationResult {
            text: generation.text,
            tokens: generation.tokens.len() as u64,
            finish: match generation.finish {
                llm::FinishReason::EndOfGeneration => FinishReason::EndOfText,
                llm::FinishReason::MaxTokens => FinishReason::MaxTokens,
                llm::FinishReason::Stopped => FinishReason::Stopped,
            },
            prompt_tokens: generation.prompt_tokens as u64,
            prompt_seconds: generation.prompt_seconds,
            generate_seconds: generation.generate_seconds,
        }
    }
}

impl From<store::ForgetReport> for ForgetSummary {
    fn from(report: store::ForgetReport) -> Self {
        let mut deleted = 0;
        let mut left_for_app = Vec::new();
        for file in report.adapters {
            match file.disposal {
                store::FileDisposal::Deleted | store::FileDisposal::AlreadyGone => deleted += 1,
                store::FileDisposal::LeftForCaller => left_for_app.push(format!(
                    "{}: outside the engine's adapter folder",
                    file.path.display()
                )),
                store::FileDisposal::DeleteFailed(reason) => {
                    left_for_app.push(format!("{}: {reason}", file.path.display()))
                }
            }
        }
        ForgetSummary {
            user_id: report.user_id,
            items: report.items as u64,
            cached_effects: report.effects as u64,
            adapters: deleted,
            left_for_app,
        }
    }
}

impl From<&llm::ModelInfo> for ModelSummary {
    fn from(info: &llm::ModelInfo) -> Self {
        ModelSummary {
            path: info.path.display().to_string(),
            architecture: info.architecture.clone(),
            file_size: info.file_size,
            n_vocab: info.n_vocab,
            fingerprint: info.fingerprint.clone(),
        }
    }
}
