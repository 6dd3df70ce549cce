//! The app SDK: a UniFFI layer over [`Engine`] for Python, Kotlin and Swift.
//!
//! A thin facade like the CLI: each method converts its arguments, makes the
//! one engine call the CLI makes for the same command, and converts the
//! result. Nothing here decides anything about personalization.
//!
//! Three promises hold at this boundary:
//! - errors cross as [`NextquillError`], one variant per thing an app can act
//!   on, with the engine's message (which names the file or user and the fix);
//! - no panic reaches the app: every method runs inside [`error::guard`] and
//!   every listener call inside a [`listeners::Relay`];
//! - [`NextquillEngine`] is shared by every thread of the app. Each call opens
//!   its own llama.cpp session, so a training or a generation on one thread
//!   does not hold up reading users, history or effects on another. The one
//!   wait: loading a freshly trained adapter (at the end of `train`, or on
//!   first use) waits for generations running at that moment to end.
//!
//! The generated bindings live in `bindings/`; `scripts/bindings.sh`
//! regenerates them from the built library.

mod error;
mod listeners;
mod types;

use std::sync::Arc;

pub use error::NextquillError;
pub use listeners::{callback_self_test, SelfTestReport, TextListener, TrainListener};
pub use types::{
    AdapterInfo, BadLine, EngineConfig, Explanation, FinishReason, Flow, ForgetSummary,
    GenerateOptions, GenerationResult, HistoryItem, ImportSummary, ModelSummary, TokenEffect,
    TrainEvent, TrainObjective, TrainOptions, TrainOutcome, TrainResult, UserSummary, WriteOutcome,
};

use crate::engine::{Engine, EngineOptions};
use crate::store::{ImportFormat, ImportOptions};
use error::guard;
use listeners::Relay;

/// One app's personalization engine: the model, the user's history store and
/// their adapters. Open it once and share it; every method may be called from
/// any thread.
#[derive(Debug, uniffi::Object)]
pub struct NextquillEngine {
    engine: Engine,
}

#[uniffi::export]
impl NextquillEngine {
    /// Loads the GGUF model at `model_path` and opens (or creates) the SQLite
    /// history store at `database_path`. Trained adapters are kept in a folder
    /// `adapters` next to the store. Takes about a second for the default
    /// 98 MB model; call it off the UI thread.
    #[uniffi::constructor]
    pub fn open(
        database_path: String,
        model_path: String,
        config: EngineConfig,
    ) -> Result<Arc<Self>, NextquillError> {
        guard(|| {
            let mut options = EngineOptions::default();
            if let Some(threads) = config.threads {
                options.session.threads = threads as usize;
            }
            if let Some(tokens) = config.context_tokens {
                options.session.n_ctx = tokens;
                options.session.n_batch = tokens;
            }
            if let Some(items) = config.max_history_items {
                options.prompt.max_history_items = items as usize;
                options.history.max_items = items as usize;
            }
            if let Some(tokens) = config.max_response_tokens {
                options.max_response_tokens = tokens as usize;
            }
            let engine = Engine::open(model_path, database_path, options)?;
            Ok(Arc::new(NextquillEngine { engine }))
        })
    }

    /// Facts about the loaded model.
    pub fn model_info(&self) -> ModelSummary {
        ModelSummary::from(self.engine.model().info())
    }

    /// Adds (or, for a known item id, replaces) one of a user's texts.
    pub fn add_item(&self, item: HistoryItem) -> Result<WriteOutcome, NextquillError> {
        guard(|| Ok(self.engine.store().insert_item(&item.into())?.into()))
    }

    /// Imports history from JSONL text: per-user lines with a `history` list,
    /// or one item per line. Bad lines are listed and skipped.
    pub fn import_jsonl(&self, jsonl: String) -> Result<ImportSummary, NextquillError> {
        guard(|| {
            let options = ImportOptions {
                format: ImportFormat::Jsonl,
                default_source: Some("app".into()),
                ..ImportOptions::default()
            };
            let report =
                self.engine
                    .store()
                    .import_reader(jsonl.as_bytes(), &options, &mut |_| {})?;
            Ok(report.into())
        })
    }

    /// Imports a history file: CSV for a `.csv` name, JSONL otherwise.
    pub fn import_file(&self, path: String) -> Result<ImportSummary, NextquillError> {
        guard(|| {
            let report = self
                .engine
                .store()
                .import_file(path, &ImportOptions::default())?;
            Ok(report.into())
        })
    }

    /// Every user in the store, by id.
    pub fn users(&self) -> Result<Vec<UserSummary>, NextquillError> {
        guard(|| {
            let users = self.engine.store().users()?;
            Ok(users.into_iter().map(UserSummary::from).collect())
        })
    }

