//! Text-similarity metrics that match the reference implementations the
//! field reports with, and bootstrap intervals for comparing methods.
//!
//! | metric | matches | tokens | scale |
//! |---|---|---|---|
//! | [`rouge1_f1`], [`rouge_l_f1`], [`rouge()`] | Google `rouge-score` 0.1.2, `use_stemmer=True` | its own: lowercase, `[a-z0-9]` runs, Porter stems | 0-1 |
//! | [`meteor()`] | NLTK 3.10.4 `single_meteor_score`, exact + stem stages only (no WordNet synonyms) | sacrebleu `13a`, lowercased | 0-1 |
//! | [`corpus_bleu`] | sacrebleu 2.6.0 defaults (13a, `exp` smoothing, 4-grams) | sacrebleu `13a`, case kept | 0-100 |
//!
//! Both stemmed metrics use [`porter_stem`], NLTK's default Porter stemmer
//! (the one `rouge-score` calls too). `tests/metrics.rs` holds the numbers the
//! reference tools gave on fixed sentence pairs, and
//! `scripts/reference_metrics.py` regenerates them.
//!
//! [`bootstrap_mean_ci`] and [`paired_bootstrap_diff_ci`] put seeded 95%
//! percentile intervals around a mean score and around the difference of
//! two methods scored on the same items.

mod bleu;
mod bootstrap;
mod meteor;
mod rouge;

pub use crate::porter::porter_stem;
pub use bleu::{corpus_bleu, tokenize_13a, BleuScore, BleuStats, MAX_NGRAM_ORDER};
pub use bootstrap::{
    bootstrap_mean_ci, bootstrap_statistic, paired_bootstrap_diff_ci, BootstrapConfig, Interval,
};
pub use meteor::{meteor, meteor_tokens, MeteorParams};
pub use rouge::{
    rouge, rouge1_f1, rouge_1_tokens, rouge_l_f1, rouge_l_tokens, rouge_tokens, Rouge, RougeScore,
};
