//! The adapter lifecycle of the engine: train a user's adapter, gate it,
//! register and activate it, load it into the model for generation, export it.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{AdapterChoice, Engine, ExampleSelection, ItemPrompt};
use crate::adapter::{self, AdapterMeta};
use crate::llm::{AdapterId, Role, ScoreOptions, TokenId};
use crate::store::{AdapterRecord, NewAdapter};
use crate::train::{CheckpointConfig, WeightSource};
use crate::train::{Completion, Control, Objective, Progress, TrainConfig, TrainSummary, Trainer};
use crate::{Error, Result};

/// Requests whose next-token distributions the sanity gate compares: nothing
/// personal, so a healthy adapter moves them little.
const NEUTRAL_PROMPTS: [(&str, &str); 3] = [
    (
        "What is the capital of France?",
        "The capital of France is Paris, a city on the Seine.",
    ),
    (
        "List three colours.",
        "Here are three colours: red, green and blue.",
    ),
    (
        "Explain in one sentence what a calendar is for.",
        "A calendar helps people keep track of days, weeks and months.",
    ),
];

/// The check a freshly trained adapter must pass before it is activated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SanityGate {
    /// Largest mean KL divergence (nats per token) from the base model's
    /// next-token distributions on neutral prompts. Default 1.0.
    pub max_mean_kl: f32,
}

impl Default for SanityGate {
    fn default() -> Self {
        SanityGate { max_mean_kl: 1.0 }
    }
}

/// What the sanity gate measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateReport {
    /// Whether every log-probability of the adapted model was finite.
    pub finite: bool,
    /// Mean KL(base ‖ adapted) per token on the neutral prompts, in nats.
    pub mean_kl: f32,
    /// Whether the adapter passed.
    pub passed: bool,
}

/// How a user's adapter is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRequest {
    /// Objective, adapter shape and optimizer. A checkpoint folder under the
    /// engine's adapter folder is used when it names none.
    pub config: TrainConfig,
    /// Which of the user's items become examples. Default all.
    pub selection: ExampleSelection,
    /// The check before activation.
    pub gate: SanityGate,
    /// Versions of the owner's adapters kept on disk (the active one always). Default 3.
    pub keep_versions: usize,
}

impl Default for TrainRequest {
    fn default() -> Self {
        TrainRequest {
            config: TrainConfig::default(),
            selection: ExampleSelection::All,
            gate: SanityGate::default(),
            keep_versions: 3,
        }
    }
}

/// What a training call produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainedAdapter {
    /// The run's numbers.
    pub summary: TrainSummary,
    /// The registered adapter; `None` when the run was stopped before the end
    /// (its checkpoint stays, and the next call with the same request resumes it).
    pub record: Option<AdapterRecord>,
    /// The gate's measurement, when an adapter was registered.
    pub gate: Option<GateReport>,
    /// Whether the new adapter is now the owner's active one.
    pub activated: bool,
}

