//! The crate-wide error type.
//!
//! Every fallible public function returns [`Result`]. Variants carry what a
//! caller needs to act on the failure (the path, the user id, the sizes that
//! did not fit) and their messages say what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong in nextquill.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file that should exist does not.
    #[error("{what} {path} does not exist; {fix}")]
    MissingFile {
        /// What the file was supposed to be ("model file", "adapter").
        what: &'static str,
        /// The path that was looked up.
        path: PathBuf,
        /// How to get the file.
        fix: &'static str,
    },

    /// A model file exists but is not a loadable GGUF model.
    #[error("model file {path} is not a usable GGUF model: {reason}")]
    InvalidModel {
        /// The model file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A request does not fit the context window (or the batch) of the runtime.
    #[error(
        "{what} needs {needed} tokens but the context holds {available}; \
         shorten the input or raise the context size"
    )]
    ContextOverflow {
        /// What was being evaluated ("prompt", "2 sequences of 300 tokens").
        what: String,
        /// Tokens the request needs.
        needed: usize,
        /// Tokens the context (or batch) can hold.
        available: usize,
    },

    /// A caller-supplied value is out of range or inconsistent.
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// The argument or option.
        name: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// llama.cpp refused an operation. Its own log (routed to `tracing`) has the details.
    #[error("llama.cpp failed to {op}: {reason}")]
    Llama {
        /// What was being done.
        op: &'static str,
        /// What llama.cpp or its wrapper reported.
        reason: String,
    },

    /// A tensor computation of the trainer failed (a shape that does not fit, a device
    /// without the needed kernel).
    #[error("training computation failed while {during}: {source}; check the model file and the example lengths")]
    Tensor {
        /// What the trainer was doing ("forward pass", "backward pass").
        during: &'static str,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },

    /// A training checkpoint cannot be used to resume this run.
    #[error("checkpoint {path} cannot be resumed: {reason}; delete it or start over with ResumePolicy::StartOver")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What does not match or could not be read.
        reason: String,
    },

    /// SQLite failed on the history store.
    #[error("history store failed to {op}: {source}")]
    Store {
        /// What the store was doing ("insert item", "open connection").
        op: &'static str,
        /// SQLite's own error.
        #[source]
        source: rusqlite::Error,
    },

    /// The history store file could not be opened as a database.
    #[error("cannot open history store {path}: {reason}")]
    StoreOpen {
        /// The database file.
        path: PathBuf,
        /// Why it failed and what to do about it.
        reason: String,
    },

    /// The history store is encrypted with another key (or not encrypted while a key was given).
    #[error(
        "history store {path} cannot be read with the given key; open it with the key it was \
         created with (or with no key if it was created unencrypted)"
    )]
    StoreKey {
        /// The database file.
        path: PathBuf,
    },

    /// The history store's schema cannot be brought to this build's version.
    #[error("history store {path} has an unusable schema: {reason}")]
    StoreSchema {
        /// The database file.
        path: PathBuf,
        /// What the migration reported.
        reason: String,
    },

    /// A user id that the store has no rows for.
    #[error("user {user} is not in the history store; import their history first")]
    UnknownUser {
        /// The user id that was looked up.
        user: String,
    },

    /// A history item id that the store does not hold for this user.
    #[error(
        "user {user} has no history item {item}; pass an item id from `history --user {user}`"
    )]
    UnknownItem {
        /// The user id.
        user: String,
        /// The item id that was looked up.
        item: String,
    },

    /// An adapter version that the registry does not hold for this user.
    #[error(
        "user {user} has no adapter version {version}; list the user's adapters for valid versions"
    )]
    UnknownAdapter {
        /// The user id (or the reserved shared-adapter id).
        user: String,
        /// The version that was asked for.
        version: i64,
    },

    /// A whole import failed before any line could be read (single bad lines are
    /// reported in the import report instead).
    #[error("cannot import {path}: {reason}")]
    Import {
        /// The file being imported.
        path: PathBuf,
        /// Why and how to fix it.
        reason: String,
    },

    /// An adapter file is not a LoRA adapter nextquill or llama.cpp can use.
    #[error("adapter {path} is not a usable LoRA adapter: {reason}")]
    InvalidAdapter {
        /// The adapter file (or PEFT folder).
        path: PathBuf,
        /// What is wrong with it and, where there is one, the fix.
        reason: String,
    },

    /// An adapter was trained on another base model than the one it is applied to.
    #[error(
        "adapter {path} was made for base model {found}, not {expected}; \
         train an adapter for this model or load the model it was trained on"
    )]
    AdapterBaseMismatch {
        /// The adapter file.
        path: PathBuf,
        /// The base this runtime has (architecture or fingerprint).
        expected: String,
        /// The base the adapter file names.
        found: String,
    },

    /// The operation was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,

    /// An I/O error on a named file.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::Llama`] from any displayable error of the wrapper.
    pub(crate) fn llama(op: &'static str, err: impl std::fmt::Display) -> Self {
        Error::Llama {
            op,
            reason: err.to_string(),
        }
    }
}
