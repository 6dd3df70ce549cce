//! `train` and `adapters`: a user's adapter, from their history to the registry.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nextquill::adapter::LoraTarget;
use nextquill::engine::{Engine, ExampleSelection, TrainRequest, TrainedAdapter};
use nextquill::train::{Control, Objective, Progress, TrainConfig};

use super::Cli;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ObjectiveArg {
    /// L_n + alpha * L_p, preference-bearing tokens weighted up.
    Nextquill,
    /// Plain cross-entropy with the history in the prompt.
    Sft,
}

/// Options shared by every command that trains.
#[derive(Debug, Clone, Args)]
pub struct TrainOptions {
    /// The training objective.
    #[arg(long, value_enum, default_value_t = ObjectiveArg::Nextquill)]
    pub objective: ObjectiveArg,
    /// Passes over the examples.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (updates are scaled by alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// Projections to adapt, comma separated: q, k, v, o, gate, up, down.
    #[arg(long, value_delimiter = ',', default_value = "q,v")]
    pub targets: Vec<String>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Warmup steps.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Seed of the initialisation and the shuffling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl TrainOptions {
    pub fn config(&self, threads: Option<usize>) -> Result<TrainConfig> {
        let targets = self
            .targets
            .iter()
            .map(|name| {
                LoraTarget::parse(name.trim()).with_context(|| {
                    format!("unknown projection {name:?}; use q, k, v, o, gate, up or down")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut config = TrainConfig {
            objective: match self.objective {
                ObjectiveArg::Nextquill => Objective::nextquill(),
                ObjectiveArg::Sft => Objective::Sft,
            },
            learning_rate: self.lr,
            warmup_steps: self.warmup,
            epochs: self.epochs,
            seed: self.seed,
            ..TrainConfig::default()
        };
        config.lora.rank = self.rank;
        config.lora.alpha = self.alpha;
        config.lora.targets = targets;
        if let Some(threads) = threads {
            config.threads = threads;
        }
        Ok(config)
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The user whose adapter is trained.
    #[arg(long)]
    pub user: String,
    /// Train on the N most recent items only (default: every item with history).
    #[arg(long)]
    pub latest: Option<usize>,
    #[command(flatten)]
    pub options: TrainOptions,
}

#[derive(Debug, Args)]
pub struct AdaptersArgs {
    /// The user (or `@shared` for shared adapters).
    #[arg(long)]
    pub user: Option<String>,
    #[command(subcommand)]
    pub command: Option<AdaptersCommand>,
}

#[derive(Debug, Subcommand)]
pub enum AdaptersCommand {
    /// Write an adapter in the PEFT layout (adapter_config.json + safetensors).
    Export {
        /// The user.
        #[arg(long)]
        user: String,
        /// The version (default: the active one).
        #[arg(long)]
        version: Option<i64>,
        /// The folder to write.
        #[arg(long)]
        peft: PathBuf,
    },
    /// Make a version the one generation applies.
    Activate {
        /// The user.
        #[arg(long)]
        user: String,
        /// The version.
        #[arg(long)]
        version: i64,
    },
    /// Generate with the base model for this user from now on.
    Deactivate {
        /// The user.
        #[arg(long)]
        user: String,
    },
}

/// Stops the run at the next step boundary on Ctrl-C; a second Ctrl-C ends the process.
fn ctrl_c_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step; the checkpoint is kept (Ctrl-C again to quit now)");
    });
    flag
}

/// How often training progress is logged when stderr is not a terminal.
const LOG_LINE_EVERY: Duration = Duration::from_secs(5);

/// A progress bar over training steps, stopped by Ctrl-C.
pub fn train_with_bar(
    label: &str,
    run: impl FnOnce(&mut dyn FnMut(Progress) -> Control) -> nextquill::Result<TrainedAdapter>,
) -> Result<TrainedAdapter> {
    let stop = ctrl_c_flag();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label} {{bar:30}} {{pos}}/{{len}} steps  {{msg}}  eta {{eta}}"
        ))
        .expect("static template"),
    );
    // Without a terminal the bar draws nothing; a log then gets a plain line
    // at most every few seconds, and for the last step.
    let mut last_line: Option<Instant> = None;
    let mut progress = |event: Progress| {
        match event {
            Progress::Step {
                step,
                total_steps,
                loss,
                tokens_per_second,
                ..
            } => {
                bar.set_length(total_steps as u64);
                bar.set_position(step as u64);
                let message = format!("loss {loss:.3}  {tokens_per_second:.0} tok/s");
                let due = last_line.is_none_or(|at| at.elapsed() >= LOG_LINE_EVERY);
                if bar.is_hidden() && (due || step == total_steps) {
                    eprintln!("{label}: step {step}/{total_steps}  {message}");
                    last_line = Some(Instant::now());
                }
                bar.set_message(message);
            }
            Progress::Skipped { step, reason } => {
                bar.println(format!("step {step} skipped: {reason}"));
            }
            Progress::Validation { epoch, loss, best } => {
                bar.println(format!(
                    "epoch {epoch}: validation loss {loss:.4}{}",
                    if best { " (best)" } else { "" }
                ));
            }
            Progress::Checkpoint { .. } => {}
        }
        if stop.load(Ordering::SeqCst) {
            Control::Stop
        } else {
            Control::Continue
        }
    };
    let trained = run(&mut progress);
    bar.finish_and_clear();
    Ok(trained?)
}

