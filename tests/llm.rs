//! The llama.cpp runtime on the real default model: loading, tokenizing,
//! scoring several prompts in one batch, and generation.

mod common;

use std::ops::ControlFlow;

use common::{model, model_path, shared};
use nextquill::llm::{
    FinishReason, GenerateOptions, Model, ModelOptions, PrefixSharing, Role, Sampling,
    ScoreOptions, Session, SessionOptions,
};
use nextquill::Error;

fn session() -> Session<'static> {
    Session::new(model(), SessionOptions::default()).expect("session")
}

#[test]
fn model_info_describes_smollm2() {
    let info = model().info();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.n_layer, 30);
    assert_eq!(info.n_embd, 576);
    assert_eq!((info.n_head, info.n_head_kv), (9, 3));
    assert_eq!(info.n_vocab, 49152);
    assert!(info
        .chat_template
        .as_deref()
        .unwrap_or("")
        .contains("<|im_start|>"));
    assert_eq!(info.fingerprint.len(), 64);
}

#[test]
fn fingerprint_is_stable_across_loads_and_copies() {
    let options = ModelOptions {
        vocab_only: true,
        ..ModelOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.gguf");
    std::fs::copy(model_path(), &copy).unwrap();
    let again = Model::load(&copy, &options).unwrap();
    assert_eq!(again.fingerprint(), model().fingerprint());
}

#[test]
fn tokenizer_matches_the_reference_tokenization() {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared("vectors/hf_logits.json")).unwrap()).unwrap();
    let text = reference["text"].as_str().unwrap();
    let expected: Vec<u32> = reference["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(model().tokenize_text(text), expected);
    assert_eq!(model().detokenize(&expected).unwrap(), text);
}

#[test]
fn chat_template_renders_chatml() {
    let prompt = model().render_chat(&[(Role::User, "Hello")], true).unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
    let ids = model().tokenize_prompt(&prompt);
    // <|im_start|> is one control token, not its spelling.
    assert_eq!(ids.iter().filter(|&&t| t == ids[0]).count(), 2);
    assert!(model().tokenize_text("<|im_start|>").len() > 1);
}

