//! Whole training flows on the real default model: the f32 forward against an
//! independent reference, and a short NextQuill run on a real user's reviews.
//!
//! Needs the model at `models/SmolLM2-135M-Instruct.Q4_1.gguf` (or
//! `NEXTQUILL_MODEL`) and the shared data next to the crate.

use std::path::PathBuf;
use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use nextquill::train::{Control, Objective, Progress, TrainConfig, TrainExample, Trainer};
use serde_json::Value;

const HF_LOGITS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/vectors/hf_logits.json"
);
const USERS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/amazon-reviews/users.jsonl"
);

fn model_path() -> PathBuf {
    std::env::var_os("NEXTQUILL_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

/// llama.cpp's tokenizer, from a vocab-only load (the backend may start once a process).
fn tokenizer() -> &'static LlamaModel {
    static TOKENIZER: OnceLock<(LlamaBackend, LlamaModel)> = OnceLock::new();
    let (_, model) = TOKENIZER.get_or_init(|| {
        let mut backend = LlamaBackend::init().unwrap();
        backend.void_logs();
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(&backend, model_path(), &params).unwrap();
        (backend, model)
    });
    model
}

fn tokenize(text: &str) -> Vec<u32> {
    tokenizer()
        .vocab()
        .tokenize(text.as_bytes(), false, true)
        .into_iter()
        .map(|t| t.0 as u32)
        .collect()
}

#[test]
fn f32_forward_reproduces_the_reference_logits() {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(HF_LOGITS).unwrap()).unwrap();
    let ids: Vec<u32> = reference["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let trainer = Trainer::new(model_path(), TrainConfig::default()).unwrap();
    let logits = trainer.logits(&ids, 0, None).unwrap();
    assert_eq!(logits.len(), ids.len());

    let mut max_delta = 0f64;
    let argmax = reference["argmax_ids"].as_array().unwrap();
    let top5 = reference["top5"].as_array().unwrap();
    for (position, row) in logits.iter().enumerate() {
        let best = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(
            best as u64,
            argmax[position].as_u64().unwrap(),
            "argmax at position {position}"
        );
        for entry in top5[position].as_array().unwrap() {
            let (id, want) = (
                entry[0].as_u64().unwrap() as usize,
                entry[1].as_f64().unwrap(),
            );
            max_delta = max_delta.max((row[id] as f64 - want).abs());
        }
    }
    let last = logits.last().unwrap();
    let want_last = reference["last_position_logits"].as_array().unwrap();
    assert_eq!(last.len(), want_last.len());
    for (got, want) in last.iter().zip(want_last) {
        max_delta = max_delta.max((*got as f64 - want.as_f64().unwrap()).abs());
    }
    assert!(max_delta <= 1e-3, "max |delta logit| = {max_delta}");
}

/// The first user with at least `n + 1` reviews, as (input, output) pairs oldest first.
fn real_user(n: usize) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(USERS).unwrap();
    text.lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .map(|user| {
            user["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|item| {
                    let field = |k: &str| item[k].as_str().unwrap().to_string();
                    (field("input"), field("output"))
                })
                .collect::<Vec<_>>()
        })
        .find(|items| items.len() > n)
        .unwrap()
}

fn first_words(text: &str, n: usize) -> String {
    text.split_whitespace()
        .take(n)
        .collect::<Vec<_>>()
        .join(" ")
}

/// ChatML prompts built simply for the test: with up to 3 older reviews, and with `None`.
fn example(items: &[(String, String)], index: usize) -> TrainExample {
    let history: Vec<String> = items[index.saturating_sub(3)..index]
        .iter()
        .map(|(input, output)| format!("{input}\nReview: {}", first_words(output, 40)))
        .collect();
    let prompt = |history: &str| {
        format!(
            "<|im_start|>user\nPast reviews by this user:\n{history}\n\nWrite this user's review for:\n{}<|im_end|>\n<|im_start|>assistant\n",
            items[index].0
        )
    };
    let mut response = tokenize(&format!("{}<|im_end|>", first_words(&items[index].1, 60)));
    response.truncate(48);
    TrainExample {
        with_history: tokenize(&prompt(&history.join("\n\n"))),
        counterfactual: tokenize(&prompt("None")),
        response,
        fixed_weights: None,
    }
}

#[test]
fn nextquill_loss_falls_over_twenty_steps_on_a_real_user() {
    let items = real_user(5);
    let examples: Vec<TrainExample> = (1..5).map(|i| example(&items, i)).collect();
    assert!(examples
        .iter()
        .all(|e| e.with_history.len() > e.counterfactual.len()));

    let config = TrainConfig {
        objective: Objective::nextquill(),
        learning_rate: 2e-3,
        warmup_steps: 2,
        epochs: 5,
        ..TrainConfig::default()
    };
    let trainer = Trainer::new(model_path(), config).unwrap();
    let mut losses = Vec::new();
    let outcome = trainer
        .train(&examples, &[], &mut |event| {
            if let Progress::Step { loss, .. } = event {
                losses.push(loss);
            }
            Control::Continue
        })
        .unwrap();
    assert_eq!(outcome.summary.steps, 20);
    assert_eq!(outcome.summary.skipped_non_finite, 0);
    let first: f32 = losses[..4].iter().sum::<f32>() / 4.0;
    let last: f32 = losses[16..].iter().sum::<f32>() / 4.0;
    assert!(
        last < 0.9 * first,
        "epoch-mean loss {first} -> {last} did not fall by 10%"
    );
}
