//! Speed of causal preference effects: a 300-token with-history prompt, an
//! 80-token counterfactual and a 100-token response, measured three ways:
//!
//! - `effects`: [`nextquill::effect::measure`], one batch with the prompts'
//!   shared prefix decoded once;
//! - `plain_decode_both`: a bare llama-cpp-2 batch of the same two sequences,
//!   every token decoded, logits at the response positions;
//! - `plain_decode_with_history`: a bare decode of the with-history prompt and
//!   the response alone, what scoring the text without any counterfactual costs.
//!
//! `cargo bench --bench effect`; threads from `NEXTQUILL_THREADS` (default 2).

#[path = "../tests/common/mod.rs"]
mod common;

use std::num::NonZeroU32;
use std::time::Duration;

use common::{model, model_path, threads};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use nextquill::effect::{measure, EffectConfig};
use nextquill::llm::{llama_backend, Model, Session, SessionOptions, TokenId};
use nextquill::prompt::{build_pair, PastText, PromptConfig, PromptPair};

const WITH_HISTORY_TOKENS: usize = 300;
const COUNTERFACTUAL_TOKENS: usize = 80;
const RESPONSE_TOKENS: usize = 100;

/// A real-looking prompt pair of exactly the benchmark's sizes: rendered with
/// the model's chat template, then the history section and the request cut
/// or padded to length. The two prompts share their opening, as real ones do.
fn sized_pair(model: &Model) -> PromptPair {
    let past = "I bought these for my daughter and she wears them every day. \
                The colour held up after many washes and the fit is true to size."
        .repeat(8);
    let history = [PastText {
        request: "Rate and review: Cotton socks, 6 pairs",
        text: &past,
    }];
    let request = "Rate and review: Wool hiking socks. Rating: 5. Title: warm and soft";
    let mut pair = build_pair(
        model,
        &PromptConfig::default(),
        &history,
        request,
        RESPONSE_TOKENS,
        4096,
    )
    .expect("prompt pair");
    resize_keeping_ends(&mut pair.with_history, WITH_HISTORY_TOKENS);
    resize_keeping_ends(&mut pair.counterfactual, COUNTERFACTUAL_TOKENS);
    pair
}

/// Cuts or pads (by repeating a middle token) `tokens` to `len`, keeping
/// the first and last 30 tokens: the template's opening and the request's end.
fn resize_keeping_ends(tokens: &mut Vec<TokenId>, len: usize) {
    let tail: Vec<TokenId> = tokens.split_off(tokens.len() - 30);
    let middle = tokens[tokens.len() / 2];
    tokens.resize(len - tail.len(), middle);
    tokens.extend(tail);
}

fn response(model: &Model) -> Vec<TokenId> {
    let text = "Warm, soft and they do not slip down in my boots. I wore them on a \
                three day hike in the rain and my feet stayed dry and comfortable. "
        .repeat(6);
    let mut ids = model.tokenize_text(&text);
    ids.truncate(RESPONSE_TOKENS);
    assert_eq!(ids.len(), RESPONSE_TOKENS);
    ids
}

/// Decodes every token of `sequences`, each followed by `response`, in one
/// bare llama.cpp batch with logits at the response positions.
fn plain_decode(ctx: &mut LlamaContext<'_>, sequences: &[&[TokenId]], response: &[TokenId]) {
    ctx.clear_kv_cache();
    let total: usize = sequences.iter().map(|s| s.len() + response.len()).sum();
    let mut batch = LlamaBatch::new(total, sequences.len() as i32);
    for (seq, prompt) in sequences.iter().enumerate() {
        let tokens = prompt.iter().chain(response);
        for (pos, &token) in tokens.enumerate() {
            let logits = pos + 1 >= prompt.len() && pos + 1 < prompt.len() + response.len();
            batch
                .add(LlamaToken(token as i32), pos as i32, &[seq as i32], logits)
                .expect("batch sized to fit");
        }
    }
    ctx.decode(&mut batch).expect("plain decode");
}

fn effects(c: &mut Criterion) {
    let model = model();
    let pair = sized_pair(model);
    let response = response(model);
    let shared = pair
        .with_history
        .iter()
        .zip(&pair.counterfactual)
        .take_while(|(a, b)| a == b)
        .count();
    eprintln!(
        "with history {} tokens, counterfactual {} tokens, shared opening {shared}, response {}",
        pair.with_history.len(),
        pair.counterfactual.len(),
        response.len()
    );

    let options = SessionOptions {
        threads: threads(),
        ..SessionOptions::default()
    };
    let mut session = Session::new(model, options).expect("session");
    let config = EffectConfig::default();

    let bare = LlamaModel::load_from_file(
        llama_backend().expect("backend"),
        model_path(),
        &LlamaModelParams::default(),
    )
    .expect("model");
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(4096))
        .with_n_batch(4096)
        .with_n_seq_max(2)
        .with_n_threads(threads() as i32)
        .with_n_threads_batch(threads() as i32);
    let mut ctx = bare
        .new_context(llama_backend().expect("backend"), params)
        .expect("context");

    let mut group = c.benchmark_group("effects_300_80_100");
    group.throughput(Throughput::Elements(RESPONSE_TOKENS as u64));
    group.bench_function("effects", |b| {
        b.iter(|| {
            let effects = measure(&mut session, &pair, &response, &config).expect("effects");
            assert_eq!(effects.tokens.len(), RESPONSE_TOKENS);
        })
    });
    group.bench_function("plain_decode_both", |b| {
        b.iter(|| {
            plain_decode(
                &mut ctx,
                &[&pair.with_history, &pair.counterfactual],
                &response,
            )
        })
    });
    group.bench_function("plain_decode_with_history", |b| {
        b.iter(|| plain_decode(&mut ctx, &[&pair.with_history], &response))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    targets = effects
}
criterion_main!(benches);
