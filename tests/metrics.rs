//! The metrics against the numbers the reference tools give on fixed
//! sentence pairs written for this test.
//!
//! Every expected number below was printed by `scripts/reference_metrics.py`
//! (run it to regenerate them; these tests never call Python) with
//! Python 3.11.7, rouge-score 0.1.2, nltk 3.10.4 and sacrebleu 2.6.0:
//!
//! - ROUGE: `RougeScorer(["rouge1", "rougeL"], use_stemmer=True)`, `.fmeasure`;
//! - METEOR: `single_meteor_score` on sacrebleu `Tokenizer13a` tokens split on
//!   spaces, with a WordNet stand-in that knows no synonyms;
//! - BLEU: `sacrebleu.corpus_bleu([hypothesis], [[reference]]).score` per pair,
//!   and over all pairs at once;
//! - bootstrap: the same resamples drawn by a Python copy of our generator,
//!   percentiles by `numpy.percentile`.

use nextquill::eval::metrics::{
    bootstrap_mean_ci, corpus_bleu, meteor, paired_bootstrap_diff_ci, rouge, rouge1_f1, rouge_l_f1,
    BleuStats, BootstrapConfig,
};

/// One sentence pair and what the reference tools score it.
struct Case {
    reference: &'static str,
    hypothesis: &'static str,
    rouge_1: f64,
    rouge_l: f64,
    meteor: f64,
    bleu: f64,
}

