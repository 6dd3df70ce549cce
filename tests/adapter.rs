//! Adapters on the real default model: GGUF LoRA files written by nextquill
//! and applied by llama.cpp, the checks that keep bad files away from
//! llama.cpp, and the PEFT round trip.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::model_path;
use nextquill::adapter::{
    export_peft, import_peft, read_gguf, validate, write_gguf, AdapterMeta, LoraPair, LoraTarget,
    LoraWeights, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE,
};
use nextquill::llm::{Model, ModelInfo, ModelOptions, Role, ScoreOptions, Session, SessionOptions};
use nextquill::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A model of our own: loading adapters needs `&mut Model`, so the shared
/// test model cannot be used.
fn own_model() -> Model {
    Model::load(model_path(), &ModelOptions::default()).expect("load the default model")
}

fn session(model: &Model) -> Session<'_> {
    let options = SessionOptions {
        n_ctx: 512,
        n_batch: 512,
        max_sequences: 1,
        ..SessionOptions::default()
    };
    Session::new(model, options).expect("session")
}

/// `(n_out, n_in)` of `target`'s weight, from the model's metadata.
fn projection_shape(info: &ModelInfo, target: LoraTarget) -> (usize, usize) {
    let n_embd = info.n_embd as usize;
    let kv_width = n_embd / info.n_head as usize * info.n_head_kv as usize;
    match target {
        LoraTarget::Q | LoraTarget::O => (n_embd, n_embd),
        LoraTarget::K | LoraTarget::V => (kv_width, n_embd),
        other => panic!("no shape for {other:?} in this test"),
    }
}

/// A rank-`rank` adapter on `targets` of every layer: A uniform in ±0.1, B
/// uniform in ±`b_range` (0 gives B = 0, an adapter that changes nothing).
fn random_weights(
    info: &ModelInfo,
    targets: &[LoraTarget],
    rank: usize,
    b_range: f32,
    seed: u64,
) -> LoraWeights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut uniform = |n: usize, range: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                if range == 0.0 {
                    0.0
                } else {
                    rng.random_range(-range..range)
                }
            })
            .collect()
    };
    let mut pairs = Vec::new();
    for layer in 0..info.n_layer as usize {
        for &target in targets {
            let (n_out, n_in) = projection_shape(info, target);
            pairs.push(LoraPair {
                layer,
                target,
                n_in,
                n_out,
                lora_a: uniform(rank * n_in, 0.1),
                lora_b: uniform(n_out * rank, b_range),
            });
        }
    }
    LoraWeights {
        rank,
        alpha: 16.0,
        pairs,
    }
}

fn meta_for(model: &Model) -> AdapterMeta {
    AdapterMeta::for_model(
        model.info(),
        "nextquill",
        serde_json::json!({"steps": 12, "first_loss": 3.5, "last_loss": 2.25}),
    )
}

/// The bits of the next-token log-distribution at every response position of
/// a fixed chat prompt: equal bits mean equal logits.
fn distribution_bits(session: &mut Session<'_>) -> Vec<u32> {
    let model = session.model();
    let prompt = model.tokenize_prompt(
        &model
            .render_chat(
                &[(Role::User, "Review this green tea in one sentence.")],
                true,
            )
            .unwrap(),
    );
    let response = model.tokenize_text("A fresh, grassy tea with a gentle sweetness.");
    let options = ScoreOptions {
        distributions: true,
        ..ScoreOptions::default()
    };
    let scores = session.score(&[&prompt], &response, &options).unwrap();
    let dist = scores.prompts[0].log_distributions.as_ref().unwrap();
    assert_eq!(dist.len(), response.len() * model.n_vocab());
    dist.iter().map(|v| v.to_bits()).collect()
}

fn largest_difference(a: &[u32], b: &[u32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f32::from_bits(x) - f32::from_bits(y)).abs())
        .fold(0.0, f32::max)
}

