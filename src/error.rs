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
