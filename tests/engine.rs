//! The adapter lifecycle through the engine on the real default model: train a
//! user's adapter, check that llama.cpp applies it as the trainer computed it,
//! generate for two users with different adapters, and forget one.

mod common;

use std::ops::ControlFlow;

use nextquill::engine::{Engine, EngineOptions, ExampleSelection, TrainRequest};
use nextquill::eval::{run, Decoding, EvalConfig, EvalEvent, Regime};
use nextquill::llm::{GenerateOptions, Model, ModelOptions, Role, Sampling, ScoreOptions};
use nextquill::store::{ImportOptions, Store, StoreOptions, SHARED_ADAPTER_USER};
use nextquill::train::{CheckpointConfig, Control, Objective, TrainConfig, Trainer};

/// Two invented users with opposite habits, as per-user JSONL.
fn users_jsonl() -> String {
    let products = ["mug", "lamp", "chair", "rug"];
    let user = |id: &str, text: &dyn Fn(&str) -> String| {
        let history: Vec<serde_json::Value> = products
            .iter()
            .enumerate()
            .map(|(i, p)| {
                serde_json::json!({
                    "id": format!("{id}{i}"),
                    "timestamp": format!("2025-0{}-01T00:00:00Z", i + 1),
                    "input": format!("Product: {p}"),
                    "output": text(p),
                })
            })
            .collect();
        serde_json::json!({"user_id": id, "history": history}).to_string()
    };
    [
        user("loud", &|p| {
            format!("WOW!! Best {p} EVER!! Totally amazing!!")
        }),
        user("dry", &|p| {
            format!("A {p}. Dimensions as listed. Verdict: adequate.")
        }),
    ]
    .join("\n")
}

