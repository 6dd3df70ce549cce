//! Argument parsing and dispatch for the `nextquill` binary.

mod demo_cmds;
mod effect_cmds;
mod eval_cmds;
mod model_cmds;
mod store_cmds;
mod train_cmds;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Where the default model lives when neither `--model` nor `NEXTQUILL_MODEL` says otherwise.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Personalize a small on-device LLM to one person, entirely locally.
#[derive(Debug, Parser)]
#[command(name = "nextquill", version, about)]
pub struct Cli {
    /// The GGUF model file.
    #[arg(long, global = true, env = "NEXTQUILL_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,

    /// The history store (SQLite). Default: `history.sqlite3` in
    /// `$XDG_DATA_HOME/nextquill` (or `~/.local/share/nextquill`).
    #[arg(long, global = true, env = "NEXTQUILL_DB")]
    pub db: Option<PathBuf>,

    /// Compute threads (default: every core, at most 4).
    #[arg(long, global = true)]
    pub threads: Option<usize>,

    /// More log output (-v: debug, -vv: trace, llama.cpp included).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt (argument or stdin), streamed to the terminal.
    Generate(model_cmds::GenerateArgs),
    /// Import a history file (per-user JSONL with `history`, or items as JSONL/CSV).
    Import(store_cmds::ImportArgs),
    /// List the users in the store.
    Users,
    /// List one user's history items.
    History(store_cmds::UserArgs),
    /// Write one user's items as JSONL.
    Export(store_cmds::ExportArgs),
    /// Remove every trace of a user: items, cached effects, adapters.
    Forget(store_cmds::UserArgs),
    /// Show which tokens of a user's text their history caused.
    Explain(effect_cmds::ExplainArgs),
    /// The words and phrases a user's history makes them use.
    Profile(effect_cmds::ProfileArgs),
    /// Train a user's LoRA adapter (NextQuill or SFT); Ctrl-C keeps a checkpoint.
    Train(train_cmds::TrainArgs),
    /// List a user's adapters, or export, activate, deactivate one.
    Adapters(train_cmds::AdaptersArgs),
    /// The whole loop on three made-up users: import, explain, train, generate.
    Demo(demo_cmds::DemoArgs),
    /// The personalization benchmark: base, history, SFT and NextQuill on a history file.
    Eval(eval_cmds::EvalArgs),
    /// Facts about the model file.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Architecture, size, fingerprint and chat template.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Sends logs to stderr; `RUST_LOG` overrides the level chosen by `-v`.
pub fn install_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,nextquill=info",
        1 => "info,nextquill=debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Generate(args) => model_cmds::generate(&cli, args),
        Command::Import(args) => store_cmds::import(&cli, args),
        Command::Users => store_cmds::users(&cli),
        Command::History(args) => store_cmds::history(&cli, args),
        Command::Export(args) => store_cmds::export(&cli, args),
        Command::Forget(args) => store_cmds::forget(&cli, args),
        Command::Explain(args) => effect_cmds::explain(&cli, args),
        Command::Profile(args) => effect_cmds::profile(&cli, args),
        Command::Demo(args) => demo_cmds::demo(&cli, args),
        Command::Eval(args) => eval_cmds::eval(&cli, args),
        Command::Train(args) => train_cmds::train(&cli, args),
        Command::Adapters(args) => train_cmds::adapters(&cli, args),
        Command::Model {
            command: ModelCommand::Info { json },
        } => model_cmds::info(&cli, *json),
    }
}

impl Cli {
    /// The history store's path: `--db`, `NEXTQUILL_DB`, or the default location.
    pub fn db_path(&self) -> PathBuf {
        self.db
            .clone()
            .unwrap_or_else(|| nextquill::engine::default_data_dir().join("history.sqlite3"))
    }

    /// The folder of trained adapters: `adapters` next to the store.
    pub fn adapter_dir(&self) -> PathBuf {
        let db = self.db_path();
        db.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."))
            .join("adapters")
    }

    /// A store of its own in `work` (`db` inside it, adapters in `work/adapters`),
    /// for the demo and the benchmark, which must not touch the user's store.
    pub fn work_store(&self, work: &std::path::Path, db: &str) -> Result<nextquill::store::Store> {
        let adapters = work.join("adapters");
        std::fs::create_dir_all(&adapters)?;
        let options = nextquill::store::StoreOptions {
            managed_adapter_dir: Some(adapters),
            ..Default::default()
        };
        Ok(nextquill::store::Store::open(work.join(db), options)?)
    }

    /// An engine with the reference protocol's prompts over a [`Cli::work_store`].
    pub fn work_engine(
        &self,
        work: &std::path::Path,
        store: nextquill::store::Store,
    ) -> Result<nextquill::engine::Engine> {
        let mut options = nextquill::engine::EngineOptions::reference();
        options.session = model_cmds::session_options(self);
        let model = model_cmds::load_model(self)?;
        Ok(nextquill::engine::Engine::new(
            model,
            store,
            work.join("adapters"),
            options,
        )?)
    }

    /// The model and the store, with the session sized by `--threads`.
    pub fn engine(&self) -> Result<nextquill::engine::Engine> {
        let db = self.db_path();
        if let Some(parent) = db.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let model = model_cmds::load_model(self)?;
        let store = store_cmds::open_store(self)?;
        let options = nextquill::engine::EngineOptions {
            session: model_cmds::session_options(self),
            ..Default::default()
        };
        Ok(nextquill::engine::Engine::new(
            model,
            store,
            self.adapter_dir(),
            options,
        )?)
    }
}