    /// A user's texts, oldest first.
    pub fn history(&self, user_id: String) -> Result<Vec<HistoryItem>, NextquillError> {
        guard(|| {
            let items = self.engine.store().items(&user_id)?;
            Ok(items.into_iter().map(HistoryItem::from).collect())
        })
    }

    /// Deletes one of a user's texts; false when it was not stored.
    pub fn delete_item(&self, user_id: String, item_id: String) -> Result<bool, NextquillError> {
        guard(|| {
            Ok(self
                .engine
                .store()
                .delete_item(&user_id, &item_id)?
                .is_some())
        })
    }

    /// Which tokens of one of the user's texts their history caused: per
    /// token, its probability with and without their older texts in the
    /// prompt. Cached in the store; a history write drops the user's cache.
    pub fn explain(&self, user_id: String, item_id: String) -> Result<Explanation, NextquillError> {
        guard(|| {
            let effects = self.engine.explain(&user_id, &item_id)?;
            Ok(Explanation::new(&user_id, &item_id, effects))
        })
    }

    /// Trains the user's adapter on their own texts and activates it if it
    /// passes the sanity gate. Blocks for the whole run (seconds per step on a
    /// phone): call it from a background thread. `listener` hears every step
    /// and can stop the run; a stopped run keeps the previous adapter active.
    pub fn train(
        &self,
        user_id: String,
        options: TrainOptions,
        listener: Box<dyn TrainListener>,
    ) -> Result<TrainResult, NextquillError> {
        guard(|| {
            let request = options.to_request(self.engine.options().session.threads);
            let mut relay = Relay::new();
            let trained = {
                let mut progress = relay.progress(listener.as_ref());
                self.engine.train_user(&user_id, &request, &mut progress)
            };
            relay.finish(trained.map(TrainResult::from).map_err(NextquillError::from))
        })
    }

    /// Generates text for `request`. With a `user_id`: their newest texts in
    /// the prompt and their active adapter applied. Without: generic text from
    /// the base model. New text streams to `listener` as it is produced.
    pub fn generate(
        &self,
        user_id: Option<String>,
        request: String,
        options: GenerateOptions,
        listener: Option<Box<dyn TextListener>>,
    ) -> Result<GenerationResult, NextquillError> {
        guard(|| {
            let mut relay = Relay::new();
            let generation = {
                let mut on_text = relay.text(listener.as_deref());
                self.engine
                    .generate(user_id.as_deref(), &request, &options.into(), &mut on_text)
            };
            relay.finish(
                generation
                    .map(GenerationResult::from)
                    .map_err(NextquillError::from),
            )
        })
    }

    /// The user's adapters, oldest version first.
    pub fn adapters(&self, user_id: String) -> Result<Vec<AdapterInfo>, NextquillError> {
        guard(|| {
            let records = self.engine.store().adapters(&user_id)?;
            Ok(records.into_iter().map(AdapterInfo::from).collect())
        })
    }

    /// Makes adapter `version` the one personalized generation applies,
    /// loading it first so that a broken file is refused here, not later.
    pub fn activate_adapter(&self, user_id: String, version: i64) -> Result<(), NextquillError> {
        guard(|| {
            let record = self.engine.adapter_record(&user_id, Some(version))?;
            self.engine.load(&record)?;
            Ok(self.engine.store().activate_adapter(&user_id, version)?)
        })
    }

    /// Personalized generation uses the base model (with the history) from now on.
    pub fn deactivate_adapters(&self, user_id: String) -> Result<(), NextquillError> {
        guard(|| Ok(self.engine.store().deactivate_adapters(&user_id)?))
    }

    /// Writes adapter `version` (the active one for `None`) in the PEFT layout
    /// (`adapter_config.json` + safetensors) into the folder `directory`.
    pub fn export_adapter_peft(
        &self,
        user_id: String,
        version: Option<i64>,
        directory: String,
    ) -> Result<AdapterInfo, NextquillError> {
        guard(|| {
            let record =
                self.engine
                    .export_peft(&user_id, version, std::path::Path::new(&directory))?;
            Ok(record.into())
        })
    }

    /// The user's texts as one JSONL line that [`NextquillEngine::import_jsonl`]
    /// reads back unchanged: what a "download my data" button hands over.
    pub fn export_user(&self, user_id: String) -> Result<String, NextquillError> {
        guard(|| {
            let mut out = Vec::new();
            self.engine.store().export_user(&user_id, &mut out)?;
            String::from_utf8(out)
                .map_err(|e| NextquillError::Internal(format!("export was not UTF-8: {e}")))
        })
    }

    /// Removes every trace of the user: texts (securely deleted), cached
    /// effects, adapter files and training checkpoints.
    pub fn forget(&self, user_id: String) -> Result<ForgetSummary, NextquillError> {
        guard(|| Ok(self.engine.forget(&user_id)?.into()))
    }
}