fn engine(dir: &std::path::Path) -> Engine {
    let adapters = dir.join("adapters");
    let store = Store::open(
        dir.join("history.sqlite3"),
        StoreOptions {
            managed_adapter_dir: Some(adapters.clone()),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let report = store
        .import_reader(
            users_jsonl().as_bytes(),
            &ImportOptions::default(),
            &mut |_| {},
        )
        .unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    assert_eq!(report.imported, 8);
    let model = Model::load(common::model_path(), &ModelOptions::default()).unwrap();
    Engine::new(model, store, adapters, EngineOptions::reference()).unwrap()
}

/// A short, strong run: enough to move the logits visibly.
fn request() -> TrainRequest {
    TrainRequest {
        config: TrainConfig {
            objective: Objective::Sft,
            learning_rate: 3e-3,
            warmup_steps: 0,
            epochs: 3,
            ..TrainConfig::default()
        },
        selection: ExampleSelection::All,
        ..TrainRequest::default()
    }
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::MIN, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().map(|&x| x as f64).sum::<f64>() / n,
        b.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

#[test]
fn a_trained_adapter_moves_llama_cpp_as_it_moves_the_trainer_and_users_get_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let trained = engine
        .train_user("loud", &request(), &mut |_| Control::Continue)
        .unwrap();
    let record = trained
        .record
        .expect("a finished run registers its adapter");
    let gate = trained.gate.unwrap();
    assert!(gate.finite && gate.mean_kl.is_finite(), "{gate:?}");
    assert_eq!(trained.activated, gate.passed);
    let loss = (
        trained.summary.first_loss.unwrap(),
        trained.summary.last_loss.unwrap(),
    );
    assert!(loss.1 < loss.0, "loss fell: {loss:?}");

    // The same prompt and text through llama.cpp (Q4_1 kernels) and through
    // the trainer's f32 forward, each with and without the adapter.
    let (weights, _) = nextquill::adapter::read_gguf(&record.path).unwrap();
    let model = engine.model();
    let prompt = model.tokenize_markup(
        &model
            .render_chat(&[(Role::User, "Product: kettle")], true)
            .unwrap(),
    );
    let response = model.tokenize_text("WOW!! Best kettle EVER!!");
    drop(model);
    let id = engine.load(&record).unwrap();
    let options = ScoreOptions {
        distributions: true,
        ..ScoreOptions::default()
    };
    let (base, adapted) = engine
        .with_session(|s| {
            let base = s.score(&[&prompt], &response, &options)?;
            s.set_adapter(Some(id), 1.0)?;
            let adapted = s.score(&[&prompt], &response, &options)?;
            Ok((base, adapted))
        })
        .unwrap();
    let n_vocab = engine.model().n_vocab();
    let llama_delta: Vec<f32> = adapted.prompts[0]
        .log_distributions
        .as_ref()
        .unwrap()
        .iter()
        .zip(base.prompts[0].log_distributions.as_ref().unwrap())
        .map(|(a, b)| a - b)
        .collect();

    let trainer = Trainer::new(common::model_path(), TrainConfig::default()).unwrap();
    let tokens = [&prompt[..], &response[..response.len() - 1]].concat();
    let first = prompt.len() - 1;
    let plain = trainer.logits(&tokens, first, None).unwrap();
    let with = trainer.logits(&tokens, first, Some(&weights)).unwrap();
    let mut moved = 0;
    let mut correlations = Vec::new();
    for (t, (p, w)) in plain.iter().zip(&with).enumerate() {
        let (lp, lw) = (log_softmax(p), log_softmax(w));
        let candle_delta: Vec<f32> = lw.iter().zip(&lp).map(|(a, b)| a - b).collect();
        let row = &llama_delta[t * n_vocab..(t + 1) * n_vocab];
        let r = correlation(&candle_delta[..n_vocab], row);
        eprintln!("position {t}: correlation {r}");
        // llama.cpp quantizes activations to 8 bits for Q4_1 matmuls, which
        // puts noise on every log-probability (up to ~0.3 nat here) that
        // differs between CPU kernel paths: one position may dip to 0.978 on
        // one machine and 0.982 on another, so the mean carries the 0.98 bar.
        assert!(r >= 0.97, "position {t}: correlation {r}");
        correlations.push(r);
        // Where the adapter changed the top token, both agree on the new one.
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        };
        if argmax(&lw) != argmax(&lp) {
            moved += 1;
            // Both agree on the new top token wherever the trainer's choice is
            // clear (the two bases differ: Q4_1 kernels against f32).
            let mut sorted = lw[..n_vocab].to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 0.5 {
                let llama_adapted = &adapted.prompts[0].log_distributions.as_ref().unwrap()
                    [t * n_vocab..(t + 1) * n_vocab];
                assert_eq!(
                    argmax(llama_adapted),
                    argmax(&lw[..n_vocab]),
                    "position {t}"
                );
            }
        }
    }
    assert!(
        llama_delta.iter().any(|d| d.abs() > 0.5),
        "the adapter moves llama.cpp's distributions visibly"
    );
    let mean = correlations.iter().sum::<f64>() / correlations.len() as f64;
    assert!(mean >= 0.98, "mean correlation {mean}: {correlations:?}");
    eprintln!("top token changed at {moved} of {} positions", plain.len());

    // A second user with another adapter; interleaved generations equal solo ones.
    let dry = engine
        .train_user("dry", &request(), &mut |_| Control::Continue)
        .unwrap();
    assert!(dry.record.is_some());
    let greedy = GenerateOptions {
        max_tokens: 24,
        sampling: Sampling::Greedy,
        repetition_penalty: 1.0,
    };
    let run = |user: &str| {
        engine
            .generate(Some(user), "Product: kettle", &greedy, &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap()
            .text
    };
    let loud_alone = run("loud");
    let dry_alone = run("dry");
    let interleaved = [run("dry"), run("loud"), run("dry"), run("loud")];
    assert_eq!(
        interleaved,
        [
            dry_alone.clone(),
            loud_alone.clone(),
            dry_alone.clone(),
            loud_alone.clone()
        ]
    );
    assert_ne!(loud_alone, dry_alone, "each user gets their own adapter");

    // Forgetting a user deletes their adapter files and checkpoints.
    let files = engine.store().adapters("loud").unwrap();
    assert!(!files.is_empty());
    engine.forget("loud").unwrap();
    for file in files {
        assert!(!file.path.exists(), "{} was deleted", file.path.display());
    }
    assert!(engine.store().adapters("loud").unwrap().is_empty());
    assert!(
        !engine.store().adapters("dry").unwrap().is_empty(),
        "the other user keeps theirs"
    );
}

/// Regression: `eval` resumed a training checkpoint left by an earlier,
/// interrupted benchmark, so it trained fewer steps and reported a shorter
/// training time than the run it claimed to be.
#[test]
fn an_eval_trains_from_scratch_even_when_an_interrupted_run_left_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path());
    let training = TrainConfig {
        checkpoint: Some(CheckpointConfig {
            every_steps: 1,
            ..CheckpointConfig::new(dir.path().join("unused"))
        }),
        ..TrainConfig::default()
    };
    let config = EvalConfig {
        regimes: vec![Regime::Shared],
        decodings: vec![Decoding::Greedy],
        test_users: 1,
        shared_examples_per_user: 2,
        shared_training: training,
        max_new_tokens: 4,
        ..EvalConfig::default()
    };
    // Two users, the last item of each is never trained on: 2 examples each.
    let examples = 4;

    // Steps of the NextQuill training seen by `events`; `stop_after` interrupts it.
    let nextquill_steps = |stop_after: Option<usize>| {
        let (mut in_nextquill, mut steps) = (false, 0);
        let outcome = run(&engine, &config, &mut |event| {
            match event {
                EvalEvent::Stage { name, .. } => {
                    in_nextquill = name.starts_with("training nextquill")
                }
                EvalEvent::Advance { .. } if in_nextquill => steps += 1,
                EvalEvent::Advance { .. } => {}
            }
            match stop_after {
                Some(n) if in_nextquill && steps == n => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        });
        (outcome, steps)
    };

    let (interrupted, steps) = nextquill_steps(Some(2));
    assert!(interrupted.is_err(), "the first run was stopped");
    assert_eq!(steps, 2);
    let checkpoint = engine.checkpoint_dir(SHARED_ADAPTER_USER, &Objective::nextquill());
    assert!(
        checkpoint.join("checkpoint.safetensors").exists(),
        "the interrupted run left its checkpoint"
    );

    let (report, steps) = nextquill_steps(None);
    let report = report.unwrap();
    assert_eq!(report.shared_examples, examples);
    assert_eq!(steps, examples, "every example trained again, none resumed");
    let table = &report.tables[0];
    let names: Vec<_> = table.methods.iter().map(|m| m.method.name()).collect();
    assert_eq!(names, ["base", "history", "sft", "nextquill"]);
    assert!(table.nextquill_minus_sft.is_some());
}
