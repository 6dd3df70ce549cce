//! Runtime speed: nextquill's prompt processing, generation and joint scoring
//! next to a bare llama-cpp-2 loop on the same model, threads and tokens.
//!
//! `cargo bench --bench llm`; threads from `NEXTQUILL_THREADS` (default 2).

#[path = "../tests/common/mod.rs"]
mod common;

use std::num::NonZeroU32;
use std::ops::ControlFlow;
use std::time::Duration;

use common::{model_path, threads};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use nextquill::llm::{
    llama_backend, GenerateOptions, Model, ModelOptions, PrefixSharing, ScoreOptions, Session,
    SessionOptions,
};

const PROMPT_TOKENS: usize = 300;
const NEW_TOKENS: usize = 64;

/// A counting prompt: the model keeps counting, so no end-of-generation
/// token cuts a timed generation short.
fn counting_prompt(model: &Model, tokens: usize) -> Vec<u32> {
    let text: String = (1..2000).map(|i| format!("{i}, ")).collect();
    let mut ids = model.tokenize_text(&text);
    ids.truncate(tokens);
    ids
}

/// The bare loop: what an app would write with llama-cpp-2 alone.
struct Bare {
    model: LlamaModel,
}

impl Bare {
    fn context(&self) -> llama_cpp_2::context::LlamaContext<'_> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(4096))
            .with_n_batch(4096)
            .with_n_threads(threads() as i32)
            .with_n_threads_batch(threads() as i32);
        self.model
            .new_context(llama_backend().unwrap(), params)
            .unwrap()
    }

    fn prompt(&self, ctx: &mut llama_cpp_2::context::LlamaContext<'_>, prompt: &[u32]) {
        ctx.clear_kv_cache();
        let mut batch = LlamaBatch::new(prompt.len(), 1);
        for (i, &t) in prompt.iter().enumerate() {
            batch
                .add(LlamaToken(t as i32), i as i32, &[0], i + 1 == prompt.len())
                .unwrap();
        }
        ctx.decode(&mut batch).unwrap();
    }

    fn generate(&self, ctx: &mut llama_cpp_2::context::LlamaContext<'_>, prompt: &[u32]) -> usize {
        self.prompt(ctx, prompt);
        let mut sampler = LlamaSampler::greedy();
        let mut batch = LlamaBatch::new(1, 1);
        let mut row = prompt.len() as i32 - 1;
        for n in 0..NEW_TOKENS {
            let token = sampler.sample(ctx, row);
            if n + 1 == NEW_TOKENS {
                break;
            }
            batch.clear();
            batch
                .add(token, (prompt.len() + n) as i32, &[0], true)
                .unwrap();
            ctx.decode(&mut batch).unwrap();
            row = 0;
        }
        NEW_TOKENS
    }
}

fn runtime(c: &mut Criterion) {
    let model = Model::load(model_path(), &ModelOptions::default()).expect("run models/fetch.sh");
    let bare = Bare {
        model: LlamaModel::load_from_file(
            llama_backend().unwrap(),
            model_path(),
            &LlamaModelParams::default(),
        )
        .unwrap(),
    };
    let options = SessionOptions {
        threads: threads(),
        ..SessionOptions::default()
    };
    let mut session = Session::new(&model, options).unwrap();
    let mut ctx = bare.context();
    let prompt = counting_prompt(&model, PROMPT_TOKENS);
    let short_prompt = counting_prompt(&model, 20);

    let mut group = c.benchmark_group("prompt_300");
    group.throughput(Throughput::Elements(PROMPT_TOKENS as u64));
    group.bench_function("nextquill", |b| {
        let only_prompt = GenerateOptions {
            max_tokens: 0,
            ..GenerateOptions::default()
        };
        b.iter(|| {
            session
                .generate(&prompt, &only_prompt, &mut |_| ControlFlow::Continue(()))
                .unwrap()
        })
    });
    group.bench_function("bare_llama_cpp", |b| {
        b.iter(|| bare.prompt(&mut ctx, &prompt))
    });
    group.finish();

    let greedy = GenerateOptions {
        max_tokens: NEW_TOKENS,
        ..GenerateOptions::default()
    };
    let check = session
        .generate(&short_prompt, &greedy, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(
        check.tokens.len(),
        NEW_TOKENS,
        "the counting prompt must not stop early"
    );

    let mut group = c.benchmark_group("generate_64");
    group.throughput(Throughput::Elements(NEW_TOKENS as u64));
    group.bench_function("nextquill", |b| {
        b.iter(|| {
            session
                .generate(&short_prompt, &greedy, &mut |_| ControlFlow::Continue(()))
                .unwrap()
        })
    });
    group.bench_function("bare_llama_cpp", |b| {
        b.iter(|| bare.generate(&mut ctx, &short_prompt))
    });
    group.finish();

    // Two 300-token sequences with a 40-token response each: one joint batch
    // against two separate scoring passes.
    let response = counting_prompt(&model, 40);
    let first = counting_prompt(&model, PROMPT_TOKENS);
    let mut second = first.clone();
    second[0] = model.tokenize_text("0")[0];
    let separate = ScoreOptions {
        prefix: PrefixSharing::Separate,
        ..ScoreOptions::default()
    };
    let mut group = c.benchmark_group("score_two_300");
    group.throughput(Throughput::Elements(2 * (PROMPT_TOKENS + 40) as u64));
    group.bench_function(BenchmarkId::new("joint_batch", "separate_layout"), |b| {
        b.iter(|| {
            session
                .score(&[&first, &second], &response, &separate)
                .unwrap()
        })
    });
    group.bench_function(BenchmarkId::new("two_passes", "separate_layout"), |b| {
        b.iter(|| {
            session.score(&[&first], &response, &separate).unwrap();
            session.score(&[&second], &response, &separate).unwrap();
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    targets = runtime
}
criterion_main!(benches);
