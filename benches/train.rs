//! One training step of each objective on the default model (with-history
//! prompt 300 tokens, counterfactual 160, response 100, 2 threads), and the
//! peak resident memory of each, measured in a fresh child process (VmHWM).
//!
//! Run: `cargo bench --release --bench train` (needs the default model).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{model_path, token_ids};
use criterion::Criterion;
use nextquill::train::{Control, Objective, TrainConfig, TrainExample, Trainer};

const PEAK_ENV: &str = "NEXTQUILL_BENCH_PEAK";

fn example() -> TrainExample {
    TrainExample {
        with_history: token_ids(300, 1),
        counterfactual: token_ids(160, 2),
        response: token_ids(100, 3),
        fixed_weights: None,
    }
}

fn trainer(objective: Objective) -> Trainer {
    let config = TrainConfig {
        objective,
        threads: 2,
        // The bench measures the step and its real peak; the cap is not under test.
        memory_budget_bytes: 16_000_000_000,
        ..TrainConfig::default()
    };
    Trainer::new(model_path(), config).expect("default model")
}

fn one_step(trainer: &Trainer, example: &TrainExample) {
    let outcome = trainer
        .train(std::slice::from_ref(example), &[], &mut |_| {
            Control::Continue
        })
        .unwrap();
    assert_eq!(outcome.summary.steps, 1);
}

fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn objective_named(name: &str) -> Objective {
    match name {
        "sft" => Objective::Sft,
        _ => Objective::nextquill(),
    }
}

fn main() {
    if let Ok(name) = std::env::var(PEAK_ENV) {
        let trainer = trainer(objective_named(&name));
        one_step(&trainer, &example());
        println!("{}", peak_rss_kb());
        return;
    }

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20))
        .configure_from_args();
    let example = example();
    for name in ["nextquill", "sft"] {
        let trainer = trainer(objective_named(name));
        c.bench_function(&format!("train_step_{name}_300_160_100"), |b| {
            b.iter(|| one_step(&trainer, &example))
        });
    }
    c.final_summary();

    for name in ["nextquill", "sft"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .env(PEAK_ENV, name)
            .output()
            .unwrap();
        let kb = String::from_utf8_lossy(&out.stdout).trim().to_string();
        println!("peak resident memory, one {name} step: {kb} kB");
    }
}
