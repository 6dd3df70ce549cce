//! Loading a GGUF model, and what the rest of the crate asks of it: its
//! fingerprint, metadata, chat template and tokenizer.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{llama_backend, TokenId};
use crate::{Error, Result};

/// How a model is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelOptions {
    /// Layers to offload to a GPU backend when one is compiled in. Default 0 (CPU only).
    pub gpu_layers: u32,
    /// Map the file instead of reading it into memory. Default true: the
    /// weights then cost page cache, not private memory.
    pub use_mmap: bool,
    /// Load only the vocabulary (tokenizer and template, no weights). Default false.
    pub vocab_only: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            gpu_layers: 0,
            use_mmap: true,
            vocab_only: false,
        }
    }
}

/// What `nextquill model info` shows, and what adapters are checked against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// The file the model was loaded from.
    pub path: PathBuf,
    /// `general.architecture`, e.g. `llama`, `qwen2`.
    pub architecture: String,
    /// `general.name`, when the file has one.
    pub name: Option<String>,
    /// File size in bytes.
    pub file_size: u64,
    /// Number of weights.
    pub n_params: u64,
    /// Transformer blocks.
    pub n_layer: u32,
    /// Hidden width.
    pub n_embd: u32,
    /// Attention heads.
    pub n_head: u32,
    /// Key/value heads (fewer than `n_head` under grouped-query attention).
    pub n_head_kv: u32,
    /// Vocabulary size.
    pub n_vocab: u32,
    /// Context length the model was trained with, in tokens.
    pub n_ctx_train: u32,
    /// The chat template stored in the file, if any.
    pub chat_template: Option<String>,
    /// See [`Model::fingerprint`].
    pub fingerprint: String,
}

/// A loaded GGUF model: weights (unless vocabulary-only), tokenizer, template.
pub struct Model {
    pub(super) llama: LlamaModel,
    pub(super) adapters: super::lora::LoadedAdapters,
    info: ModelInfo,
    template: Option<LlamaChatTemplate>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("info", &self.info).finish()
    }
}

/// Who speaks a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person asking.
    User,
    /// The model.
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl Model {
    /// Loads a GGUF model after checking that the file is a complete GGUF file.
    ///
    /// A missing, foreign or truncated file is a typed error naming the file;
    /// llama.cpp never sees it.
    pub fn load(path: impl AsRef<Path>, options: &ModelOptions) -> Result<Model> {
        let path = path.as_ref();
        let file_size = check_gguf_file(path)?;
        let fingerprint = fingerprint_file(path, file_size)?;

        let params = LlamaModelParams::default()
            .with_n_gpu_layers(options.gpu_layers)
            .with_use_mmap(options.use_mmap)
            .with_vocab_only(options.vocab_only);
        let _span = tracing::info_span!("load_model", path = %path.display()).entered();
        let llama = LlamaModel::load_from_file(llama_backend()?, path, &params).map_err(|e| {
            Error::InvalidModel {
                path: path.to_path_buf(),
                reason: format!("llama.cpp refused it ({e}); its log says why"),
            }
        })?;

        let template = llama.chat_template(None).ok();
        let chat_template = template
            .as_ref()
            .and_then(|t| t.to_str().ok().map(str::to_owned));
        let meta = |key: &str| llama.meta_val_str(key).ok();
        // llama.cpp reads head counts from layer 0 and aborts the process when
        // there is no layer (a vocabulary-only load): ask only when there is one.
        let has_layers = llama.n_layer() > 0;
        let info = ModelInfo {
            path: path.to_path_buf(),
            architecture: meta("general.architecture").unwrap_or_default(),
            name: meta("general.name"),
            file_size,
            n_params: llama.n_params(),
            n_layer: llama.n_layer(),
            n_embd: u32::try_from(llama.n_embd()).unwrap_or(0),
            n_head: if has_layers { llama.n_head() } else { 0 },
            n_head_kv: if has_layers { llama.n_head_kv() } else { 0 },
            n_vocab: u32::try_from(llama.n_vocab()).unwrap_or(0),
            n_ctx_train: llama.n_ctx_train(),
            chat_template,
            fingerprint,
        };
        tracing::info!(
            "loaded model {} ({}, {} layers, {} MB)",
            info.name.as_deref().unwrap_or("unnamed"),
            info.architecture,
            info.n_layer,
            file_size / 1_000_000
        );
        Ok(Model {
            llama,
            adapters: super::lora::LoadedAdapters::new(),
            info,
            template,
        })
    }

    /// Metadata of the loaded model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// A stable identity of the model file that caches and adapters are keyed on.
    ///
    /// SHA-256 over the file length, its first 8 MiB (the whole GGUF header,
    /// metadata and tensor table) and 64 evenly spaced 64 KiB samples of the
    /// weights. Reading about 12 MiB keeps it fast for multi-GB models while
    /// any re-quantisation or different checkpoint changes it.
    pub fn fingerprint(&self) -> &str {
        &self.info.fingerprint
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        self.info.n_vocab as usize
    }

    /// A token that fills alignment cells of a scoring batch: it lives in a
    /// sequence of its own that nothing attends to, so any valid id serves.
    pub(crate) fn pad_token(&self) -> TokenId {
        0
    }

    /// Tokenizes a whole prompt: control tokens written in the text (such as
    /// `<|im_start|>` from the chat template) become control tokens, and the
    /// model's BOS is added when its vocabulary asks for one.
    ///
    /// Never pass user-written text through this: a user could write a control
    /// token. Use [`Model::tokenize_text`] for user text and responses.
    pub fn tokenize_prompt(&self, prompt: &str) -> Vec<TokenId> {
        to_ids(
            self.llama
                .vocab()
                .tokenize(prompt.as_bytes(), true, true)
                .into_iter(),
        )
    }

    /// Tokenizes a piece of template markup that continues a prompt: control
    /// tokens are parsed, but no BOS is added.
    pub fn tokenize_markup(&self, markup: &str) -> Vec<TokenId> {
        to_ids(
            self.llama
                .vocab()
                .tokenize(markup.as_bytes(), false, true)
                .into_iter(),
        )
    }

    /// Tokenizes plain text: control-token spellings stay literal text and no
    /// BOS is added.
    pub fn tokenize_text(&self, text: &str) -> Vec<TokenId> {
        to_ids(
            self.llama
                .vocab()
                .tokenize(text.as_bytes(), false, false)
                .into_iter(),
        )
    }

    /// The text of `tokens`, control tokens left out; invalid UTF-8 (a
    /// character cut at either end) becomes U+FFFD.
    pub fn detokenize(&self, tokens: &[TokenId]) -> Result<String> {
        self.check_tokens(tokens)?;
        let ids: Vec<LlamaToken> = tokens.iter().map(|&t| LlamaToken(t as i32)).collect();
        let bytes = self.llama.vocab().detokenize(&ids, false, false);
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The raw bytes one token stands for (possibly part of a UTF-8 character).
    /// Control tokens give no bytes.
    pub fn token_bytes(&self, token: TokenId) -> Result<Vec<u8>> {
        self.check_tokens(&[token])?;
        Ok(self
            .llama
            .vocab()
            .token_to_piece(LlamaToken(token as i32), false, None))
    }

    /// Whether `token` ends a generation (end-of-sequence or end-of-turn).
    pub fn is_end_of_generation(&self, token: TokenId) -> bool {
        (token as usize) < self.n_vocab() && self.llama.vocab().is_eog(LlamaToken(token as i32))
    }

    /// Renders `messages` with the model's chat template (llama.cpp's built-in
    /// template matcher, not a Jinja engine), ending with the opening of the
    /// assistant's turn when `open_assistant_turn` is set.
    pub fn render_chat(
        &self,
        messages: &[(Role, &str)],
        open_assistant_turn: bool,
    ) -> Result<String> {
        let template = self.template.as_ref().ok_or_else(|| Error::InvalidModel {
            path: self.info.path.clone(),
            reason: "the file has no chat template (tokenizer.chat_template)".into(),
        })?;
        let chat = messages
            .iter()
            .map(|(role, content)| LlamaChatMessage::new(role.as_str().into(), (*content).into()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::InvalidArgument {
                name: "chat message",
                reason: format!("{e}; remove NUL characters from the text"),
            })?;
        self.llama
            .apply_chat_template(template, &chat, open_assistant_turn)
            .map_err(|e| Error::llama("apply the chat template", e))
    }

    /// Refuses token ids outside the vocabulary before llama.cpp sees them: an
    /// out-of-range id there is an assert that kills the process.
    pub fn check_tokens(&self, tokens: &[TokenId]) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.n_vocab()) {
            None => Ok(()),
            Some(bad) => Err(Error::InvalidArgument {
                name: "token id",
                reason: format!(
                    "{bad} is outside the vocabulary of {} tokens; take ids from this model's tokenizer",
                    self.n_vocab()
                ),
            }),
        }
    }
}