#[test]
fn zero_adapter_is_bit_identical_and_removing_an_adapter_restores_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = own_model();
    let targets = [LoraTarget::Q, LoraTarget::V];
    let zero_path = dir.path().join("zero.gguf");
    let random_path = dir.path().join("random.gguf");
    write_gguf(
        &random_weights(model.info(), &targets, 8, 0.0, 1),
        &meta_for(&model),
        &zero_path,
    )
    .unwrap();
    write_gguf(
        &random_weights(model.info(), &targets, 8, 0.05, 2),
        &meta_for(&model),
        &random_path,
    )
    .unwrap();
    let zero = model.load_adapter(&zero_path).unwrap();
    let random = model.load_adapter(&random_path).unwrap();
    assert_eq!(model.adapter_report(random).unwrap().rank, 8);

    let mut session = session(&model);
    let base = distribution_bits(&mut session);

    session.set_adapter(Some(zero), 1.0).unwrap();
    assert_eq!(
        distribution_bits(&mut session),
        base,
        "B = 0 must change nothing"
    );

    session.set_adapter(Some(random), 1.0).unwrap();
    assert_eq!(session.active_adapter(), Some((random, 1.0)));
    let adapted = distribution_bits(&mut session);
    let change = largest_difference(&adapted, &base);
    assert!(
        change > 0.01,
        "a random adapter moved logits by only {change}"
    );
    // Deterministic while applied.
    assert_eq!(distribution_bits(&mut session), adapted);

    session.set_adapter(None, 1.0).unwrap();
    assert_eq!(session.active_adapter(), None);
    assert_eq!(
        distribution_bits(&mut session),
        base,
        "removal must restore the base"
    );

    // Scale 0 applies nothing; switching straight between adapters works.
    session.set_adapter(Some(random), 0.0).unwrap();
    assert_eq!(distribution_bits(&mut session), base);
    session.set_adapter(Some(random), 1.0).unwrap();
    session.set_adapter(Some(zero), 1.0).unwrap();
    assert_eq!(distribution_bits(&mut session), base);
}

#[test]
fn alpha_in_the_file_scales_the_update_as_a_user_scale_does() {
    // llama.cpp applies user_scale * alpha / rank: an adapter with alpha 32
    // at scale 1 and the same adapter with alpha 16 at scale 2 must give the
    // same logits, bit for bit (both scales are exactly 4.0). A file whose
    // alpha llama.cpp ignored would differ.
    let dir = tempfile::tempdir().unwrap();
    let mut model = own_model();
    let weights = random_weights(model.info(), &[LoraTarget::V], 8, 0.05, 3);
    let doubled = LoraWeights {
        alpha: 32.0,
        ..weights.clone()
    };
    write_gguf(&weights, &meta_for(&model), dir.path().join("a16.gguf")).unwrap();
    write_gguf(&doubled, &meta_for(&model), dir.path().join("a32.gguf")).unwrap();
    let a16 = model.load_adapter(dir.path().join("a16.gguf")).unwrap();
    let a32 = model.load_adapter(dir.path().join("a32.gguf")).unwrap();

    let mut session = session(&model);
    session.set_adapter(Some(a32), 1.0).unwrap();
    let with_alpha = distribution_bits(&mut session);
    session.set_adapter(Some(a16), 2.0).unwrap();
    assert_eq!(distribution_bits(&mut session), with_alpha);
    session.set_adapter(Some(a16), 1.0).unwrap();
    assert_ne!(distribution_bits(&mut session), with_alpha);
}

#[test]
fn gguf_write_then_read_roundtrips_real_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::model();
    let weights = random_weights(
        model.info(),
        &[LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O],
        4,
        0.05,
        4,
    );
    let meta = meta_for(model);
    let path = dir.path().join("adapter.gguf");
    write_gguf(&weights, &meta, &path).unwrap();
    let (read, read_meta) = read_gguf(&path).unwrap();
    assert_eq!(read, weights);
    assert_eq!(read_meta, meta);

    let report = validate(&path, "llama", Some(model.fingerprint())).unwrap();
    assert_eq!(report.rank, 4);
    assert_eq!(report.alpha, 16.0);
    assert_eq!(report.pairs.len(), 30 * 4);
    assert_eq!(report.objective.as_deref(), Some("nextquill"));
    let q = report.pairs[0];
    let v = report.pairs[2];
    assert_eq!((q.target, q.n_out, q.n_in), (LoraTarget::Q, 576, 576));
    assert_eq!((v.target, v.n_out, v.n_in), (LoraTarget::V, 192, 576));
}

