//! The error an app sees: one variant per thing it can act on, each carrying
//! the engine's own message (which names the file, user or size and the fix).
//!
//! Flat on purpose: Kotlin exceptions already own a `message` field and Swift
//! enums cannot have one per variant, so each variant crosses as its message
//! string; the variant is what code branches on, the message is for people.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::Error;

/// Why a call into nextquill failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum NextquillError {
    /// The model file is missing, truncated or not a GGUF model llama.cpp can
    /// load; fetch it again (`models/fetch.sh` on a desktop).
    #[error("{0}")]
    Model(String),
    /// An argument or option is out of range; the message names it and the range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The user id has no history; import or add their texts first.
    #[error("{0}")]
    UnknownUser(String),
    /// The item id is not in that user's history; list their history for valid ids.
    #[error("{0}")]
    UnknownItem(String),
    /// The user has no adapter with that version; list their adapters.
    #[error("{0}")]
    UnknownAdapter(String),
    /// An adapter file is unusable or made for another base model; train again.
    #[error("{0}")]
    Adapter(String),
    /// A prompt plus the requested output does not fit the context; shorten the
    /// request, ask for fewer tokens or open the engine with a larger context.
    #[error("{0}")]
    ContextOverflow(String),
    /// The history store (SQLite) failed or cannot be opened with this key.
    #[error("{0}")]
    Store(String),
    /// An import file cannot be read as JSONL or CSV history.
    #[error("{0}")]
    Import(String),
    /// Training failed (a tensor computation, an unusable checkpoint).
    #[error("{0}")]
    Training(String),
    /// llama.cpp refused an operation; its log holds the details.
    #[error("{0}")]
    Llama(String),
    /// A file or folder could not be read or written; the message names it.
    #[error("{0}")]
    Io(String),
    /// The operation was cancelled.
    #[error("{0}")]
    Cancelled(String),
    /// The app's listener threw; the call stopped at the next safe point and
    /// left the store and adapters as they were before the failing event.
    #[error("{0}")]
    ListenerFailed(String),
    /// A bug in nextquill (a Rust panic, caught before it could reach the app).
    /// The engine stays usable; please report the message.
    #[error("{0}")]
    Internal(String),
}

impl From<Error> for NextquillError {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::MissingFile { .. } | Error::InvalidModel { .. } => {
                NextquillError::Model(message)
            }
            Error::InvalidArgument { .. } => NextquillError::InvalidArgument(message),
            Error::UnknownUser { .. } => NextquillError::UnknownUser(message),
            Error::UnknownItem { .. } => NextquillError::UnknownItem(message),
            Error::UnknownAdapter { .. } => NextquillError::UnknownAdapter(message),
            Error::InvalidAdapter { .. } | Error::AdapterBaseMismatch { .. } => {
                NextquillError::Adapter(message)
            }
            Error::ContextOverflow { .. } => NextquillError::ContextOverflow(message),
            Error::Store { .. }
            | Error::StoreOpen { .. }
            | Error::StoreKey { .. }
            | Error::StoreSchema { .. } => NextquillError::Store(message),
            Error::Import { .. } => NextquillError::Import(message),
            Error::Tensor { .. } | Error::Checkpoint { .. } => NextquillError::Training(message),
            Error::Llama { .. } => NextquillError::Llama(message),
            Error::Io { .. } => NextquillError::Io(message),
            // No catch-all: a variant added to `Error` must be given its place
            // here before the crate compiles again.
            Error::Cancelled => NextquillError::Cancelled(message),
        }
    }
}

/// Runs one call of the app into the engine, turning a panic into
/// [`NextquillError::Internal`] so that no unwinding reaches foreign frames.
///
/// UniFFI catches panics too, but reports them as an untyped internal error;
/// this keeps them in the enum the app already handles. The engine's locks
/// recover from poisoning, so it stays usable after a caught panic.
pub(crate) fn guard<T>(
    call: impl FnOnce() -> Result<T, NextquillError>,
) -> Result<T, NextquillError> {
    catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        Err(NextquillError::Internal(format!(
            "nextquill panicked: {}; the engine is still usable, please report this",
            panic_message(&*panic)
        )))
    })
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_user_crosses_as_its_own_variant_with_the_fix_in_the_message() {
        let error = NextquillError::from(Error::UnknownUser { user: "zoe".into() });
        let NextquillError::UnknownUser(message) = error else {
            panic!("wrong variant: {error:?}");
        };
        assert!(message.contains("zoe"), "{message}");
        assert!(message.contains("import their history first"), "{message}");
    }

    #[test]
    fn a_panic_inside_a_call_becomes_an_internal_error() {
        let result: Result<(), _> = guard(|| panic!("index 7 out of range"));
        let Err(NextquillError::Internal(message)) = result else {
            panic!("not an internal error: {result:?}");
        };
        assert!(message.contains("index 7 out of range"), "{message}");
    }
}