pub fn train(cli: &Cli, args: &TrainArgs) -> Result<()> {
    let engine = cli.engine()?;
    let request = TrainRequest {
        config: args.options.config(cli.threads)?,
        selection: match args.latest {
            Some(n) => ExampleSelection::Latest(n),
            None => ExampleSelection::All,
        },
        ..TrainRequest::default()
    };
    let label = format!("training {}", args.user);
    let trained = train_with_bar(&label, |progress| {
        engine.train_user(&args.user, &request, progress)
    })?;
    report(&engine, &args.user, &trained);
    Ok(())
}

fn report(engine: &Engine, user: &str, trained: &TrainedAdapter) {
    let s = &trained.summary;
    println!(
        "{} steps in {:.1} s ({:.0} tokens/s), loss {} -> {}",
        s.steps,
        s.seconds,
        s.tokens_per_second,
        s.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
    );
    let Some(record) = &trained.record else {
        println!(
            "stopped: the checkpoint in {} is kept; run the same command again to resume",
            nextquill::engine::owner_dir(engine.adapter_dir(), user).display()
        );
        return;
    };
    if let Some(gate) = &trained.gate {
        println!(
            "sanity gate: mean KL on neutral prompts {:.4} nats, finite {} -> {}",
            gate.mean_kl,
            gate.finite,
            if gate.passed { "passed" } else { "FAILED" }
        );
    }
    println!(
        "adapter v{} ({}) at {}{}",
        record.version,
        record.objective,
        record.path.display(),
        if trained.activated {
            ", now active"
        } else {
            ", not activated: the previous adapter stays"
        }
    );
}

pub fn adapters(cli: &Cli, args: &AdaptersArgs) -> Result<()> {
    match &args.command {
        None => {
            let user = args
                .user
                .as_deref()
                .context("name the user: nextquill adapters --user ID")?;
            let store = super::store_cmds::open_store(cli)?;
            let records = store.adapters(user)?;
            if records.is_empty() {
                println!("{user} has no adapter; train one with: nextquill train --user {user}");
            }
            for r in records {
                println!(
                    "v{:<3} {:<9} {} {}  {}",
                    r.version,
                    r.objective,
                    if r.active { "active" } else { "      " },
                    r.created,
                    r.path.display()
                );
            }
            Ok(())
        }
        Some(AdaptersCommand::Export {
            user,
            version,
            peft,
        }) => {
            let engine = cli.engine()?;
            let record = engine.export_peft(user, *version, peft)?;
            println!(
                "wrote v{} of {user} as PEFT into {}",
                record.version,
                peft.display()
            );
            Ok(())
        }
        Some(AdaptersCommand::Activate { user, version }) => {
            let engine = cli.engine()?;
            let record = engine.adapter_record(user, Some(*version))?;
            engine.load(&record)?;
            engine.store().activate_adapter(user, *version)?;
            println!("v{version} of {user} is active");
            Ok(())
        }
        Some(AdaptersCommand::Deactivate { user }) => {
            let store = super::store_cmds::open_store(cli)?;
            store.deactivate_adapters(user)?;
            println!("{user} now gets the base model");
            Ok(())
        }
    }
}