#[test]
fn peft_export_then_import_gives_the_same_weights_and_gguf_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::model();
    let info = model.info();
    let (n_head, n_head_kv) = (info.n_head as usize, info.n_head_kv as usize);
    let weights = random_weights(
        info,
        &[LoraTarget::Q, LoraTarget::K, LoraTarget::V],
        8,
        0.05,
        5,
    );
    let meta = meta_for(model);
    let peft_dir = dir.path().join("peft");
    export_peft(&weights, &meta, n_head, n_head_kv, &peft_dir).unwrap();

    let imported = import_peft(&peft_dir, n_head, n_head_kv).unwrap();
    assert_eq!(imported.weights, weights);
    assert_eq!(imported.meta.as_ref(), Some(&meta));
    assert_eq!(
        imported.base_model_name_or_path.as_deref(),
        info.name.as_deref()
    );
    let original = dir.path().join("original.gguf");
    let again = dir.path().join("again.gguf");
    write_gguf(&weights, &meta, &original).unwrap();
    write_gguf(&imported.weights, imported.meta.as_ref().unwrap(), &again).unwrap();
    assert_eq!(
        std::fs::read(&original).unwrap(),
        std::fs::read(&again).unwrap()
    );

    // The folder is what PEFT reads: its config and its key names, q/k rows
    // in Hugging Face order (so they differ from the GGUF rows), v unchanged.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(peft_dir.join(PEFT_CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"], 16.0);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "k_proj", "v_proj"])
    );
    let bytes = std::fs::read(peft_dir.join(PEFT_WEIGHTS_FILE)).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(tensors.len(), 30 * 3 * 2);
    let floats = |name: &str| -> Vec<f32> {
        let view = tensors.tensor(name).unwrap();
        view.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let key = |module: &str, half: &str| {
        format!("base_model.model.model.layers.0.self_attn.{module}.lora_{half}.weight")
    };
    let pair = |target| weights.pairs.iter().find(|p| p.target == target).unwrap();
    let q_b = floats(&key("q_proj", "B"));
    assert_eq!(
        tensors.tensor(&key("q_proj", "B")).unwrap().shape(),
        &[576, 8]
    );
    assert_ne!(q_b, pair(LoraTarget::Q).lora_b);
    // Row 1 of a GGUF head is row d/2 of the HF head (head_dim 64: row 32).
    assert_eq!(&q_b[32 * 8..33 * 8], &pair(LoraTarget::Q).lora_b[8..16]);
    assert_eq!(floats(&key("q_proj", "A")), pair(LoraTarget::Q).lora_a);
    assert_ne!(floats(&key("k_proj", "B")), pair(LoraTarget::K).lora_b);
    assert_eq!(floats(&key("v_proj", "B")), pair(LoraTarget::V).lora_b);
}

