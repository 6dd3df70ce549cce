//! The personalization benchmark: for each test user the last item is the
//! text to write, and only older items train adapters or serve as history.
//!
//! Methods: `base` (the counterfactual prompt, no history), `history`
//! (history in the prompt, no training), `sft` and `nextquill` (history in
//! the prompt plus an adapter trained with that objective). Regimes: one
//! adapter shared by all users (the NextQuill paper's and the reference
//! run's) and one adapter per test user (as on a phone).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::metrics::{
    bootstrap_mean_ci, corpus_bleu, meteor, paired_bootstrap_diff_ci, rouge1_f1, rouge_l_f1,
    BootstrapConfig, Interval,
};
use crate::engine::{AdapterChoice, Engine, GenerationPlan, ItemPrompt, SanityGate, TrainRequest};
use crate::llm::{GenerateOptions, Sampling};
use crate::store::{AdapterRecord, SHARED_ADAPTER_USER};
use crate::train::{CheckpointConfig, Control, Objective, Progress, ResumePolicy, TrainConfig};
use crate::{Error, Result};

/// What a prompt holds and which adapter is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// No history, no adapter (the counterfactual prompt).
    Base,
    /// History in the prompt, no adapter.
    History,
    /// History in the prompt and an SFT adapter.
    Sft,
    /// History in the prompt and a NextQuill adapter.
    Nextquill,
}

impl Method {
    /// Every method, in table order.
    pub const ALL: [Method; 4] = [
        Method::Base,
        Method::History,
        Method::Sft,
        Method::Nextquill,
    ];

    /// The method's name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Method::Base => "base",
            Method::History => "history",
            Method::Sft => "sft",
            Method::Nextquill => "nextquill",
        }
    }
}

/// Which adapters the trained methods use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Regime {
    /// One adapter per objective, trained on every user's latest items before
    /// their test item.
    Shared,
    /// One adapter per objective and test user, trained on that user's items
    /// before the test item.
    PerUser,
}

/// How text is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decoding {
    /// Greedy, repetition penalty 1.2 (the reference run's decoding).
    Greedy,
    /// Temperature 0.8, top-p 0.95, repetition penalty 1.2, a fixed seed per user.
    Sample,
}

impl Decoding {
    fn options(self, max_tokens: usize, seed: u32) -> GenerateOptions {
        GenerateOptions {
            max_tokens,
            sampling: match self {
                Decoding::Greedy => Sampling::Greedy,
                Decoding::Sample => Sampling::Sample {
                    temperature: 0.8,
                    top_p: 0.95,
                    seed,
                },
            },
            repetition_penalty: 1.2,
        }
    }
}

/// A benchmark run's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalConfig {
    /// The regimes to run. Default both.
    pub regimes: Vec<Regime>,
    /// The decodings. Default greedy and sampling.
    pub decodings: Vec<Decoding>,
    /// Users whose last item is tested: the first `test_users` in id order
    /// among those with at least two items. Default 50.
    pub test_users: usize,
    /// Examples per user for the shared adapter: that many latest items
    /// before the test item. Default 3 (the reference run).
    pub shared_examples_per_user: usize,
    /// Training of the shared adapters (objective is set per method).
    /// Default: rank 8, alpha 16, q and v, lr 2e-4, 10 warmup steps, one epoch.
    pub shared_training: TrainConfig,
    /// Training of the per-user adapters: every item before the test item,
    /// Default as shared but 3 epochs, lr 5e-4 and 2 warmup steps, since a
    /// user has only a handful of items.
    pub per_user_training: TrainConfig,
    /// Most new tokens of a generation. Default 100.
    pub max_new_tokens: usize,
    /// Bootstrap of the intervals.
    pub bootstrap: BootstrapConfig,
}

