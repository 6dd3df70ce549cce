//! Adapter costs in llama.cpp: switching the active adapter between two
//! users, and generation speed with a rank-8 q/v adapter against none.
//!
//! `cargo bench --bench adapter`; threads from `NEXTQUILL_THREADS` (default 2).

#[path = "../tests/common/mod.rs"]
mod common;

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;

use common::{model_path, threads};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nextquill::adapter::{write_gguf, AdapterMeta, LoraPair, LoraTarget, LoraWeights};
use nextquill::llm::{
    AdapterId, GenerateOptions, Model, ModelOptions, ScoreOptions, Session, SessionOptions,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const NEW_TOKENS: usize = 64;
const SCORED_TOKENS: usize = 32;

/// A rank-8, alpha-16 adapter on q and v of every layer, small enough that
/// the model keeps counting under it.
fn write_user_adapter(model: &Model, seed: u64, path: &Path) {
    let info = model.info();
    let n_embd = info.n_embd as usize;
    let kv_width = n_embd / info.n_head as usize * info.n_head_kv as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut uniform = |n: usize, range: f32| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-range..range)).collect()
    };
    let mut pairs = Vec::new();
    for layer in 0..info.n_layer as usize {
        for (target, n_out) in [(LoraTarget::Q, n_embd), (LoraTarget::V, kv_width)] {
            pairs.push(LoraPair {
                layer,
                target,
                n_in: n_embd,
                n_out,
                lora_a: uniform(8 * n_embd, 0.1),
                lora_b: uniform(n_out * 8, 0.01),
            });
        }
    }
    let weights = LoraWeights {
        rank: 8,
        alpha: 16.0,
        pairs,
    };
    let meta = AdapterMeta::for_model(info, "bench", serde_json::Value::Null);
    write_gguf(&weights, &meta, path).expect("write adapter");
}

/// A counting prompt: the model keeps counting, so no end-of-generation
/// token cuts a timed generation short.
fn counting_prompt(model: &Model, tokens: usize) -> Vec<u32> {
    let text: String = (1..500).map(|i| format!("{i}, ")).collect();
    let mut ids = model.tokenize_text(&text);
    ids.truncate(tokens);
    ids
}

fn session(model: &Model) -> Session<'_> {
    let options = SessionOptions {
        n_ctx: 512,
        n_batch: 512,
        max_sequences: 1,
        threads: threads(),
        ..SessionOptions::default()
    };
    Session::new(model, options).expect("session")
}

fn bench_adapters(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut model = Model::load(model_path(), &ModelOptions::default()).expect("load model");
    let (path_a, path_b) = (
        dir.path().join("user_a.gguf"),
        dir.path().join("user_b.gguf"),
    );
    write_user_adapter(&model, 1, &path_a);
    write_user_adapter(&model, 2, &path_b);
    let user_a = model.load_adapter(&path_a).expect("load adapter a");
    let user_b = model.load_adapter(&path_b).expect("load adapter b");
    let model = model;

    let prompt = counting_prompt(&model, 48);
    let response = counting_prompt(&model, 48 + SCORED_TOKENS)[48..].to_vec();
    let mut session = session(&model);

    let mut group = c.benchmark_group("adapter_switch");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    let score = |session: &mut Session<'_>| {
        session
            .score(&[&prompt], &response, &ScoreOptions::default())
            .expect("score")
    };
    group.bench_function("set_adapter_only", |b| {
        let mut next = [user_a, user_b].into_iter().cycle();
        b.iter(|| session.set_adapter(next.next(), 1.0).expect("set adapter"))
    });
    session.set_adapter(Some(user_a), 1.0).expect("set adapter");
    group.bench_function("score_80_tokens_same_adapter", |b| {
        b.iter(|| score(&mut session))
    });
    group.bench_function("switch_user_then_score_80_tokens", |b| {
        let mut next = [user_b, user_a].into_iter().cycle();
        b.iter(|| {
            session.set_adapter(next.next(), 1.0).expect("set adapter");
            score(&mut session)
        })
    });
    group.finish();

    let mut group = c.benchmark_group("adapter_generate");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(NEW_TOKENS as u64));
    let prompt = counting_prompt(&model, 32);
    let options = GenerateOptions {
        max_tokens: NEW_TOKENS,
        ..GenerateOptions::default()
    };
    let cases: [(&str, Option<AdapterId>); 2] = [("no_adapter", None), ("rank8_qv", Some(user_a))];
    for (name, adapter) in cases {
        session.set_adapter(adapter, 1.0).expect("set adapter");
        group.bench_function(name, |b| {
            // Time only the new tokens: the prompt is the same in both cases.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let generation = session
                        .generate(&prompt, &options, &mut |_| ControlFlow::Continue(()))
                        .expect("generate");
                    assert_eq!(
                        generation.tokens.len(),
                        NEW_TOKENS,
                        "generation stopped early"
                    );
                    total += Duration::from_secs_f64(generation.generate_seconds);
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_adapters);
criterion_main!(benches);
