//! `import`, `users`, `history`, `export`, `forget`: the history store.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nextquill::store::{FileDisposal, ImportFormat, ImportOptions, Store, StoreOptions};

use super::Cli;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// CSV for a `.csv` name, JSONL otherwise.
    Auto,
    /// JSON lines (per-user lines with `history`, or single items).
    Jsonl,
    /// CSV with a header row.
    Csv,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The file to import.
    pub file: PathBuf,
    /// The file's layout.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: FormatArg,
}

#[derive(Debug, Args)]
pub struct UserArgs {
    /// The user id.
    #[arg(long)]
    pub user: String,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The user id.
    #[arg(long)]
    pub user: String,
    /// Write here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub(super) fn open_store(cli: &Cli) -> Result<Store> {
    let path = cli.db_path();
    let adapters = cli.adapter_dir();
    std::fs::create_dir_all(&adapters)
        .with_context(|| format!("creating the adapter folder {}", adapters.display()))?;
    let options = StoreOptions {
        managed_adapter_dir: Some(adapters),
        ..StoreOptions::default()
    };
    let store = Store::open(&path, options)
        .with_context(|| format!("opening the history store {}", path.display()))?;
    Ok(store)
}

pub fn import(cli: &Cli, args: &ImportArgs) -> Result<()> {
    let store = open_store(cli)?;
    let options = ImportOptions {
        format: match args.format {
            FormatArg::Auto => ImportFormat::Auto,
            FormatArg::Jsonl => ImportFormat::Jsonl,
            FormatArg::Csv => ImportFormat::Csv,
        },
        ..ImportOptions::default()
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} importing {bytes}/{total_bytes} {msg}")
            .expect("static template"),
    );
    let report = store.import_file_with_progress(&args.file, &options, &mut |p| {
        if let Some(total) = p.total_bytes {
            bar.set_length(total);
        }
        bar.set_position(p.bytes);
        bar.set_message(format!("{} items, {} bad lines", p.items, p.bad));
    })?;
    bar.finish_and_clear();
    println!(
        "{}: {} new, {} updated, {} unchanged, {} bad lines -> {}",
        args.file.display(),
        report.imported,
        report.updated,
        report.unchanged,
        report.bad.len(),
        cli.db_path().display()
    );
    for bad in report.bad.iter().take(20) {
        println!("  line {}: {}", bad.line, bad.reason);
    }
    if report.bad.len() > 20 {
        println!("  ... and {} more", report.bad.len() - 20);
    }
    Ok(())
}

pub fn users(cli: &Cli) -> Result<()> {
    let store = open_store(cli)?;
    let users = store.users()?;
    if users.is_empty() {
        println!(
            "no users in {}; add some with `nextquill import FILE`",
            cli.db_path().display()
        );
    }
    for user in users {
        println!(
            "{}\t{} items\tlatest {}",
            user.user_id,
            user.items,
            user.latest.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

pub fn history(cli: &Cli, args: &UserArgs) -> Result<()> {
    let store = open_store(cli)?;
    let items = store.items(&args.user)?;
    if items.is_empty() {
        anyhow::bail!(nextquill::Error::UnknownUser {
            user: args.user.clone()
        });
    }
    for item in items {
        println!(
            "{}\t{}\t{}",
            item.item_id,
            item.timestamp,
            one_line(&item.request, 60)
        );
        println!("    {}", one_line(&item.text, 100));
    }
    Ok(())
}

fn one_line(text: &str, max_chars: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max_chars {
        return flat;
    }
    let cut: String = flat.chars().take(max_chars).collect();
    format!("{cut}…")
}

pub fn export(cli: &Cli, args: &ExportArgs) -> Result<()> {
    let store = open_store(cli)?;
    let count = match &args.out {
        Some(path) => {
            let mut file = std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            );
            let n = store.export_user(&args.user, &mut file)?;
            file.flush()?;
            n
        }
        None => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            store.export_user(&args.user, &mut out)?
        }
    };
    eprintln!("exported {count} items of {}", args.user);
    Ok(())
}

pub fn forget(cli: &Cli, args: &UserArgs) -> Result<()> {
    let store = open_store(cli)?;
    let report = store.forget(&args.user)?;
    nextquill::engine::remove_owner_dir(&cli.adapter_dir(), &args.user)?;
    println!(
        "forgot {}: {} items, {} cached effects, {} adapters ({:?} checkpoint)",
        report.user_id,
        report.items,
        report.effects,
        report.adapters.len(),
        report.checkpoint
    );
    for file in &report.adapters {
        match &file.disposal {
            FileDisposal::Deleted | FileDisposal::AlreadyGone => {}
            FileDisposal::LeftForCaller => {
                println!(
                    "  {} is outside the managed folder: delete it yourself",
                    file.path.display()
                )
            }
            FileDisposal::DeleteFailed(e) => {
                println!("  could not delete {}: {e}", file.path.display())
            }
        }
    }
    Ok(())
}
