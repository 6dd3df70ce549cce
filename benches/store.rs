//! Speed of the history store on a file database: importing 10,000 items,
//! choosing the history of a user who has 10,000 items (BM25 and recency),
//! and building the prompt pair for a request from that history with the
//! default model's tokenizer and chat template.
//!
//! The texts are the real reviews of `../shared/data`, repeated under new ids,
//! so the full-text index sees a real vocabulary.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use nextquill::prompt::{build_pair, PastText, PromptConfig};
use nextquill::store::{
    HistoryQuery, HistoryStrategy, ImportFormat, ImportOptions, Store, StoreOptions,
};

const USERS_JSONL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/amazon-reviews/users.jsonl"
);
const ITEMS: usize = 10_000;

/// (request, text) of every real review.
fn real_reviews() -> Vec<(String, String)> {
    let data = std::fs::read_to_string(USERS_JSONL).expect("read ../shared/data users.jsonl");
    let mut reviews = Vec::new();
    for line in data.lines() {
        let user: serde_json::Value = serde_json::from_str(line).expect("valid JSON line");
        for entry in user["history"].as_array().expect("history list") {
            let request = entry["input"].as_str().expect("input").to_owned();
            let text = entry["output"].as_str().expect("output").to_owned();
            reviews.push((request, text));
        }
    }
    reviews
}

/// A flat JSONL file of `ITEMS` items of one user, one minute apart.
fn ten_thousand_items(reviews: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for n in 0..ITEMS {
        let (request, text) = &reviews[n % reviews.len()];
        let line = serde_json::json!({
            "user_id": "bench",
            "item_id": format!("b{n:05}"),
            "timestamp": format!("2020-01-{:02}T{:02}:{:02}:00Z", 1 + n / 1440, n / 60 % 24, n % 60),
            "input": request,
            "output": text,
        });
        writeln!(out, "{line}").expect("write to memory");
    }
    out
}

fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

fn bench_store(c: &mut Criterion) {
    let reviews = real_reviews();
    let jsonl = ten_thousand_items(&reviews);
    let options = ImportOptions {
        format: ImportFormat::Jsonl,
        ..ImportOptions::default()
    };

    let mut group = c.benchmark_group("store");
    group.sample_size(10);
    group.bench_function("import 10k items (file db)", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = Store::open(dir.path().join("b.db"), StoreOptions::default())
                    .expect("open store");
                (dir, store)
            },
            |(dir, store)| {
                let report = store
                    .import_reader(jsonl.as_slice(), &options, &mut |_| {})
                    .expect("import");
                assert_eq!(report.imported, ITEMS);
                (dir, store)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();

    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path().join("r.db"), StoreOptions::default()).expect("open store");
    store
        .import_reader(jsonl.as_slice(), &options, &mut |_| {})
        .expect("import");
    // A request from the middle of the history: half the items are older.
    let before = "b05000";
    let request = store
        .item("bench", before)
        .expect("read")
        .expect("item")
        .request;

    let recency_request = request.clone();
    let mut group = c.benchmark_group("store");
    let bm25 = HistoryQuery {
        strategy: HistoryStrategy::Bm25 { query: request },
        ..HistoryQuery::default()
    };
    group.bench_function("bm25 top-8 of 10k items", |b| {
        b.iter(|| {
            let chosen = store
                .history_for("bench", Some(before), &bm25, &words)
                .expect("bm25");
            assert!(!chosen.is_empty() && chosen.len() <= 8);
        })
    });
    let recency = HistoryQuery::default();
    group.bench_function("recency top-8 of 10k items", |b| {
        b.iter(|| {
            let chosen = store
                .history_for("bench", Some(before), &recency, &words)
                .expect("recency");
            assert!(!chosen.is_empty() && chosen.len() <= 8);
        })
    });

    // What the engine does before scoring or training on one item: choose the
    // history (counted in model tokens) and render both prompts.
    let model = common::model();
    let config = PromptConfig::default();
    let tokens = |text: &str| model.tokenize_text(text).len();
    group.bench_function("prompt pair from 10k items (recency, 8 shown)", |b| {
        b.iter(|| {
            let chosen = store
                .history_for("bench", Some(before), &recency, &tokens)
                .expect("recency");
            let past: Vec<PastText<'_>> = chosen
                .iter()
                .map(|item| PastText {
                    request: &item.request,
                    text: &item.text,
                })
                .collect();
            let pair = build_pair(model, &config, &past, &recency_request, 256, 4096)
                .expect("prompt pair");
            assert!(pair.history_used > 0 && pair.with_history.len() > pair.counterfactual.len());
        })
    });
    group.finish();
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