// Python 3.11.7, rouge-score 0.1.2, nltk 3.10.4, sacrebleu 2.6.0
const CASES: [Case; 18] = [
    Case {
        reference: "The cat sat on the mat.",
        hypothesis: "The cat is sitting on the mat.",
        rouge_1: 0.7692307692307692,
        rouge_l: 0.7692307692307692,
        meteor: 0.8294209702660407,
        bleu: 41.11336169005198,
    },
    Case {
        reference: "I loved running in these shoes; they run true to size!",
        hypothesis: "Loved the shoes, runs true to size and great for runners.",
        rouge_1: 0.5454545454545454,
        rouge_l: 0.5454545454545454,
        meteor: 0.4326923076923077,
        bleu: 12.35622127262679,
    },
    Case {
        reference: "Battery lasts 10 hours, charging takes 2.5 hours.",
        hypothesis: "The battery lasted about 10 hours and charged in 2.5 hours",
        rouge_1: 0.761904761904762,
        rouge_l: 0.761904761904762,
        meteor: 0.6284097797534854,
        bleu: 10.600313379512592,
    },
    Case {
        reference: "GREAT product!!! Highly recommend.",
        hypothesis: "great Product, would highly recommend it to anyone",
        rouge_1: 0.6666666666666666,
        rouge_l: 0.6666666666666666,
        meteor: 0.46296296296296297,
        bleu: 4.767707020457095,
    },
    Case {
        reference: "This blender is loud but powerful.",
        hypothesis: "",
        rouge_1: 0.0,
        rouge_l: 0.0,
        meteor: 0.0,
        bleu: 0.0,
    },
    Case {
        reference: "the the the cat",
        hypothesis: "the cat the cat the cat",
        rouge_1: 0.8,
        rouge_l: 0.8,
        meteor: 0.7514880952380952,
        bleu: 19.304869754804482,
    },
    Case {
        reference: "Caf\u{e9} cr\u{e8}me was tr\u{e8}s bon \u{2014} na\u{ef}ve d\u{e9}lice \u{1f600}",
        hypothesis: "The caf\u{e9} was very good, a naive delight",
        rouge_1: 0.2105263157894737,
        rouge_l: 0.2105263157894737,
        meteor: 0.1111111111111111,
        bleu: 4.767707020457095,
    },
    Case {
        reference: "Model X-200 costs $49.99 (was $59.99) in 2023-24.",
        hypothesis: "The X-200 model costs 49.99 dollars in 2023.",
        rouge_1: 0.7272727272727272,
        rouge_l: 0.6363636363636365,
        meteor: 0.3330498866213152,
        bleu: 6.443030905386945,
    },
    Case {
        reference: "Don't buy it: it's cheaply made & breaks easily.",
        hypothesis: "Do not buy; it's cheap and it broke easily.",
        rouge_1: 0.5,
        rouge_l: 0.4000000000000001,
        meteor: 0.3381818181818182,
        bleu: 9.425159511373677,
    },
    Case {
        reference: "Generously sized, happily used for relational databases and nationalization.",
        hypothesis: "generous size, happy use of rational database nationalized",
        rouge_1: 0.5882352941176471,
        rouge_l: 0.5882352941176471,
        meteor: 0.4732510288065843,
        bleu: 3.817681337429047,
    },
    Case {
        reference: "Arrived quickly and works exactly as described.",
        hypothesis: "Arrived quickly and works exactly as described.",
        rouge_1: 1.0,
        rouge_l: 1.0,
        meteor: 0.9990234375,
        bleu: 100.00000000000004,
    },
    Case {
        reference: "Excellent quality",
        hypothesis: "Terrible service overall",
        rouge_1: 0.0,
        rouge_l: 0.0,
        meteor: 0.0,
        bleu: 0.0,
    },
    Case {
        reference: "quick brown fox jumps over lazy dog",
        hypothesis: "lazy dog jumps over quick brown fox",
        rouge_1: 1.0,
        rouge_l: 0.42857142857142855,
        meteor: 0.9606413994169096,
        bleu: 35.930411196308434,
    },
    Case {
        reference: "Works Well With iPhone",
        hypothesis: "works well with iphone",
        rouge_1: 1.0,
        rouge_l: 1.0,
        meteor: 0.9921875,
        bleu: 0.0,
    },
    Case {
        reference: "Well-made, sturdy\nand easy-to-clean.",
        hypothesis: "well made sturdy and easy to clean",
        rouge_1: 1.0,
        rouge_l: 1.0,
        meteor: 0.3073770491803279,
        bleu: 13.134549472120788,
    },
    Case {
        reference: "Ok",
        hypothesis: "ok.",
        rouge_1: 1.0,
        rouge_l: 1.0,
        meteor: 0.45454545454545453,
        bleu: 0.0,
    },
    Case {
        reference: "The skies cleared; flies were dying, agreed?",
        hypothesis: "sky clears, the fly dies, agree",
        rouge_1: 0.7692307692307692,
        rouge_l: 0.6153846153846153,
        meteor: 0.6476468138275718,
        bleu: 4.300847718252331,
    },
    Case {
        reference: "I bought this kettle for my parents after our old one started leaking, and after three months of daily use it still boils a full litre in under four minutes, the lid seals properly, the handle stays cool, and the only complaint is that the blue light is far too bright at night.",
        hypothesis: "We bought this kettle to replace an old leaking one; after three months of daily use it still boils a litre in about four minutes, the handle stays cool and the lid seals well, but the blue light is much too bright at night.",
        rouge_1: 0.7422680412371134,
        rouge_l: 0.6804123711340205,
        meteor: 0.6715399610136451,
        bleu: 40.317502293782695,
    },
];
const CORPUS_BLEU: f64 = 24.672298094914385;
const CORPUS_HYPOTHESIS_LEN: usize = 172;
const CORPUS_REFERENCE_LEN: usize = 191;
// (estimate, 2.5th, 97.5th percentile): the script's Python copy of the
// SplitMix64 resampler, 2000 resamples, seed 42, `numpy.percentile` (numpy 2.4.6).
const MEAN_CI: (f64, f64, f64) = (0.6711549939391374, 0.5142511874061297, 0.8063516577300845);
const DIFF_CI: (f64, f64, f64) = (
    0.05433552701593938,
    0.008991981672394046,
    0.1250205350205349,
);