impl Engine {
    /// Trains `user`'s adapter on their own items, registers it and, if the
    /// sanity gate passes, activates it; otherwise the previous adapter stays
    /// active. `progress` hears every step and can stop the run.
    pub fn train_user(
        &self,
        user: &str,
        request: &TrainRequest,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<TrainedAdapter> {
        let examples = self.training_examples(user, request.selection)?;
        if examples.is_empty() {
            return Err(Error::InvalidArgument {
                name: "user",
                reason: format!(
                    "user {user} has no item with an older item to serve as history; \
                     import at least two texts first"
                ),
            });
        }
        self.train_adapter(user, &examples, request, progress)
    }

    /// Where training checkpoints of `owner`'s adapters with `objective` are
    /// kept unless the request names another folder.
    pub fn checkpoint_dir(&self, owner: &str, objective: &Objective) -> PathBuf {
        owner_dir(&self.adapter_dir, owner)
            .join(format!("checkpoint-{}", objective_name(objective)))
    }

    /// Trains one adapter on `examples` (of one user or many) and registers it
    /// under `owner` (a user id, or [`crate::store::SHARED_ADAPTER_USER`]).
    pub fn train_adapter(
        &self,
        owner: &str,
        examples: &[ItemPrompt],
        request: &TrainRequest,
        progress: &mut dyn FnMut(Progress) -> Control,
    ) -> Result<TrainedAdapter> {
        let objective = objective_name(&request.config.objective);
        let owner_dir = owner_dir(&self.adapter_dir, owner);
        std::fs::create_dir_all(&owner_dir).map_err(|e| Error::io(&owner_dir, e))?;
        let mut config = request.config.clone();
        if config.checkpoint.is_none() {
            config.checkpoint = Some(CheckpointConfig::new(
                self.checkpoint_dir(owner, &config.objective),
            ));
        }

        let fixed = matches!(
            config.objective,
            Objective::NextQuill {
                weights: WeightSource::Fixed,
                ..
            }
        );
        let mut train_examples = Vec::with_capacity(examples.len());
        for example in examples {
            let effects = match fixed {
                true => Some(self.explain(&example.user, &example.item_id)?),
                false => None,
            };
            train_examples.push(example.to_train_example(effects.as_ref()));
        }

        let model_path = self.model().info().path.clone();
        let trainer = Trainer::new(&model_path, config.clone())?;
        let outcome = trainer.train(&train_examples, &[], progress)?;
        drop(trainer);
        if outcome.summary.completion == Completion::Stopped {
            return Ok(TrainedAdapter {
                summary: outcome.summary,
                record: None,
                gate: None,
                activated: false,
            });
        }

        let training = summary_json(&outcome.summary, &config, examples.len());
        let meta = AdapterMeta::for_model(self.model().info(), objective, training.clone());
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let path = owner_dir.join(format!("{objective}-{stamp}.gguf"));
        adapter::write_gguf(&outcome.weights, &meta, &path)?;
        let record = self.store.register_adapter(
            owner,
            &NewAdapter {
                path: path.clone(),
                objective: objective.into(),
                metrics: training,
                file_sha256: file_sha256(&path)?,
                base_fingerprint: self.model().fingerprint().to_owned(),
            },
        )?;
        if let Some(checkpoint) = &config.checkpoint {
            // The run is in the registry now; a later run starts afresh.
            let _ = std::fs::remove_dir_all(&checkpoint.dir);
        }

        let id = self.load(&record)?;
        let gate = self.sanity_check(id, &request.gate)?;
        if gate.passed {
            self.store.activate_adapter(owner, record.version)?;
        } else {
            tracing::warn!(
                owner,
                version = record.version,
                mean_kl = gate.mean_kl,
                finite = gate.finite,
                "the new adapter failed the sanity gate; the previous one stays active"
            );
        }
        self.store
            .prune_adapters(owner, request.keep_versions.max(1))?;
        let record = self
            .store
            .adapters(owner)?
            .into_iter()
            .find(|r| r.version == record.version)
            .unwrap_or(record);
        Ok(TrainedAdapter {
            summary: outcome.summary,
            activated: record.active,
            record: Some(record),
            gate: Some(gate),
        })
    }

    /// Compares the adapted model with the base on neutral prompts.
    pub fn sanity_check(&self, adapter: AdapterId, gate: &SanityGate) -> Result<GateReport> {
        let model = self.model();
        let mut cases: Vec<(Vec<TokenId>, Vec<TokenId>)> = Vec::new();
        for (request, answer) in NEUTRAL_PROMPTS {
            let prompt = model.render_chat(&[(Role::User, request)], true)?;
            cases.push((model.tokenize_markup(&prompt), model.tokenize_text(answer)));
        }
        drop(model);
        let options = ScoreOptions {
            distributions: true,
            ..ScoreOptions::default()
        };
        let mut finite = true;
        let (mut kl_sum, mut positions) = (0.0f64, 0usize);
        self.with_session(|session| {
            for (prompt, answer) in &cases {
                session.set_adapter(None, 0.0)?;
                let base = session.score(&[prompt], answer, &options)?;
                session.set_adapter(Some(adapter), 1.0)?;
                let adapted = session.score(&[prompt], answer, &options)?;
                let (Some(p), Some(q)) = (
                    base.prompts[0].log_distributions.as_ref(),
                    adapted.prompts[0].log_distributions.as_ref(),
                ) else {
                    continue;
                };
                finite &= q.iter().all(|v| !v.is_nan() && *v != f32::INFINITY);
                let n_vocab = p.len() / answer.len().max(1);
                for (row_p, row_q) in p.chunks(n_vocab).zip(q.chunks(n_vocab)) {
                    kl_sum += kl(row_p, row_q);
                    positions += 1;
                }
            }
            Ok(())
        })?;
        let mean_kl = (kl_sum / positions.max(1) as f64) as f32;
        let passed = finite && mean_kl.is_finite() && mean_kl <= gate.max_mean_kl;
        Ok(GateReport {
            finite,
            mean_kl,
            passed,
        })
    }

    /// The adapter id of `choice`, loading the file into the model on first use.
    pub(super) fn resolve_adapter(&self, choice: &AdapterChoice<'_>) -> Result<Option<AdapterId>> {
        match choice {
            AdapterChoice::None => Ok(None),
            AdapterChoice::Record(record) => self.load(record).map(Some),
            AdapterChoice::ActiveOf(user) => match self.store.active_adapter(user)? {
                Some(record) => self.load(&record).map(Some),
                None => Ok(None),
            },
        }
    }

    /// Loads a registered adapter into the model once; later calls reuse it.
    ///
    /// Refused when it was trained on another base model, or when the file
    /// changed since it was registered.
    pub fn load(&self, record: &AdapterRecord) -> Result<AdapterId> {
        let loaded = |engine: &Engine| {
            engine
                .loaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&record.file_sha256)
                .copied()
        };
        if let Some(id) = loaded(self) {
            return Ok(id);
        }
        let fingerprint = self.model().fingerprint().to_owned();
        if record.base_fingerprint != fingerprint {
            return Err(Error::AdapterBaseMismatch {
                path: record.path.clone(),
                expected: fingerprint,
                found: record.base_fingerprint.clone(),
            });
        }
        let found = file_sha256(&record.path)?;
        if found != record.file_sha256 {
            return Err(Error::InvalidAdapter {
                path: record.path.clone(),
                reason: "the file changed since it was registered (its SHA-256 differs); \
                         train the adapter again"
                    .into(),
            });
        }
        // Loading needs the model to itself: wait for running calls to end.
        let mut model = self.model.write().unwrap_or_else(|p| p.into_inner());
        let mut cache = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = cache.get(&record.file_sha256) {
            return Ok(*id);
        }
        let id = model.load_adapter(&record.path)?;
        cache.insert(record.file_sha256.clone(), id);
        Ok(id)
    }

