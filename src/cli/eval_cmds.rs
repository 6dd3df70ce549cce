//! `nextquill eval`: the personalization benchmark on a history file.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nextquill::eval::{self, Decoding, EvalConfig, EvalEvent, Regime};
use nextquill::store::ImportOptions;

use super::Cli;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RegimeArg {
    /// One adapter trained on every user's latest items (the paper's regime).
    Shared,
    /// One adapter per test user, on that user's own items (as on a phone).
    PerUser,
    /// Both.
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DecodingArg {
    /// Greedy with repetition penalty 1.2.
    Greedy,
    /// Temperature 0.8, top-p 0.95, repetition penalty 1.2, fixed seeds.
    Sample,
    /// Both.
    Both,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The history file (per-user JSONL, as `../shared/data/amazon-reviews/users.jsonl`).
    #[arg(long)]
    pub data: PathBuf,
    /// Test users: the first N (in id order) with at least two items.
    #[arg(long, default_value_t = 50)]
    pub users: usize,
    /// Which adapters the trained methods use.
    #[arg(long, value_enum, default_value_t = RegimeArg::Both)]
    pub regime: RegimeArg,
    /// How text is decoded.
    #[arg(long, value_enum, default_value_t = DecodingArg::Both)]
    pub decoding: DecodingArg,
    /// Shared-adapter training examples per user: their latest items before the test item.
    #[arg(long, default_value_t = 3)]
    pub examples_per_user: usize,
    /// Folder for the run's store, adapters and results (default: a new
    /// `eval-<time>` folder in the data directory).
    #[arg(long)]
    pub work: Option<PathBuf>,
}

pub fn eval(cli: &Cli, args: &EvalArgs) -> Result<()> {
    let work = match &args.work {
        Some(dir) => dir.clone(),
        None => {
            let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
            nextquill::engine::default_data_dir().join(format!("eval-{stamp}"))
        }
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let store = cli.work_store(&work, "eval.sqlite3")?;
    let report = store
        .import_file(&args.data, &ImportOptions::default())
        .with_context(|| format!("importing {}", args.data.display()))?;
    if !report.bad.is_empty() {
        eprintln!(
            "{} bad lines in {} were skipped",
            report.bad.len(),
            args.data.display()
        );
    }
    let engine = cli.work_engine(&work, store)?;

    let mut config = EvalConfig {
        test_users: args.users,
        shared_examples_per_user: args.examples_per_user,
        ..EvalConfig::default()
    };
    config.regimes = match args.regime {
        RegimeArg::Shared => vec![Regime::Shared],
        RegimeArg::PerUser => vec![Regime::PerUser],
        RegimeArg::Both => vec![Regime::Shared, Regime::PerUser],
    };
    config.decodings = match args.decoding {
        DecodingArg::Greedy => vec![Decoding::Greedy],
        DecodingArg::Sample => vec![Decoding::Sample],
        DecodingArg::Both => vec![Decoding::Greedy, Decoding::Sample],
    };
    if let Some(threads) = cli.threads {
        config.shared_training.threads = threads;
        config.per_user_training.threads = threads;
    }

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:40} {bar:25} {pos}/{len} {msg} eta {eta}")
            .expect("static template"),
    );
    let started = std::time::Instant::now();
    let result = eval::run(&engine, &config, &mut |event| {
        match event {
            EvalEvent::Stage { name, total } => {
                // Plain lines too, so a log file (no terminal, no bar) shows the stages.
                eprintln!(
                    "[{:>6.0} s] {name} ({total})",
                    started.elapsed().as_secs_f64()
                );
                bar.reset();
                bar.set_length(total as u64);
                bar.set_prefix(name);
            }
            EvalEvent::Advance { note } => {
                bar.inc(1);
                bar.set_message(note);
            }
        }
        ControlFlow::Continue(())
    });
    bar.finish_and_clear();
    let report = result?;

    let markdown = report.to_markdown();
    println!("{markdown}");
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(work.join("results.json"), json)?;
    std::fs::write(work.join("results.md"), &markdown)?;
    println!(
        "{} test users, {} shared examples, {:.0} s; results in {}",
        report.users.len(),
        report.shared_examples,
        report.seconds,
        work.display()
    );
    if let Some(share) = report.preference_bearing_share {
        println!("preference-bearing response tokens: {:.1}%", share * 100.0);
    }
    Ok(())
}
