//! Evaluation: how close generated text comes to what the user actually wrote.
//!
//! The metrics live in [`metrics`]; the ones a benchmark table needs are
//! re-exported here. [`run`] is the personalization benchmark itself.

pub mod metrics;
mod run;

pub use metrics::{
    bootstrap_mean_ci, corpus_bleu, meteor, paired_bootstrap_diff_ci, rouge1_f1, rouge_l_f1,
    BootstrapConfig, Interval,
};
pub use run::{
    run, Decoding, EvalConfig, EvalEvent, EvalReport, EvalTable, Method, MethodScores, PairedDiff,
    Regime, Sample,
};
