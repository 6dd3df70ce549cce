//! Causal preference effects on the real default model: exact zeros for a
//! history that is the counterfactual, joint batch against separate passes,
//! the reference weights, a real user's repeated phrase, and the HTML page.

mod common;

use std::collections::HashMap;

use nextquill::effect::{self, preference_weights, EffectConfig, Effects};
use nextquill::llm::{PrefixSharing, ScoreOptions, Session, SessionOptions};
use nextquill::prompt::{build_pair, PastText, PromptConfig, PromptPair};
use serde_json::Value;

fn session() -> Session<'static> {
    Session::new(common::model(), SessionOptions::default()).expect("session")
}

fn pair(history: &[PastText<'_>], request: &str, response_tokens: usize) -> PromptPair {
    build_pair(
        common::model(),
        &PromptConfig::default(),
        history,
        request,
        response_tokens,
        SessionOptions::default().n_ctx as usize,
    )
    .expect("pair")
}

#[test]
fn a_history_that_is_the_counterfactual_has_exactly_zero_effect() {
    let model = common::model();
    let response =
        model.tokenize_text("Lovely kettle, boils in two minutes and pours without dripping.");
    let with = pair(
        &[PastText {
            request: "Product: tea towel",
            text: "Lovely and soft.",
        }],
        "Product: kettle",
        response.len(),
    );
    // The with-history prompt is literally the counterfactual.
    let same = PromptPair {
        with_history: with.counterfactual.clone(),
        counterfactual: with.counterfactual.clone(),
        history_used: 0,
    };
    let effects =
        effect::measure(&mut session(), &same, &response, &EffectConfig::default()).unwrap();
    assert_eq!(effects.tokens.len(), response.len());
    for token in &effects.tokens {
        assert_eq!(token.delta_p, 0.0, "{token:?}");
        assert_eq!(token.delta_logp, 0.0, "{token:?}");
        assert!(!token.preference_bearing);
    }
    // No token is preference-bearing, so every weight is epsilon / (n * epsilon).
    let uniform = 1.0 / response.len() as f32;
    assert!(effects
        .tokens
        .iter()
        .all(|t| (t.weight - uniform).abs() < 1e-6));
}

#[test]
fn joint_batch_effects_equal_two_separate_passes() {
    let model = common::model();
    let response = model.tokenize_text("Absolutely love it!! Five stars from me!");
    let history = [
        PastText {
            request: "Product: mug",
            text: "Absolutely love these mugs!! Five stars from me!",
        },
        PastText {
            request: "Product: candle",
            text: "Absolutely love this candle!! Five stars from me!",
        },
    ];
    let pair = pair(&history, "Product: scarf", response.len());
    let effects =
        effect::measure(&mut session(), &pair, &response, &EffectConfig::default()).unwrap();

    let alone = ScoreOptions {
        prefix: PrefixSharing::Separate,
        ..ScoreOptions::default()
    };
    let with = session()
        .score(&[&pair.with_history], &response, &alone)
        .unwrap();
    let without = session()
        .score(&[&pair.counterfactual], &response, &alone)
        .unwrap();
    for (t, token) in effects.tokens.iter().enumerate() {
        let (lw, lo) = (with.prompts[0].logprobs[t], without.prompts[0].logprobs[t]);
        assert_eq!((token.logp_with, token.logp_without), (lw, lo), "t {t}");
        assert_eq!(token.delta_p, lw.exp() - lo.exp(), "t {t}");
    }
    // The repeated sign-off is what this history causes.
    assert!(effects.preference_bearing_share() > 0.0);
}

#[test]
fn weights_and_flags_reproduce_the_reference_vectors() {
    let text =
        std::fs::read_to_string(common::shared("vectors/nextquill_loss_vectors.json")).unwrap();
    let vectors: Value = serde_json::from_str(&text).unwrap();
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let cases = vectors["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let ignored: Vec<usize> = case["ignored_positions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let keep = |v: Vec<f32>| -> Vec<f32> {
            v.into_iter()
                .enumerate()
                .filter(|(t, _)| !ignored.contains(t))
                .map(|(_, x)| x)
                .collect()
        };
        let p_with = keep(floats(&case["pA_label"]));
        let p_without = keep(floats(&case["pB_label"]));
        let (weights, flags) = preference_weights(&p_with, &p_without, &EffectConfig::default());
        let expected_weights = keep(floats(&case["weights"]));
        let expected_flags: Vec<bool> = case["is_high"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(t, _)| !ignored.contains(t))
            .map(|(_, v)| v.as_bool().unwrap_or_else(|| v.as_f64() == Some(1.0)))
            .collect();
        assert_eq!(flags, expected_flags, "case {}", case["name"]);
        for (w, e) in weights.iter().zip(&expected_weights) {
            assert!((w - e).abs() <= 1e-6, "case {}: {w} vs {e}", case["name"]);
        }
    }
}

/// One real user's texts, oldest first, from the shared data.
fn real_users() -> Vec<(String, Vec<(String, String)>)> {
    let text = std::fs::read_to_string(common::shared("data/amazon-reviews/users.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let user: Value = serde_json::from_str(line).unwrap();
            let items = user["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| {
                    (
                        i["input"].as_str().unwrap().to_owned(),
                        i["output"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            (user["user_id"].as_str().unwrap().to_owned(), items)
        })
        .collect()
}

/// A word of at least 6 letters that a user repeats in two texts and that is
/// rare across everyone's texts: the kind of habit a history causes.
fn rare_repeated_word(
    all: &[(String, Vec<(String, String)>)],
) -> Option<(usize, usize, usize, String)> {
    let words = |text: &str| -> Vec<String> {
        text.split(|c: char| !c.is_alphabetic())
            .filter(|w| w.len() >= 6)
            .map(str::to_lowercase)
            .collect()
    };
    let mut corpus: HashMap<String, usize> = HashMap::new();
    for (_, items) in all {
        for (_, text) in items {
            for w in words(text) {
                *corpus.entry(w).or_default() += 1;
            }
        }
    }
    for (u, (_, items)) in all.iter().enumerate() {
        for later in 1..items.len() {
            for earlier in (0..later).rev().take(3) {
                let before = words(&items[earlier].1);
                for w in words(&items[later].1) {
                    // Only in this pair of texts across the whole data set.
                    if corpus[&w] == 2 && before.contains(&w) {
                        return Some((u, earlier, later, w));
                    }
                }
            }
        }
    }
    None
}

#[test]
fn a_real_users_rare_repeated_word_gets_more_effect_than_function_words() {
    let all = real_users();
    let (u, earlier, later, word) =
        rare_repeated_word(&all).expect("a rare repeated word in the data");
    let items = &all[u].1;
    let history = [PastText {
        request: &items[earlier].0,
        text: &items[earlier].1,
    }];
    let model = common::model();
    let mut response = model.tokenize_text(&items[later].1);
    response.truncate(200);
    let pair = pair(&history, &items[later].0, response.len());
    let effects: Effects =
        effect::measure(&mut session(), &pair, &response, &EffectConfig::default()).unwrap();

    // The effect of the word: the largest Δp among the tokens that spell its
    // first occurrence.
    let text = effects.text().to_lowercase();
    let start = text.find(&word).expect("word in the decoded response");
    let mut offset = 0;
    let mut word_effect = f32::MIN;
    for token in &effects.tokens {
        let range = offset..offset + token.text.len();
        if range.start < start + word.len() && range.end > start {
            word_effect = word_effect.max(token.delta_p);
        }
        offset = range.end;
    }
    let function: Vec<f32> = effects
        .tokens
        .iter()
        .filter(|t| {
            matches!(
                t.text.trim().to_lowercase().as_str(),
                "the" | "a" | "and" | "of" | "to" | "is" | "it" | "in" | "for"
            )
        })
        .map(|t| t.delta_p)
        .collect();
    assert!(!function.is_empty());
    let mean_function = function.iter().sum::<f32>() / function.len() as f32;
    assert!(
        word_effect > mean_function,
        "user {} word {word:?}: effect {word_effect} vs function words {mean_function}",
        all[u].0
    );
}

#[test]
fn html_page_is_well_formed_with_one_element_per_token() {
    let model = common::model();
    let response = model.tokenize_text("Biscuit <3 \"loves\" it & so do I 😀 — 很好");
    let pair = pair(
        &[PastText {
            request: "Product: dog bed",
            text: "Biscuit loves it.",
        }],
        "Product: dog toy",
        response.len(),
    );
    let effects =
        effect::measure(&mut session(), &pair, &response, &EffectConfig::default()).unwrap();
    let html = effect::to_html(&effects, "a <test> page");

    // The page is XHTML: an XML parser checks that it is well formed.
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(&html, options).expect("well-formed XHTML");
    let token_spans = doc
        .descendants()
        .filter(|n| n.has_tag_name("span"))
        .filter(|n| {
            n.attribute("class")
                .is_some_and(|c| c.split(' ').any(|c| c == "t"))
        })
        .collect::<Vec<_>>();
    assert_eq!(token_spans.len(), effects.tokens.len());
    let shown: String = token_spans.iter().map(|n| n.text().unwrap_or("")).collect();
    assert_eq!(shown, effects.text(), "the spans spell the response");
    assert!(!html.contains("<test>"), "the title is escaped");
}