    /// Removes every trace of `user`: their rows in the store (with secure
    /// delete), their adapter files and their training checkpoints.
    pub fn forget(&self, user: &str) -> Result<crate::store::ForgetReport> {
        let report = self.store.forget(user)?;
        remove_owner_dir(&self.adapter_dir, user)?;
        Ok(report)
    }

    /// Writes a registered adapter of `owner` (the active one when `version`
    /// is `None`) in the PEFT layout into `dir`.
    pub fn export_peft(
        &self,
        owner: &str,
        version: Option<i64>,
        dir: &Path,
    ) -> Result<AdapterRecord> {
        let record = self.adapter_record(owner, version)?;
        let (weights, meta) = adapter::read_gguf(&record.path)?;
        let info = self.model().info().clone();
        adapter::export_peft(
            &weights,
            &meta,
            info.n_head as usize,
            info.n_head_kv as usize,
            dir,
        )?;
        Ok(record)
    }

    /// The owner's adapter `version`, or their active one for `None`.
    pub fn adapter_record(&self, owner: &str, version: Option<i64>) -> Result<AdapterRecord> {
        let records = self.store.adapters(owner)?;
        let found = match version {
            Some(v) => records.into_iter().find(|r| r.version == v),
            None => records.into_iter().find(|r| r.active),
        };
        found.ok_or_else(|| Error::UnknownAdapter {
            user: owner.to_owned(),
            version: version.unwrap_or(0),
        })
    }
}

/// The name an objective is registered and written under.
pub fn objective_name(objective: &Objective) -> &'static str {
    match objective {
        Objective::NextQuill { .. } => "nextquill",
        Objective::Sft => "sft",
    }
}

/// KL(p ‖ q) of two log-distributions, in nats.
fn kl(log_p: &[f32], log_q: &[f32]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .filter(|(lp, _)| lp.is_finite())
        .map(|(&lp, &lq)| {
            let p = (lp as f64).exp();
            p * (lp as f64 - lq as f64)
        })
        .sum::<f64>()
        .max(0.0)
}

/// The folder under `adapter_dir` that holds `owner`'s adapters and training
/// checkpoints: the id's safe characters plus a short hash, so that two ids
/// never share a folder and no id escapes the adapter folder.
pub fn owner_dir(adapter_dir: &Path, owner: &str) -> PathBuf {
    adapter_dir.join(path_component(owner))
}

fn path_component(owner: &str) -> String {
    let safe: String = owner
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(40)
        .collect();
    let hash = hex::encode(&Sha256::digest(owner.as_bytes())[..4]);
    format!("{safe}-{hash}")
}

fn file_sha256(path: &PathBuf) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn summary_json(
    summary: &TrainSummary,
    config: &TrainConfig,
    examples: usize,
) -> serde_json::Value {
    serde_json::json!({
        "examples": examples,
        "steps": summary.steps,
        "skipped_non_finite": summary.skipped_non_finite,
        "truncated_examples": summary.truncated_examples,
        "dropped_examples": summary.dropped_examples,
        "first_loss": summary.first_loss,
        "last_loss": summary.last_loss,
        "seconds": summary.seconds,
        "tokens_per_second": summary.tokens_per_second,
        "rank": config.lora.rank,
        "alpha": config.lora.alpha,
        "targets": config.lora.targets.iter().map(|t| t.peft_name()).collect::<Vec<_>>(),
        "learning_rate": config.learning_rate,
        "epochs": config.epochs,
        "seed": config.seed,
    })
}

/// Deletes `owner`'s folder of adapters and checkpoints, if there is one.
pub fn remove_owner_dir(adapter_dir: &Path, owner: &str) -> Result<()> {
    let dir = owner_dir(adapter_dir, owner);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&dir, e)),
    }
}
