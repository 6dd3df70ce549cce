//! `nextquill generate` and `nextquill model info`.

use std::io::{Read, Write};
use std::ops::ControlFlow;

use anyhow::{Context, Result};
use clap::Args;
use nextquill::llm::{
    GenerateOptions, Model, ModelOptions, Role, Sampling, Session, SessionOptions,
};

use super::Cli;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt; read from stdin when absent or `-`.
    pub prompt: Option<String>,
    /// Personalize for this user: their history in the prompt, their active
    /// adapter applied. The prompt is then the request they answer.
    #[arg(long)]
    pub user: Option<String>,
    /// The request (same as the prompt argument).
    #[arg(long, conflicts_with = "prompt")]
    pub request: Option<String>,
    /// Use the prompt as it is, without the model's chat template.
    #[arg(long)]
    pub raw: bool,
    /// Most new tokens.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 means greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus mass kept when sampling.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Random seed when sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u32,
    /// Repetition penalty (1.0 disables).
    #[arg(long, default_value_t = 1.2)]
    pub repetition_penalty: f32,
}

pub(super) fn session_options(cli: &Cli) -> SessionOptions {
    let mut options = SessionOptions::default();
    if let Some(threads) = cli.threads {
        options.threads = threads;
    }
    options
}

pub(super) fn load_model(cli: &Cli) -> Result<Model> {
    Ok(Model::load(&cli.model, &ModelOptions::default())?)
}

pub fn generate(cli: &Cli, args: &GenerateArgs) -> Result<()> {
    let prompt = match args.prompt.as_deref().or(args.request.as_deref()) {
        Some(text) if text != "-" => text.to_owned(),
        _ => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the prompt from stdin")?;
            text
        }
    };
    if let Some(user) = &args.user {
        if args.raw {
            anyhow::bail!("--raw and --user exclude each other: a personalized prompt is built from the history");
        }
        let engine = cli.engine()?;
        let active = engine.store().active_adapter(user)?;
        eprintln!(
            "[{user}: {} history items, {}]",
            engine.history(user, None)?.len(),
            match &active {
                Some(r) => format!("adapter v{} ({})", r.version, r.objective),
                None => "no adapter: base model".into(),
            }
        );
        let mut stdout = std::io::stdout().lock();
        let generation = engine.generate(
            Some(user),
            prompt.trim(),
            &options(args),
            &mut |piece| match stdout
                .write_all(piece.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            },
        )?;
        let _ = writeln!(stdout);
        print_stats(&generation);
        return Ok(());
    }
    let model = load_model(cli)?;
    let tokens = if args.raw {
        model.tokenize_prompt(&prompt)
    } else {
        model.tokenize_prompt(&model.render_chat(&[(Role::User, prompt.trim())], true)?)
    };
    let options = options(args);
    let mut session = Session::new(&model, session_options(cli))?;
    let mut stdout = std::io::stdout().lock();
    let generation = session.generate(&tokens, &options, &mut |piece| {
        // A closed pipe (`| head`) ends the generation instead of failing it.
        match stdout
            .write_all(piece.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    })?;
    let _ = writeln!(stdout);
    print_stats(&generation);
    Ok(())
}

fn options(args: &GenerateArgs) -> GenerateOptions {
    let sampling = if args.temperature > 0.0 {
        Sampling::Sample {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
        }
    } else {
        Sampling::Greedy
    };
    GenerateOptions {
        max_tokens: args.max_tokens,
        sampling,
        repetition_penalty: args.repetition_penalty,
    }
}

fn print_stats(generation: &nextquill::llm::Generation) {
    let rate = generation.tokens.len() as f64 / generation.generate_seconds.max(1e-9);
    eprintln!(
        "[{} prompt tokens in {:.2} s, {} new tokens at {:.1} tokens/s, {:?}]",
        generation.prompt_tokens,
        generation.prompt_seconds,
        generation.tokens.len(),
        rate,
        generation.finish
    );
}

pub fn info(cli: &Cli, json: bool) -> Result<()> {
    let model = load_model(cli)?;
    let info = model.info();
    if json {
        println!("{}", serde_json::to_string_pretty(info)?);
        return Ok(());
    }
    println!("file          {}", info.path.display());
    println!("name          {}", info.name.as_deref().unwrap_or("-"));
    println!("architecture  {}", info.architecture);
    println!("size          {:.1} MB", info.file_size as f64 / 1e6);
    println!(
        "layers        {} (width {}, {} heads, {} kv heads)",
        info.n_layer, info.n_embd, info.n_head, info.n_head_kv
    );
    println!("vocabulary    {} tokens", info.n_vocab);
    println!("context       {} tokens (trained)", info.n_ctx_train);
    println!("fingerprint   {}", info.fingerprint);
    match &info.chat_template {
        Some(template) => println!("chat template\n{template}"),
        None => println!("chat template (none)"),
    }
    Ok(())
}