impl Default for EvalConfig {
    fn default() -> Self {
        let per_user_training = TrainConfig {
            epochs: 3,
            learning_rate: 5e-4,
            warmup_steps: 2,
            ..TrainConfig::default()
        };
        EvalConfig {
            regimes: vec![Regime::Shared, Regime::PerUser],
            decodings: vec![Decoding::Greedy, Decoding::Sample],
            test_users: 50,
            shared_examples_per_user: 3,
            shared_training: TrainConfig::default(),
            per_user_training,
            max_new_tokens: 100,
            bootstrap: BootstrapConfig::default(),
        }
    }
}

/// What a running benchmark reports.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalEvent {
    /// A stage began; `total` units of work follow.
    Stage {
        /// What the stage does.
        name: String,
        /// Units in it (training steps or generations).
        total: usize,
    },
    /// A unit of the stage finished.
    Advance {
        /// A short note (loss, user).
        note: String,
    },
}

/// One generated text and its scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The test user.
    pub user: String,
    /// ROUGE-1 F1 against the user's text.
    pub rouge1: f64,
    /// ROUGE-L F1.
    pub rouge_l: f64,
    /// METEOR.
    pub meteor: f64,
    /// New tokens generated.
    pub tokens: usize,
}

/// The scores of one method under one regime and decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodScores {
    /// The method.
    pub method: Method,
    /// Mean ROUGE-1 with its 95% bootstrap interval.
    pub rouge1: Interval,
    /// Mean ROUGE-L.
    pub rouge_l: Interval,
    /// Mean METEOR.
    pub meteor: Interval,
    /// Corpus BLEU (sacrebleu scale, 0-100).
    pub bleu: f64,
    /// Seconds spent generating.
    pub generate_seconds: f64,
    /// Seconds spent training this method's adapters.
    pub train_seconds: f64,
    /// Per-user scores, in user order.
    pub samples: Vec<Sample>,
}

/// One table: a regime under one decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalTable {
    /// The regime.
    pub regime: Regime,
    /// The decoding.
    pub decoding: Decoding,
    /// One row per method.
    pub methods: Vec<MethodScores>,
    /// Paired differences nextquill − sft of ROUGE-1, ROUGE-L and METEOR.
    pub nextquill_minus_sft: Option<PairedDiff>,
}

/// A paired difference of two methods on the same test items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedDiff {
    /// ROUGE-1.
    pub rouge1: Interval,
    /// ROUGE-L.
    pub rouge_l: Interval,
    /// METEOR.
    pub meteor: Interval,
}

/// A whole benchmark run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Test users.
    pub users: Vec<String>,
    /// Training examples of each shared adapter.
    pub shared_examples: usize,
    /// Share of response tokens that were preference-bearing, by the base
    /// model's effects, over the shared training examples (when measured).
    pub preference_bearing_share: Option<f64>,
    /// The tables.
    pub tables: Vec<EvalTable>,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
}

/// Generated texts of a method for every test user.
type Outputs = Vec<(String, usize)>;

struct Runner<'a> {
    engine: &'a Engine,
    config: &'a EvalConfig,
    users: Vec<String>,
    events: &'a mut dyn FnMut(EvalEvent) -> ControlFlow<()>,
}

