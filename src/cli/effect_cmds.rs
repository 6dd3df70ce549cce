//! `explain` and `profile`: what a user's history causes in their writing.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use nextquill::effect;

use super::Cli;

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The user id.
    #[arg(long)]
    pub user: String,
    /// The history item whose text is explained (see `nextquill history --user ID`).
    #[arg(long)]
    pub item: String,
    /// Also write a self-contained HTML page with each token's numbers on hover.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Print JSON instead of the terminal heatmap.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// The user id.
    #[arg(long)]
    pub user: String,
    /// Entries of each kind to show.
    #[arg(long, default_value_t = 15)]
    pub top: usize,
    /// Ignore words seen fewer times than this.
    #[arg(long, default_value_t = 2)]
    pub min_count: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn explain(cli: &Cli, args: &ExplainArgs) -> Result<()> {
    let engine = cli.engine()?;
    let effects = engine.explain(&args.user, &args.item)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&effects)?);
    } else {
        println!(
            "user {} item {}: {} history items, {} tokens, {:.0}% preference-bearing",
            args.user,
            args.item,
            effects.history_used,
            effects.tokens.len(),
            100.0 * effects.preference_bearing_share()
        );
        print!("{}", effect::to_terminal(&effects));
    }
    if let Some(path) = &args.html {
        let title = format!("What {}'s history causes in item {}", args.user, args.item);
        std::fs::write(path, effect::to_html(&effects, &title))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

pub fn profile(cli: &Cli, args: &ProfileArgs) -> Result<()> {
    let engine = cli.engine()?;
    let profile = engine.profile(&args.user, args.min_count, args.top)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&profile)?);
        return Ok(());
    }
    println!(
        "{}: {} texts, {:.0}% of tokens preference-bearing",
        args.user,
        profile.texts,
        100.0 * profile.preference_bearing_share
    );
    println!("words the history makes them use (mean Δp, count):");
    for entry in &profile.words {
        println!(
            "  {:+.3}  {:>4}  {}",
            entry.mean_delta_p, entry.count, entry.text
        );
    }
    if !profile.phrases.is_empty() {
        println!("phrases:");
        for entry in &profile.phrases {
            println!(
                "  {:+.3}  {:>4}  {}",
                entry.mean_delta_p, entry.count, entry.text
            );
        }
    }
    Ok(())
}