/// Writes a GGUF file with exactly these metadata and zero-filled f32
/// tensors of row-major shape `(rows, cols)`.
fn craft(path: &Path, metadata: &[(&str, Value)], tensors: &[(String, usize, usize)]) {
    let qtensors: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(name, rows, cols)| {
            let t = Tensor::zeros((*rows, *cols), candle_core::DType::F32, &Device::Cpu).unwrap();
            (name.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

fn good_metadata(model: &Model) -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.type", Value::String("adapter".into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(8.0)),
        (
            "nextquill.base_fingerprint",
            Value::String(model.fingerprint().into()),
        ),
    ]
}

/// A q pair of layer `layer`, rank `rank`, for SmolLM2's 576-wide q.
fn q_pair(layer: usize, a_rank: usize, b_rank: usize) -> Vec<(String, usize, usize)> {
    vec![
        (format!("blk.{layer}.attn_q.weight.lora_a"), a_rank, 576),
        (format!("blk.{layer}.attn_q.weight.lora_b"), 576, b_rank),
    ]
}

fn with_key(
    mut metadata: Vec<(&'static str, Value)>,
    key: &'static str,
    value: Option<Value>,
) -> Vec<(&'static str, Value)> {
    metadata.retain(|(k, _)| *k != key);
    if let Some(value) = value {
        metadata.push((key, value));
    }
    metadata
}

#[test]
fn bad_adapter_files_are_typed_errors_and_the_model_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = own_model();
    let path = |name: &str| dir.path().join(name);

    // The crafted baseline is good: the failures below are each one defect.
    craft(&path("good.gguf"), &good_metadata(&model), &q_pair(0, 4, 4));
    let good = model.load_adapter(path("good.gguf")).unwrap();

    let invalid = |model: &mut Model, file: &str, what: &str| match model.load_adapter(path(file)) {
        Err(Error::InvalidAdapter { reason, .. }) => {
            assert!(reason.contains(what), "{file}: {reason}")
        }
        other => panic!("{file}: expected InvalidAdapter, got {other:?}"),
    };

    let real = path("real.gguf");
    write_gguf(
        &random_weights(model.info(), &[LoraTarget::V], 8, 0.05, 6),
        &meta_for(&model),
        &real,
    )
    .unwrap();
    let bytes = std::fs::read(&real).unwrap();
    std::fs::write(path("truncated.gguf"), &bytes[..bytes.len() / 2]).unwrap();
    invalid(&mut model, "truncated.gguf", "truncated");
    std::fs::write(path("header_only.gguf"), &bytes[..200]).unwrap();
    invalid(&mut model, "header_only.gguf", "header cannot be read");
    std::fs::write(path("not_gguf.gguf"), b"PK\x03\x04 a zip file").unwrap();
    invalid(&mut model, "not_gguf.gguf", "magic");

    let mut stray = q_pair(0, 4, 4);
    stray.push(("blk.0.attn_norm.weight".into(), 1, 576));
    craft(&path("stray.gguf"), &good_metadata(&model), &stray);
    invalid(&mut model, "stray.gguf", "blk.0.attn_norm.weight");
    let mut stray = q_pair(0, 4, 4);
    stray.push(("token_embd.weight.lora_a".into(), 4, 576));
    craft(&path("stray2.gguf"), &good_metadata(&model), &stray);
    invalid(&mut model, "stray2.gguf", "token_embd");

    let mut twice = q_pair(0, 4, 4);
    twice.push(("blk.0.attn_q.weight.lora_a".into(), 4, 576));
    craft(&path("twice.gguf"), &good_metadata(&model), &twice);
    invalid(&mut model, "twice.gguf", "appears twice");

    let no_alpha = with_key(good_metadata(&model), "adapter.lora.alpha", None);
    craft(&path("no_alpha.gguf"), &no_alpha, &q_pair(0, 4, 4));
    invalid(&mut model, "no_alpha.gguf", "adapter.lora.alpha");
    // llama.cpp asserts (ends the process) on a non-f32 alpha.
    let int_alpha = with_key(
        good_metadata(&model),
        "adapter.lora.alpha",
        Some(Value::U32(8)),
    );
    craft(&path("int_alpha.gguf"), &int_alpha, &q_pair(0, 4, 4));
    invalid(&mut model, "int_alpha.gguf", "not an f32");
    let int_type = with_key(good_metadata(&model), "general.type", Some(Value::U32(1)));
    craft(&path("int_type.gguf"), &int_type, &q_pair(0, 4, 4));
    invalid(&mut model, "int_type.gguf", "not a string");
    let not_lora = with_key(
        good_metadata(&model),
        "adapter.type",
        Some(Value::String("control_vector".into())),
    );
    craft(&path("not_lora.gguf"), &not_lora, &q_pair(0, 4, 4));
    invalid(&mut model, "not_lora.gguf", "adapter.type");

    craft(
        &path("ab_rank.gguf"),
        &good_metadata(&model),
        &q_pair(0, 4, 8),
    );
    invalid(&mut model, "ab_rank.gguf", "rank");
    let mut two_ranks = q_pair(0, 4, 4);
    two_ranks.extend(q_pair(1, 8, 8));
    craft(&path("two_ranks.gguf"), &good_metadata(&model), &two_ranks);
    invalid(&mut model, "two_ranks.gguf", "ranks differ");
    craft(
        &path("half.gguf"),
        &good_metadata(&model),
        &q_pair(0, 4, 4)[..1],
    );
    invalid(&mut model, "half.gguf", "no lora_b");
    craft(
        &path("layer30.gguf"),
        &good_metadata(&model),
        &q_pair(30, 4, 4),
    );
    invalid(&mut model, "layer30.gguf", "does not have");
    let wide = vec![
        ("blk.0.attn_q.weight.lora_a".to_string(), 4, 512),
        ("blk.0.attn_q.weight.lora_b".to_string(), 576, 4),
    ];
    craft(&path("wide.gguf"), &good_metadata(&model), &wide);
    invalid(&mut model, "wide.gguf", "base tensor");

    let mismatch = |model: &mut Model, file: &str, what: &str| match model.load_adapter(path(file))
    {
        Err(Error::AdapterBaseMismatch { found, .. }) => {
            assert!(found.contains(what), "{file}: {found}")
        }
        other => panic!("{file}: expected AdapterBaseMismatch, got {other:?}"),
    };
    let qwen = AdapterMeta {
        base_architecture: "qwen2".into(),
        ..meta_for(&model)
    };
    let weights = random_weights(model.info(), &[LoraTarget::Q], 4, 0.05, 7);
    write_gguf(&weights, &qwen, path("qwen.gguf")).unwrap();
    mismatch(&mut model, "qwen.gguf", "qwen2");
    let other_base = AdapterMeta {
        base_fingerprint: "0".repeat(64),
        ..meta_for(&model)
    };
    write_gguf(&weights, &other_base, path("other_base.gguf")).unwrap();
    mismatch(&mut model, "other_base.gguf", &"0".repeat(64));
    let unknown_base = with_key(good_metadata(&model), "nextquill.base_fingerprint", None);
    craft(&path("unknown_base.gguf"), &unknown_base, &q_pair(0, 4, 4));
    mismatch(&mut model, "unknown_base.gguf", "unknown");
    assert!(validate(path("unknown_base.gguf"), "llama", None).is_ok());

    assert!(matches!(
        model.load_adapter(path("missing.gguf")),
        Err(Error::MissingFile { .. })
    ));

    // After all of that the model still loads and applies adapters.
    let real = model.load_adapter(&real).unwrap();
    let mut session = session(&model);
    let base = distribution_bits(&mut session);
    session.set_adapter(Some(good), 1.0).unwrap();
    assert_eq!(distribution_bits(&mut session), base);
    session.set_adapter(Some(real), 1.0).unwrap();
    assert_ne!(distribution_bits(&mut session), base);
    assert!(matches!(
        session.set_adapter(Some(real), f32::NAN),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn an_adapter_id_is_refused_by_another_models_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let mut owner = own_model();
    let other = own_model();
    let path = dir.path().join("a.gguf");
    write_gguf(
        &random_weights(owner.info(), &[LoraTarget::V], 4, 0.05, 8),
        &meta_for(&owner),
        &path,
    )
    .unwrap();
    let id = owner.load_adapter(&path).unwrap();
    let mut session = session(&other);
    assert!(matches!(
        session.set_adapter(Some(id), 1.0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(other.adapter_report(id).is_err());
    assert_eq!(owner.adapter_report(id).unwrap().rank, 4);
}
