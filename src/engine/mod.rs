//! One object that runs the whole loop for an app: the model, the user's
//! history store and the settings that tie them together.
//!
//! The CLI and the FFI layer are thin facades over [`Engine`]; every step of
//! personalization (history in, effects, training examples, personalized
//! generation) goes through it, so the prompts that effects are measured on,
//! that adapters are trained on and that generation runs on are built by the
//! same code.

mod personalize;

pub use personalize::{
    objective_name, owner_dir, remove_owner_dir, GateReport, SanityGate, TrainRequest,
    TrainedAdapter,
};

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::effect::{self, EffectConfig, Effects, Profile};
use crate::llm::{
    AdapterId, GenerateOptions, Generation, Model, ModelOptions, Session, SessionOptions, TokenId,
};
use crate::prompt::{self, PastText, PromptConfig, PromptPair, TEMPLATE_VERSION};
use crate::store::{AdapterRecord, HistoryQuery, Item, Store, StoreOptions};
use crate::train::TrainExample;
use crate::{Error, Result};

/// How an [`Engine`] builds prompts, measures effects and sizes its sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    /// Context, batch and threads of every llama.cpp session.
    pub session: SessionOptions,
    /// The prompt layout (instruction, history budget, words per past text).
    pub prompt: PromptConfig,
    /// How history is chosen (recency by default, or BM25).
    pub history: HistoryQuery,
    /// δ, λ, ε and whether to compute divergences.
    pub effect: EffectConfig,
    /// A user text longer than this many tokens is cut for effects and
    /// training. Default 100 (the NextQuill reference protocol).
    pub max_response_tokens: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            session: SessionOptions::default(),
            prompt: PromptConfig::default(),
            history: HistoryQuery::default(),
            effect: EffectConfig::default(),
            max_response_tokens: 100,
        }
    }
}

impl EngineOptions {
    /// The settings of the NextQuill reference run (`../shared/DESIGN.md`):
    /// at most the 4 most recent older items as history, each text cut to 80
    /// words, responses cut to 100 tokens.
    pub fn reference() -> Self {
        let mut options = EngineOptions::default();
        options.prompt.max_history_items = 4;
        options.prompt.max_words_per_text = Some(80);
        options.history.max_items = 4;
        options.history.token_budget = None;
        options.max_response_tokens = 100;
        options
    }
}

/// The prompt pair of one history item and the user's text that answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemPrompt {
    /// The user who wrote the item.
    pub user: String,
    /// The item.
    pub item_id: String,
    /// The with-history and counterfactual prompts.
    pub pair: PromptPair,
    /// The user's text as token ids (cut to `max_response_tokens`).
    pub response: Vec<TokenId>,
    /// Ids of the history items shown in the with-history prompt, oldest first.
    pub history_items: Vec<String>,
}

/// Which items of a user become training examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExampleSelection {
    /// Every item that has at least one older item to serve as history.
    All,
    /// The `n` most recent such items (the reference protocol takes 3).
    Latest(usize),
}

/// The model, the history store and the settings of one app.
///
/// `Engine` is `Send + Sync`; each call opens its own llama.cpp session, so
/// calls from several threads do not wait on each other beyond the store's
/// connection pool. Loading a newly trained adapter into the model waits for
/// the calls that are running on the model to end.
#[derive(Debug)]
pub struct Engine {
    model: RwLock<Model>,
    store: Store,
    options: EngineOptions,
    /// Where trained adapters and training checkpoints are written.
    adapter_dir: PathBuf,
    /// Adapters loaded into the model, by file hash.
    loaded: Mutex<HashMap<String, AdapterId>>,
}

impl Engine {
    /// Loads the model at `model_path` and opens (or creates) the store at
    /// `store_path`. Adapters are kept in the folder `adapters` next to the
    /// store, which the store owns: forgetting a user deletes their files there.
    pub fn open(
        model_path: impl AsRef<Path>,
        store_path: impl AsRef<Path>,
        options: EngineOptions,
    ) -> Result<Engine> {
        let store_path = store_path.as_ref();
        let adapter_dir = store_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("adapters");
        std::fs::create_dir_all(&adapter_dir).map_err(|e| Error::io(&adapter_dir, e))?;
        let model = Model::load(model_path, &ModelOptions::default())?;
        let store = Store::open(
            store_path,
            StoreOptions {
                managed_adapter_dir: Some(adapter_dir.clone()),
                ..StoreOptions::default()
            },
        )?;
        Engine::new(model, store, adapter_dir, options)
    }