/// ROUGE and METEOR agree with the reference tools to this much (0-1 scale).
const TOLERANCE: f64 = 1e-6;
/// BLEU agrees to this many score points (0-100 scale).
const BLEU_TOLERANCE: f64 = 1e-4;

#[test]
fn rouge_matches_rouge_score_with_stemming() {
    for (i, case) in CASES.iter().enumerate() {
        let r = rouge(case.reference, case.hypothesis);
        assert!(
            (r.rouge_1.f1 - case.rouge_1).abs() < TOLERANCE,
            "pair {i}: ROUGE-1 {} vs {}",
            r.rouge_1.f1,
            case.rouge_1
        );
        assert!(
            (r.rouge_l.f1 - case.rouge_l).abs() < TOLERANCE,
            "pair {i}: ROUGE-L {} vs {}",
            r.rouge_l.f1,
            case.rouge_l
        );
        assert_eq!(rouge1_f1(case.reference, case.hypothesis), r.rouge_1.f1);
        assert_eq!(rouge_l_f1(case.reference, case.hypothesis), r.rouge_l.f1);
    }
}

#[test]
fn meteor_matches_nltk_without_wordnet() {
    for (i, case) in CASES.iter().enumerate() {
        let m = meteor(case.reference, case.hypothesis);
        assert!(
            (m - case.meteor).abs() < TOLERANCE,
            "pair {i}: METEOR {m} vs {}",
            case.meteor
        );
    }
}

#[test]
fn bleu_matches_sacrebleu_per_pair_and_over_the_corpus() {
    for (i, case) in CASES.iter().enumerate() {
        let b = corpus_bleu(&[case.hypothesis], &[case.reference]).unwrap();
        assert!(
            (b.score - case.bleu).abs() < BLEU_TOLERANCE,
            "pair {i}: BLEU {} vs {}",
            b.score,
            case.bleu
        );
    }

    let hypotheses: Vec<&str> = CASES.iter().map(|c| c.hypothesis).collect();
    let references: Vec<&str> = CASES.iter().map(|c| c.reference).collect();
    let corpus = corpus_bleu(&hypotheses, &references).unwrap();
    assert!(
        (corpus.score - CORPUS_BLEU).abs() < BLEU_TOLERANCE,
        "corpus BLEU {} vs {CORPUS_BLEU}",
        corpus.score
    );
    assert_eq!(corpus.stats.hypothesis_len, CORPUS_HYPOTHESIS_LEN);
    assert_eq!(corpus.stats.reference_len, CORPUS_REFERENCE_LEN);

    // Summed segment statistics give the same corpus score (what a bootstrap relies on).
    let mut summed = BleuStats::default();
    for case in &CASES {
        summed.add(&BleuStats::segment(case.hypothesis, case.reference));
    }
    assert_eq!(summed.score().score, corpus.score);
}

#[test]
fn bootstrap_intervals_match_numpy_percentiles_of_the_same_resamples() {
    let config = BootstrapConfig {
        resamples: 2000,
        seed: 42,
        level: 0.95,
    };
    let rouge_1: Vec<f64> = CASES.iter().map(|c| c.rouge_1).collect();
    let rouge_l: Vec<f64> = CASES.iter().map(|c| c.rouge_l).collect();

    let mean = bootstrap_mean_ci(&rouge_1, &config).unwrap();
    let diff = paired_bootstrap_diff_ci(&rouge_1, &rouge_l, &config).unwrap();
    for (name, got, (estimate, lo, hi)) in [("mean", mean, MEAN_CI), ("difference", diff, DIFF_CI)]
    {
        assert!((got.estimate - estimate).abs() < 1e-12, "{name}: {got:?}");
        assert!((got.lo - lo).abs() < 1e-12, "{name}: {got:?}");
        assert!((got.hi - hi).abs() < 1e-12, "{name}: {got:?}");
    }
    // ROUGE-L never exceeds ROUGE-1 here, and the interval says the gap is real.
    assert!(diff.excludes(0.0));
}