/// Runs the benchmark on the users in `engine`'s store.
///
/// `events` hears every stage and unit of work; answering
/// `ControlFlow::Break` stops the run with [`Error::Cancelled`].
pub fn run(
    engine: &Engine,
    config: &EvalConfig,
    events: &mut dyn FnMut(EvalEvent) -> ControlFlow<()>,
) -> Result<EvalReport> {
    let start = Instant::now();
    let mut users = Vec::new();
    for summary in engine.store().users()? {
        if users.len() == config.test_users {
            break;
        }
        if summary.items >= 2 {
            users.push(summary.user_id);
        }
    }
    if users.is_empty() {
        return Err(Error::InvalidArgument {
            name: "data",
            reason: "no user has two items; the benchmark needs a test item and older history"
                .into(),
        });
    }
    let mut runner = Runner {
        engine,
        config,
        users,
        events,
    };

    // The untrained methods do not depend on the regime: generated once.
    let mut untrained: BTreeMap<(Method, DecodingKey), (Outputs, f64)> = BTreeMap::new();
    for &decoding in &config.decodings {
        for method in [Method::Base, Method::History] {
            let outputs = runner.generate_all(method, decoding, &|_| AdapterChoice::None)?;
            untrained.insert((method, key(decoding)), outputs);
        }
    }

    let mut tables = Vec::new();
    let mut shared_examples = 0;
    let mut preference_share = None;
    for &regime in &config.regimes {
        let mut trained: BTreeMap<Method, (Vec<AdapterRecord>, f64)> = BTreeMap::new();
        match regime {
            Regime::Shared => {
                let examples = runner.shared_examples()?;
                shared_examples = examples.len();
                preference_share = runner.preference_share(&examples)?;
                for method in [Method::Sft, Method::Nextquill] {
                    let t = Instant::now();
                    let record = runner.train(
                        SHARED_ADAPTER_USER,
                        &examples,
                        method,
                        &config.shared_training,
                    )?;
                    trained.insert(method, (vec![record], t.elapsed().as_secs_f64()));
                }
            }
            Regime::PerUser => {
                for method in [Method::Sft, Method::Nextquill] {
                    let t = Instant::now();
                    let mut records = Vec::new();
                    for user in runner.users.clone() {
                        let examples = runner.user_examples(&user)?;
                        records.push(runner.train(
                            &user,
                            &examples,
                            method,
                            &config.per_user_training,
                        )?);
                    }
                    trained.insert(method, (records, t.elapsed().as_secs_f64()));
                }
            }
        }
        for &decoding in &config.decodings {
            let mut rows = Vec::new();
            for method in Method::ALL {
                let (outputs, generate_seconds, train_seconds) = match method {
                    Method::Base | Method::History => {
                        let (outputs, seconds) = untrained[&(method, key(decoding))].clone();
                        (outputs, seconds, 0.0)
                    }
                    Method::Sft | Method::Nextquill => {
                        let (records, train_seconds) = &trained[&method];
                        let choose = |i: usize| match regime {
                            Regime::Shared => AdapterChoice::Record(&records[0]),
                            Regime::PerUser => AdapterChoice::Record(&records[i]),
                        };
                        let (outputs, seconds) = runner.generate_all(method, decoding, &choose)?;
                        (outputs, seconds, *train_seconds)
                    }
                };
                rows.push(runner.score(method, &outputs, generate_seconds, train_seconds)?);
            }
            let diff = paired(&rows, &config.bootstrap)?;
            tables.push(EvalTable {
                regime,
                decoding,
                methods: rows,
                nextquill_minus_sft: diff,
            });
        }
    }
    Ok(EvalReport {
        users: runner.users,
        shared_examples,
        preference_bearing_share: preference_share,
        tables,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `Decoding` as a map key.
type DecodingKey = u8;
fn key(decoding: Decoding) -> DecodingKey {
    decoding as u8
}

impl Runner<'_> {
    fn emit(&mut self, event: EvalEvent) -> Result<()> {
        match (self.events)(event) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(Error::Cancelled),
        }
    }

    /// The user's test item (their last) and the items before it.
    fn test_item(&self, user: &str) -> Result<crate::store::Item> {
        let items = self.engine.store().items(user)?;
        items.into_iter().last().ok_or_else(|| Error::UnknownUser {
            user: user.to_owned(),
        })
    }

    /// Every item before the user's test item that has older history.
    fn user_examples(&self, user: &str) -> Result<Vec<ItemPrompt>> {
        let items = self.engine.store().items(user)?;
        let before_test = items.len().saturating_sub(1);
        items[..before_test]
            .iter()
            .skip(1)
            .map(|item| self.engine.item_prompt(user, &item.item_id))
            .collect()
    }

    /// Each user's latest items before their test item, over all users.
    fn shared_examples(&mut self) -> Result<Vec<ItemPrompt>> {
        let mut examples = Vec::new();
        for summary in self.engine.store().users()? {
            let mut mine = self.user_examples(&summary.user_id)?;
            let keep = mine
                .len()
                .saturating_sub(self.config.shared_examples_per_user);
            examples.extend(mine.drain(keep..));
        }
        Ok(examples)
    }

    /// Share of preference-bearing response tokens under the base model.
    fn preference_share(&mut self, examples: &[ItemPrompt]) -> Result<Option<f64>> {
        self.emit(EvalEvent::Stage {
            name: "effects of the training examples".into(),
            total: examples.len(),
        })?;
        let (mut bearing, mut total) = (0usize, 0usize);
        for example in examples {
            let effects = self.engine.explain(&example.user, &example.item_id)?;
            bearing += effects
                .tokens
                .iter()
                .filter(|t| t.preference_bearing)
                .count();
            total += effects.tokens.len();
            self.emit(EvalEvent::Advance {
                note: example.user.clone(),
            })?;
        }
        Ok((total > 0).then(|| bearing as f64 / total as f64))
    }

    fn train(
        &mut self,
        owner: &str,
        examples: &[ItemPrompt],
        method: Method,
        base: &TrainConfig,
    ) -> Result<AdapterRecord> {
        let mut config = base.clone();
        config.objective = match method {
            Method::Nextquill => Objective::nextquill(),
            _ => Objective::Sft,
        };
        // A benchmark trains from scratch: a checkpoint left by an earlier,
        // interrupted run would shorten the training time it reports.
        config.checkpoint = Some(CheckpointConfig {
            dir: self.engine.checkpoint_dir(owner, &config.objective),
            every_steps: base.checkpoint.as_ref().map_or(50, |c| c.every_steps),
            resume: ResumePolicy::StartOver,
        });
        let request = TrainRequest {
            config,
            // Benchmarks score every adapter; activation is irrelevant here.
            gate: SanityGate {
                max_mean_kl: f32::INFINITY,
            },
            keep_versions: usize::MAX,
            ..TrainRequest::default()
        };
        self.emit(EvalEvent::Stage {
            name: format!("training {} for {owner}", method.name()),
            total: examples.len() * request.config.epochs
                / request.config.accumulation_steps.max(1),
        })?;
        let events = &mut *self.events;
        let mut progress = |event: Progress| match event {
            Progress::Step { loss, .. } => match events(EvalEvent::Advance {
                note: format!("loss {loss:.3}"),
            }) {
                ControlFlow::Continue(()) => Control::Continue,
                ControlFlow::Break(()) => Control::Stop,
            },
            _ => Control::Continue,
        };
        let trained = self
            .engine
            .train_adapter(owner, examples, &request, &mut progress)?;
        trained.record.ok_or(Error::Cancelled)
    }

    fn generate_all<'r>(
        &mut self,
        method: Method,
        decoding: Decoding,
        adapter: &dyn Fn(usize) -> AdapterChoice<'r>,
    ) -> Result<(Outputs, f64)> {
        self.emit(EvalEvent::Stage {
            name: format!("generating: {} ({decoding:?})", method.name()),
            total: self.users.len(),
        })?;
        let start = Instant::now();
        let mut outputs = Vec::with_capacity(self.users.len());
        for (i, user) in self.users.clone().iter().enumerate() {
            let test = self.test_item(user)?;
            let plan = GenerationPlan {
                history_of: (method != Method::Base).then_some(user.as_str()),
                before_item: Some(&test.item_id),
                adapter: adapter(i),
            };
            let options = decoding.options(self.config.max_new_tokens, 1000 + i as u32);
            let generation =
                self.engine
                    .generate_with(&plan, &test.request, &options, &mut |_| {
                        ControlFlow::Continue(())
                    })?;
            outputs.push((generation.text, generation.tokens.len()));
            self.emit(EvalEvent::Advance { note: user.clone() })?;
        }
        Ok((outputs, start.elapsed().as_secs_f64()))
    }

    fn score(
        &self,
        method: Method,
        outputs: &Outputs,
        generate_seconds: f64,
        train_seconds: f64,
    ) -> Result<MethodScores> {
        let mut samples = Vec::with_capacity(outputs.len());
        let mut references = Vec::with_capacity(outputs.len());
        for (user, (text, tokens)) in self.users.iter().zip(outputs) {
            let reference = self.test_item(user)?.text;
            samples.push(Sample {
                user: user.clone(),
                rouge1: rouge1_f1(&reference, text),
                rouge_l: rouge_l_f1(&reference, text),
                meteor: meteor(&reference, text),
                tokens: *tokens,
            });
            references.push(reference);
        }
        let hypotheses: Vec<&str> = outputs.iter().map(|(t, _)| t.as_str()).collect();
        let column = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
        let b = &self.config.bootstrap;
        Ok(MethodScores {
            method,
            rouge1: bootstrap_mean_ci(&column(|s| s.rouge1), b)?,
            rouge_l: bootstrap_mean_ci(&column(|s| s.rouge_l), b)?,
            meteor: bootstrap_mean_ci(&column(|s| s.meteor), b)?,
            bleu: corpus_bleu(&hypotheses, &references)?.score,
            generate_seconds,
            train_seconds,
            samples,
        })
    }
}

