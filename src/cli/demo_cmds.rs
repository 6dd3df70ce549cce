//! `nextquill demo`: the whole loop on three made-up users, in a few minutes.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use nextquill::effect;
use nextquill::engine::{ExampleSelection, TrainRequest};
use nextquill::llm::{GenerateOptions, Sampling};
use nextquill::store::ImportOptions;
use nextquill::train::{Objective, TrainConfig};

use super::Cli;

/// Three invented reviewers with clearly different habits (written for this
/// demo; no real person's text).
const DEMO_USERS: &str = include_str!("demo_users.jsonl");

/// A new request none of them has answered.
const REQUEST: &str =
    "Category: Kitchen\nProduct: Electric kettle 1.7 litre\nRating: 5/5\nReview title: Boils fast";

/// Marks a folder the demo made, so that a rerun may clear it.
const MARKER: &str = ".nextquill-demo";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder for the demo's store, adapters and heatmap page (cleared on each run).
    #[arg(long, default_value = "nextquill-demo")]
    pub work: PathBuf,
    /// Training epochs over each user's texts.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
}

pub fn demo(cli: &Cli, args: &DemoArgs) -> Result<()> {
    let work = &args.work;
    if work.exists() {
        anyhow::ensure!(
            work.join(MARKER).exists(),
            "{} exists and was not made by the demo; pass another --work folder",
            work.display()
        );
        std::fs::remove_dir_all(work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    std::fs::write(
        work.join(MARKER),
        "made by `nextquill demo`; safe to delete\n",
    )?;

    step(1, "import three made-up users' review histories");
    let store = cli.work_store(work, "history.sqlite3")?;
    let imported = store.import_reader(
        DEMO_USERS.as_bytes(),
        &ImportOptions::default(),
        &mut |_| {},
    )?;
    anyhow::ensure!(
        imported.bad.is_empty(),
        "the demo data has bad lines: {:?}",
        imported.bad
    );
    let users: Vec<String> = store.users()?.into_iter().map(|u| u.user_id).collect();
    for user in &users {
        println!("  {user}: {} texts", store.items(user)?.len());
    }

    let engine = cli.work_engine(work, store)?;

    step(
        2,
        "explain: which tokens of cleo's latest text her history causes",
    );
    let last = engine
        .store()
        .items("cleo")?
        .pop()
        .context("cleo has no items")?;
    let effects = engine.explain("cleo", &last.item_id)?;
    println!(
        "  {} tokens, {:.0}% preference-bearing (Δp > {})",
        effects.tokens.len(),
        100.0 * effects.preference_bearing_share(),
        engine.options().effect.delta
    );
    print!("{}", effect::to_terminal(&effects));
    let page = work.join("cleo-effects.html");
    std::fs::write(
        &page,
        effect::to_html(&effects, "What cleo's history causes in her latest review"),
    )?;
    println!("  heatmap page: {}", page.display());

    step(3, "train a NextQuill adapter for each user");
    for user in &users {
        let request = TrainRequest {
            config: demo_training(args.epochs, cli.threads),
            selection: ExampleSelection::All,
            ..TrainRequest::default()
        };
        let trained = super::train_cmds::train_with_bar(&format!("  {user:5}"), |progress| {
            engine.train_user(user, &request, progress)
        })?;
        let s = &trained.summary;
        println!(
            "  {user:5} {} steps in {:.0} s, loss {:.3} -> {:.3}, gate KL {:.3} -> {}",
            s.steps,
            s.seconds,
            s.first_loss.unwrap_or(f32::NAN),
            s.last_loss.unwrap_or(f32::NAN),
            trained.gate.map_or(f32::NAN, |g| g.mean_kl),
            if trained.activated {
                "active"
            } else {
                "not activated"
            }
        );
    }

    step(4, "generic versus personalized text for a new request");
    println!("  request: {}", REQUEST.replace('\n', " | "));
    let generate = GenerateOptions {
        max_tokens: 60,
        sampling: Sampling::Greedy,
        repetition_penalty: 1.2,
    };
    let mut quiet = |_: &str| ControlFlow::Continue(());
    let generic = engine.generate(None, REQUEST, &generate, &mut quiet)?;
    println!(
        "\n  generic (no history, base model):\n    {}",
        one_line(&generic.text)
    );
    for user in &users {
        let personal = engine.generate(Some(user), REQUEST, &generate, &mut quiet)?;
        println!(
            "\n  {user} (history + {user}'s adapter):\n    {}",
            one_line(&personal.text)
        );
    }
    println!(
        "\nDone. Everything stayed on this machine: {} holds the store and adapters.",
        work.display()
    );
    Ok(())
}

fn demo_training(epochs: usize, threads: Option<usize>) -> TrainConfig {
    // Eight texts a user: a higher rate than the 450-example reference run so
    // that a few minutes of training show.
    let mut config = TrainConfig {
        objective: Objective::nextquill(),
        learning_rate: 1e-3,
        warmup_steps: 2,
        epochs,
        ..TrainConfig::default()
    };
    if let Some(threads) = threads {
        config.threads = threads;
    }
    config
}

fn step(n: usize, what: &str) {
    println!("\n[{n}/4] {what}");
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