fn to_ids(tokens: impl Iterator<Item = LlamaToken>) -> Vec<TokenId> {
    // llama.cpp never returns negative ids from its tokenizer.
    tokens.map(|t| t.0 as TokenId).collect()
}

/// Checks that `path` is a whole GGUF file and returns its size in bytes.
///
/// Parses the header and tensor table and requires every tensor's data to lie
/// inside the file, so a cut-off download is reported as such instead of
/// reaching llama.cpp.
fn check_gguf_file(path: &Path) -> Result<u64> {
    let mut file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            what: "model file",
            path: path.to_path_buf(),
            fix: "fetch the default model with models/fetch.sh or pass --model",
        },
        _ => Error::io(path, e),
    })?;
    let file_size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let invalid = |reason: String| Error::InvalidModel {
        path: path.to_path_buf(),
        reason,
    };

    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return Err(invalid(format!(
            "it does not start with the GGUF magic bytes ({file_size} bytes long); \
             pass a .gguf model file"
        )));
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| {
        invalid(format!(
            "its header cannot be read ({e}); the file is damaged or truncated, fetch it again"
        ))
    })?;
    let data_end = content
        .tensor_infos
        .values()
        .map(|t| {
            let elements = t.shape.elem_count() as u64;
            let dtype = t.ggml_dtype;
            t.offset + elements / dtype.block_size() as u64 * dtype.type_size() as u64
        })
        .max()
        .unwrap_or(0)
        + content.tensor_data_offset;
    if data_end > file_size {
        return Err(invalid(format!(
            "it is truncated at byte {file_size} (expected {data_end}); fetch it again"
        )));
    }
    Ok(file_size)
}

/// See [`Model::fingerprint`].
fn fingerprint_file(path: &Path, file_size: u64) -> Result<String> {
    const HEAD: u64 = 8 << 20;
    const SAMPLES: u64 = 64;
    const SAMPLE: u64 = 64 << 10;

    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    hasher.update(file_size.to_le_bytes());
    let mut buf = vec![0u8; HEAD.min(file_size) as usize];
    file.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
    hasher.update(&buf);

    if file_size > HEAD + SAMPLE {
        let span = file_size - HEAD - SAMPLE;
        buf.resize(SAMPLE as usize, 0);
        for i in 0..SAMPLES {
            let offset = HEAD + span * i / (SAMPLES - 1);
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| Error::io(path, e))?;
            file.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
            hasher.update(&buf);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}