    /// An engine over an already loaded model and opened store, writing
    /// adapters into `adapter_dir` (created when missing). Give the store the
    /// same folder as its `managed_adapter_dir` so that forgetting a user
    /// deletes their adapter files.
    pub fn new(
        model: Model,
        store: Store,
        adapter_dir: impl Into<PathBuf>,
        options: EngineOptions,
    ) -> Result<Engine> {
        let adapter_dir = adapter_dir.into();
        std::fs::create_dir_all(&adapter_dir).map_err(|e| Error::io(&adapter_dir, e))?;
        options.effect.validate()?;
        options.history.validate()?;
        if options.max_response_tokens == 0 {
            return Err(Error::InvalidArgument {
                name: "max_response_tokens",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Engine {
            model: RwLock::new(model),
            store,
            options,
            adapter_dir,
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// The model, shared with the calls running on it.
    pub fn model(&self) -> RwLockReadGuard<'_, Model> {
        self.model
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The folder trained adapters are written to.
    pub fn adapter_dir(&self) -> &Path {
        &self.adapter_dir
    }

    /// The history store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The settings.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Runs `f` on a fresh llama.cpp session over the engine's model.
    pub fn with_session<R>(&self, f: impl FnOnce(&mut Session<'_>) -> Result<R>) -> Result<R> {
        let model = self.model();
        let mut session = Session::new(&model, self.options.session.clone())?;
        f(&mut session)
    }

    /// `user`'s history for a request, oldest first: for `before = Some(item)`
    /// only items strictly older than that item.
    pub fn history(&self, user: &str, before: Option<&str>) -> Result<Vec<Item>> {
        let model = self.model();
        let count = |text: &str| model.tokenize_text(text).len();
        self.store
            .history_for(user, before, &self.options.history, &count)
    }

    /// The prompt pair for one of `user`'s items: the history strictly older
    /// than it, the item's request, and the user's text as the response.
    pub fn item_prompt(&self, user: &str, item_id: &str) -> Result<ItemPrompt> {
        let item = self
            .store
            .item(user, item_id)?
            .ok_or_else(|| Error::UnknownItem {
                user: user.to_owned(),
                item: item_id.to_owned(),
            })?;
        let history = self.history(user, Some(item_id))?;
        let mut response = self.model().tokenize_text(&item.text);
        response.truncate(self.options.max_response_tokens);
        if response.is_empty() {
            return Err(Error::InvalidArgument {
                name: "item",
                reason: format!("item {item_id} of user {user} has an empty text"),
            });
        }
        let pair = self.pair_for(&history, &item.request, response.len())?;
        let shown = &history[history.len() - pair.history_used..];
        Ok(ItemPrompt {
            user: user.to_owned(),
            item_id: item_id.to_owned(),
            history_items: shown.iter().map(|i| i.item_id.clone()).collect(),
            pair,
            response,
        })
    }

    fn pair_for(
        &self,
        history: &[Item],
        request: &str,
        response_tokens: usize,
    ) -> Result<PromptPair> {
        let past: Vec<PastText<'_>> = history
            .iter()
            .map(|item| PastText {
                request: &item.request,
                text: &item.text,
            })
            .collect();
        prompt::build_pair(
            &self.model(),
            &self.options.prompt,
            &past,
            request,
            response_tokens,
            self.options.session.n_ctx as usize,
        )
    }

    /// The causal preference effects of one of `user`'s texts, from the cache
    /// when this model, history selection and prompt layout measured them before.
    pub fn explain(&self, user: &str, item_id: &str) -> Result<Effects> {
        let prompt = self.item_prompt(user, item_id)?;
        let key = self.effect_key(user, item_id, &prompt);
        if let Some(payload) = self.store.get_effects(&key)? {
            match serde_json::from_slice::<Effects>(&payload) {
                Ok(effects) => return Ok(effects),
                Err(e) => tracing::warn!(%e, "ignoring an unreadable cached effect"),
            }
        }
        let effects = self.with_session(|session| {
            effect::measure(
                session,
                &prompt.pair,
                &prompt.response,
                &self.options.effect,
            )
        })?;
        let payload = serde_json::to_vec(&effects).map_err(|e| Error::InvalidArgument {
            name: "effects",
            reason: format!("cannot serialize: {e}"),
        })?;
        self.store.put_effects(&key, user, item_id, &payload)?;
        Ok(effects)
    }

    /// The cache key: everything the effects depend on.
    fn effect_key(&self, user: &str, item_id: &str, prompt: &ItemPrompt) -> String {
        let mut hash = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        field(self.model().fingerprint().as_bytes());
        field(user.as_bytes());
        field(item_id.as_bytes());
        field(prompt.history_items.join("\u{1f}").as_bytes());
        field(&TEMPLATE_VERSION.to_le_bytes());
        field(format!("{:?}", self.options.prompt).as_bytes());
        field(format!("{:?}", self.options.effect).as_bytes());
        field(&(prompt.response.len() as u64).to_le_bytes());
        hex::encode(hash.finalize())
    }

    /// What `user`'s history makes them say: over all their items that have an
    /// older item, the words and phrases with the largest mean effect.
    pub fn profile(&self, user: &str, min_count: usize, top: usize) -> Result<Profile> {
        let items = self.store.items(user)?;
        let mut all = Vec::new();
        for item in items.iter().skip(1) {
            all.push(self.explain(user, &item.item_id)?);
        }
        Ok(effect::profile(&all, min_count, top))
    }

    /// Training examples from `user`'s items: each item with at least one
    /// older item becomes an example whose history is only older items.
    pub fn training_examples(
        &self,
        user: &str,
        selection: ExampleSelection,
    ) -> Result<Vec<ItemPrompt>> {
        let items = self.store.items(user)?;
        let eligible = items.iter().skip(1);
        let chosen: Vec<&Item> = match selection {
            ExampleSelection::All => eligible.collect(),
            ExampleSelection::Latest(n) => {
                let all: Vec<&Item> = eligible.collect();
                all[all.len().saturating_sub(n)..].to_vec()
            }
        };
        chosen
            .into_iter()
            .map(|item| self.item_prompt(user, &item.item_id))
            .collect()
    }

    /// Generates `user`'s text for a new `request`: their most recent history
    /// in the prompt and their active adapter applied (the base model when they
    /// have none). `user = None` generates generic text: no history, no adapter.
    /// Text pieces stream to `on_text`.
    pub fn generate(
        &self,
        user: Option<&str>,
        request: &str,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let plan = match user {
            Some(user) => GenerationPlan::personalized(user),
            None => GenerationPlan::generic(),
        };
        self.generate_with(&plan, request, options, on_text)
    }

    /// Generates text for `request` with the history and adapter `plan` names.
    pub fn generate_with(
        &self,
        plan: &GenerationPlan<'_>,
        request: &str,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let history = match plan.history_of {
            Some(user) => self.history(user, plan.before_item)?,
            None => Vec::new(),
        };
        let adapter = self.resolve_adapter(&plan.adapter)?;
        let pair = self.pair_for(&history, request, options.max_tokens)?;
        let prompt = if plan.history_of.is_some() {
            pair.with_history
        } else {
            pair.counterfactual
        };
        self.with_session(|session| {
            if let Some(id) = adapter {
                session.set_adapter(Some(id), 1.0)?;
            }
            session.generate(&prompt, options, on_text)
        })
    }
}

/// What a generation puts in the prompt and which adapter it applies.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationPlan<'a> {
    /// Whose history the prompt shows; `None` shows none (the counterfactual prompt).
    pub history_of: Option<&'a str>,
    /// Only history strictly older than this item of that user (for evaluation).
    pub before_item: Option<&'a str>,
    /// The adapter applied.
    pub adapter: AdapterChoice<'a>,
}

impl<'a> GenerationPlan<'a> {
    /// The user's history and their active adapter.
    pub fn personalized(user: &'a str) -> Self {
        GenerationPlan {
            history_of: Some(user),
            before_item: None,
            adapter: AdapterChoice::ActiveOf(user),
        }
    }

    /// No history and the base model.
    pub fn generic() -> Self {
        GenerationPlan {
            history_of: None,
            before_item: None,
            adapter: AdapterChoice::None,
        }
    }
}

/// Which adapter a generation applies.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterChoice<'a> {
    /// The base model alone.
    None,
    /// The user's active adapter, or the base model when they have none.
    ActiveOf(&'a str),
    /// This registered adapter.
    Record(&'a AdapterRecord),
}

impl ItemPrompt {
    /// The example the trainer takes, with the NextQuill weights precomputed
    /// from `effects` when given (for [`crate::train::WeightSource::Fixed`]).
    pub fn to_train_example(&self, effects: Option<&Effects>) -> TrainExample {
        TrainExample {
            with_history: self.pair.with_history.clone(),
            counterfactual: self.pair.counterfactual.clone(),
            response: self.response.clone(),
            fixed_weights: effects.map(|e| e.tokens.iter().map(|t| t.weight).collect()),
        }
    }
}

/// Where the CLI keeps a user's data when no path is given: the platform's
/// data folder (`$XDG_DATA_HOME/nextquill` or `~/.local/share/nextquill`).
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("nextquill");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/share/nextquill");
    }
    PathBuf::from(".nextquill")
}