#[test]
fn greedy_generation_is_deterministic() {
    let prompt = model().tokenize_prompt(
        &model()
            .render_chat(&[(Role::User, "Write one sentence about tea.")], true)
            .unwrap(),
    );
    let options = GenerateOptions {
        max_tokens: 24,
        ..GenerateOptions::default()
    };
    let mut first_session = session();
    let first = first_session
        .generate(&prompt, &options, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let second = first_session
        .generate(&prompt, &options, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let third = session()
        .generate(&prompt, &options, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert!(!first.tokens.is_empty());
    assert_eq!(first.tokens, second.tokens);
    assert_eq!(first.tokens, third.tokens);
    assert_eq!(first.text, model().detokenize(&first.tokens).unwrap());
}

#[test]
fn seeded_sampling_repeats_and_seeds_differ() {
    let prompt = model().tokenize_prompt("Once upon a time");
    let sample = |seed| {
        let options = GenerateOptions {
            max_tokens: 32,
            sampling: Sampling::Sample {
                temperature: 1.2,
                top_p: 0.95,
                seed,
            },
            repetition_penalty: 1.2,
        };
        session()
            .generate(&prompt, &options, &mut |_| ControlFlow::Continue(()))
            .unwrap()
            .tokens
    };
    assert_eq!(sample(7), sample(7));
    assert_ne!(sample(7), sample(8));
}

#[test]
fn callback_can_stop_generation() {
    let prompt = model().tokenize_prompt("1, 2, 3, 4,");
    let mut pieces = 0;
    let generation = session()
        .generate(&prompt, &GenerateOptions::default(), &mut |_| {
            pieces += 1;
            if pieces == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(pieces, 3);
    assert_eq!(generation.finish, nextquill::llm::FinishReason::Stopped);
}

#[test]
fn streamed_emoji_and_cjk_pieces_are_whole_utf8() {
    let pattern = "1. 🍎 苹果\n2. 🍌 香蕉\n3. 🍇 葡萄\n";
    let prompt = model().tokenize_prompt(&pattern.repeat(6));
    let options = GenerateOptions {
        max_tokens: 40,
        ..GenerateOptions::default()
    };
    let mut pieces: Vec<String> = Vec::new();
    let generation = session()
        .generate(&prompt, &options, &mut |piece| {
            pieces.push(piece.to_owned());
            ControlFlow::Continue(())
        })
        .unwrap();
    let joined = pieces.concat();
    // The model continues the pattern, so characters split over tokens occur.
    assert!(joined.chars().any(|c| c as u32 > 0xFFFF), "{joined:?}");
    assert!(
        joined
            .chars()
            .any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)),
        "{joined:?}"
    );
    // Only a character cut by the token limit may end as U+FFFD (as in the
    // one-shot decode); every other piece holds whole characters.
    let body = match generation.finish {
        FinishReason::MaxTokens => joined.strip_suffix('\u{fffd}').unwrap_or(&joined),
        _ => &joined,
    };
    assert!(!body.contains('\u{fffd}'), "{joined:?}");
    assert_eq!(joined, generation.text);
    assert_eq!(joined, model().detokenize(&generation.tokens).unwrap());
}

/// A with-history prompt and its counterfactual that share a long opening
/// (more than one attention tile), and a response.
fn two_prompts() -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let m = model();
    let opening = "You write product reviews for a shop. Be honest and specific: \
                   mention the material, the fit, the price, and how the thing held \
                   up after a few weeks of daily use. Keep it under a hundred words. "
        .repeat(2);
    let chat = |history: &str| {
        let request = format!("{opening}Past reviews: {history}\nWrite a review of a scarf.");
        m.tokenize_prompt(&m.render_chat(&[(Role::User, &request)], true).unwrap())
    };
    let with = chat("I adore this brand, the fabric is dreamy.");
    let without = chat("None");
    let response = m.tokenize_text("The fabric is dreamy and I adore the colour.");
    (with, without, response)
}

/// Regression: llama.cpp's CPU flash attention sums a query's keys tile by
/// tile, so the same sequence placed at another KV-cache offset scored up to
/// 0.3 nat differently. Every offset must now give the scores it gets alone.
#[test]
fn a_sequence_scores_the_same_whatever_comes_before_it_in_the_batch() {
    let (with, _, response) = two_prompts();
    let filler = model().tokenize_text(&"Unrelated words fill the cache here. ".repeat(16));
    let mut s = session();
    let separate = ScoreOptions {
        prefix: PrefixSharing::Separate,
        ..ScoreOptions::default()
    };
    let alone = s.score(&[&with], &response, &separate).unwrap();
    for k in [1, 2, 5, 13, 30, 63, 64, 65, 100] {
        let joint = s
            .score(&[&filler[..k], &with], &response, &separate)
            .unwrap();
        assert_eq!(
            joint.prompts[1].logprobs, alone.prompts[0].logprobs,
            "{k} tokens before"
        );
    }
}

#[test]
fn two_prompts_in_one_batch_score_as_each_alone() {
    let (with, without, response) = two_prompts();
    let mut s = session();
    let separate = ScoreOptions {
        prefix: PrefixSharing::Separate,
        ..ScoreOptions::default()
    };
    let joint = s.score(&[&with, &without], &response, &separate).unwrap();
    let alone_with = s.score(&[&with], &response, &separate).unwrap();
    let alone_without = s.score(&[&without], &response, &separate).unwrap();
    for (joint, alone) in [
        (&joint.prompts[0], &alone_with),
        (&joint.prompts[1], &alone_without),
    ] {
        assert_eq!(joint.logprobs, alone.prompts[0].logprobs);
    }
    assert_ne!(joint.prompts[0].logprobs, joint.prompts[1].logprobs);
    assert!(joint.prompts[0]
        .logprobs
        .iter()
        .all(|&lp| lp.is_finite() && lp <= 0.0));
}

#[test]
fn shared_prefix_scores_match_separate_decoding() {
    let (with, without, response) = two_prompts();
    let mut s = session();
    let options = ScoreOptions {
        distributions: true,
        ..ScoreOptions::default()
    };
    let shared = s.score(&[&with, &without], &response, &options).unwrap();
    let separate = s
        .score(
            &[&with, &without],
            &response,
            &ScoreOptions {
                prefix: PrefixSharing::Separate,
                ..options
            },
        )
        .unwrap();
    assert!(shared.decoded_tokens < separate.decoded_tokens);
    for (a, b) in shared.prompts.iter().zip(&separate.prompts) {
        assert_eq!(a.logprobs, b.logprobs);
        assert_eq!(a.log_distributions, b.log_distributions);
    }
    let dist = shared.prompts[0].log_distributions.as_ref().unwrap();
    assert_eq!(dist.len(), response.len() * model().n_vocab());
    let total: f64 = dist[..model().n_vocab()]
        .iter()
        .map(|&l| f64::from(l).exp())
        .sum();
    assert!((total - 1.0).abs() < 1e-4, "{total}");
    // The log-probability of the label equals its entry in the distribution.
    let t = 3;
    let row = &dist[t * model().n_vocab()..(t + 1) * model().n_vocab()];
    assert_eq!(row[response[t] as usize], shared.prompts[0].logprobs[t]);
}

#[test]
fn identical_prompts_give_identical_scores() {
    let (with, _, response) = two_prompts();
    let scores = session()
        .score(&[&with, &with], &response, &ScoreOptions::default())
        .unwrap();
    assert_eq!(scores.prompts[0].logprobs, scores.prompts[1].logprobs);
}

#[test]
fn oversize_prompt_is_context_overflow_and_the_process_lives_on() {
    let options = SessionOptions {
        n_ctx: 64,
        n_batch: 64,
        n_ubatch: 64,
        ..SessionOptions::default()
    };
    let mut s = Session::new(model(), options).unwrap();
    let long = model().tokenize_text(&"lorem ipsum dolor ".repeat(40));
    assert!(long.len() > 64);
    let err = s
        .generate(&long, &GenerateOptions::default(), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::ContextOverflow { needed, available: 64, .. } if needed == long.len() + 100),
        "{err}"
    );
    let short = model().tokenize_text("hello");
    let err = s
        .score(&[&long, &short], &short, &ScoreOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { .. }), "{err}");

    // Still usable afterwards.
    let ok = s
        .generate(
            &short,
            &GenerateOptions {
                max_tokens: 4,
                ..GenerateOptions::default()
            },
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(ok.tokens.len(), 4);
}

#[test]
fn out_of_vocabulary_token_is_refused() {
    let err = session()
        .score(&[&[1, 2, 3]], &[49152], &ScoreOptions::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                name: "token id",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn truncated_model_file_is_a_typed_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(model_path()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = Model::load(&truncated, &ModelOptions::default()).unwrap_err();
    match &err {
        Error::InvalidModel { path, reason } => {
            assert_eq!(path, &truncated);
            assert!(reason.contains("truncated"), "{reason}");
        }
        other => panic!("expected InvalidModel, got {other}"),
    }
    assert!(err.to_string().contains("truncated.gguf"));
}

#[test]
fn non_gguf_and_missing_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, "these are not weights").unwrap();
    let err = Model::load(&text, &ModelOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidModel { path, .. } if path == &text),
        "{err}"
    );
    assert!(err.to_string().contains("GGUF magic"), "{err}");

    let missing = dir.path().join("absent.gguf");
    let err = Model::load(&missing, &ModelOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::MissingFile { path, .. } if path == &missing),
        "{err}"
    );
}