fn paired(rows: &[MethodScores], bootstrap: &BootstrapConfig) -> Result<Option<PairedDiff>> {
    let find = |m: Method| rows.iter().find(|r| r.method == m);
    let (Some(nq), Some(sft)) = (find(Method::Nextquill), find(Method::Sft)) else {
        return Ok(None);
    };
    let diff = |f: fn(&Sample) -> f64| -> Result<Interval> {
        let a: Vec<f64> = nq.samples.iter().map(f).collect();
        let b: Vec<f64> = sft.samples.iter().map(f).collect();
        paired_bootstrap_diff_ci(&a, &b, bootstrap)
    };
    Ok(Some(PairedDiff {
        rouge1: diff(|s| s.rouge1)?,
        rouge_l: diff(|s| s.rouge_l)?,
        meteor: diff(|s| s.meteor)?,
    }))
}

impl EvalReport {
    /// The report as markdown tables.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let ci = |i: &Interval| format!("{:.3} [{:.3}, {:.3}]", i.estimate, i.lo, i.hi);
        for table in &self.tables {
            out.push_str(&format!(
                "### {} adapter, {} decoding ({} test users)\n\n",
                match table.regime {
                    Regime::Shared => "Shared",
                    Regime::PerUser => "Per-user",
                },
                match table.decoding {
                    Decoding::Greedy => "greedy",
                    Decoding::Sample => "sampled",
                },
                self.users.len()
            ));
            out.push_str("| method | ROUGE-1 | ROUGE-L | METEOR | BLEU | train s | generate s |\n");
            out.push_str("|---|---|---|---|---|---|---|\n");
            for row in &table.methods {
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {:.2} | {:.0} | {:.0} |\n",
                    row.method.name(),
                    ci(&row.rouge1),
                    ci(&row.rouge_l),
                    ci(&row.meteor),
                    row.bleu,
                    row.train_seconds,
                    row.generate_seconds
                ));
            }
            if let Some(d) = &table.nextquill_minus_sft {
                let verdict = |i: &Interval| match (i.excludes(0.0), i.estimate > 0.0) {
                    (true, true) => "nextquill better, interval excludes 0",
                    (true, false) => "sft better, interval excludes 0",
                    (false, _) => "interval includes 0",
                };
                out.push_str(&format!(
                    "| nextquill − sft | {:+.3} [{:+.3}, {:+.3}] | {:+.3} [{:+.3}, {:+.3}] | {:+.3} [{:+.3}, {:+.3}] | | | |\n\n",
                    d.rouge1.estimate, d.rouge1.lo, d.rouge1.hi,
                    d.rouge_l.estimate, d.rouge_l.lo, d.rouge_l.hi,
                    d.meteor.estimate, d.meteor.lo, d.meteor.hi,
                ));
                out.push_str(&format!(
                    "ROUGE-1: {}; ROUGE-L: {}.\n\n",
                    verdict(&d.rouge1),
                    verdict(&d.rouge_l)
                ));
            }
        }
        out
    }
}
