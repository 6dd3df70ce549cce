//! candle's helper threads stay within the trainer's thread budget. Its own
//! test binary, since candle sizes its pool once per process.

#![cfg(target_os = "linux")]

mod common;

use nextquill::train::{Control, Objective, TrainConfig, TrainExample, Trainer};

/// Names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

#[test]
fn candle_helper_threads_follow_the_trainer_thread_count_and_the_app_settings() {
    // An application's own setting wins over the trainer's.
    std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "7");
    let config = TrainConfig {
        objective: Objective::nextquill(),
        threads: 1,
        ..TrainConfig::default()
    };
    let trainer = Trainer::new(common::model_path(), config).expect("default model");
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").as_deref(), Ok("1"));
    assert_eq!(
        std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").as_deref(),
        Ok("7")
    );

    // Long enough that the residual adds and gradient sums reach candle's
    // parallel path (64K elements: 114 positions of a 576-wide model).
    let example = TrainExample {
        with_history: common::token_ids(200, 1),
        counterfactual: common::token_ids(150, 2),
        response: common::token_ids(40, 3),
        fixed_weights: None,
    };
    let outcome = trainer
        .train(std::slice::from_ref(&example), &[], &mut |_| {
            Control::Continue
        })
        .unwrap();
    assert_eq!(outcome.summary.steps, 1);

    let helpers: Vec<_> = thread_names()
        .into_iter()
        .filter(|name| name.starts_with("candle-bp"))
        .collect();
    assert!(
        helpers.is_empty(),
        "a one-thread trainer left candle helper threads: {helpers:?}"
    );
}
