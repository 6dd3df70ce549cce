//! The app's listeners (foreign traits the app implements) and the relays
//! that call them from inside the engine.
//!
//! A listener that throws must not unwind through the engine: UniFFI turns a
//! foreign exception in a listener into a Rust panic, and the trainer waits on
//! its progress channel, so a panic there would never return. Each relay
//! therefore catches the panic where the listener is called, asks the engine
//! to stop at its next safe point, and the call then fails with
//! [`NextquillError::ListenerFailed`].

use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::error::{panic_message, NextquillError};
use super::types::{Flow, TrainEvent};
use crate::train::{Control, Progress};

/// Hears every event of a training run and decides whether it goes on.
///
/// Called on the thread that called `train`, between steps, so a slow
/// listener slows training; keep it to updating state (a progress bar).
#[uniffi::export(callback_interface)]
pub trait TrainListener: Send + Sync {
    /// One event; return `Flow.Stop` to end the run after this step (the
    /// previous adapter stays active and a checkpoint is kept to resume from).
    fn on_event(&self, event: TrainEvent) -> Flow;
}

/// Receives generated text as it is produced.
#[uniffi::export(callback_interface)]
pub trait TextListener: Send + Sync {
    /// One piece of new text, always whole UTF-8 characters (a character the
    /// tokenizer split is held back until complete). The pieces concatenate to
    /// the final text. Return `Flow.Stop` to end the generation here.
    fn on_text(&self, text: String) -> Flow;
}

/// Calls a listener, catching the panic a foreign exception becomes.
pub(crate) struct Relay {
    /// The first listener failure, reported when the call returns.
    failure: Option<String>,
}

impl Relay {
    pub(crate) fn new() -> Self {
        Relay { failure: None }
    }

    /// The listener's answer; `Flow::Stop` once a listener call has failed.
    pub(crate) fn call(&mut self, listen: impl FnOnce() -> Flow) -> Flow {
        if self.failure.is_some() {
            return Flow::Stop;
        }
        match catch_unwind(AssertUnwindSafe(listen)) {
            Ok(flow) => flow,
            Err(panic) => {
                self.failure = Some(panic_message(&*panic));
                Flow::Stop
            }
        }
    }

    /// Whether a listener call has failed.
    pub(crate) fn failed(&self) -> bool {
        self.failure.is_some()
    }

    /// A training progress callback over `listener`.
    pub(crate) fn progress<'a>(
        &'a mut self,
        listener: &'a dyn TrainListener,
    ) -> impl FnMut(Progress) -> Control + 'a {
        move |progress| match self.call(|| listener.on_event(TrainEvent::from(progress))) {
            Flow::Continue => Control::Continue,
            Flow::Stop => Control::Stop,
        }
    }

    /// A text callback over `listener` (none: the text is only returned).
    pub(crate) fn text<'a>(
        &'a mut self,
        listener: Option<&'a dyn TextListener>,
    ) -> impl FnMut(&str) -> ControlFlow<()> + 'a {
        move |piece| {
            let Some(listener) = listener else {
                return ControlFlow::Continue(());
            };
            match self.call(|| listener.on_text(piece.to_owned())) {
                Flow::Continue => ControlFlow::Continue(()),
                Flow::Stop => ControlFlow::Break(()),
            }
        }
    }

    /// `result`, unless a listener failed during the call.
    pub(crate) fn finish<T>(self, result: Result<T, NextquillError>) -> Result<T, NextquillError> {
        match self.failure {
            Some(reason) => Err(NextquillError::ListenerFailed(format!(
                "the app's listener threw ({reason}); the call stopped at its next safe \
                 point and nothing it would have written after that was kept"
            ))),
            None => result,
        }
    }
}

/// What [`callback_self_test`] delivered.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SelfTestReport {
    /// Pieces the listener was called with (all of them unless it returned `Stop`).
    pub delivered: u64,
    /// Bytes of UTF-8 text delivered.
    pub bytes: u64,
    /// Whether the listener was called from a thread other than the caller's.
    pub from_background_thread: bool,
}

/// Calls `listener` `count` times from a new Rust thread, with numbered
/// pieces of mixed-script text (`"piece 0 · ü · 語 · 🙂\n"`), and returns when
/// that thread ends.
///
/// Training and generation call listeners from inside the engine; this checks
/// an app's listener plumbing (threading, string passing, early stop) without
/// loading a model, in milliseconds. A throwing listener ends the run with
/// [`NextquillError::ListenerFailed`], exactly as in the engine's calls.
#[uniffi::export]
pub fn callback_self_test(
    count: u32,
    listener: Box<dyn TextListener>,
) -> Result<SelfTestReport, NextquillError> {
    super::error::guard(|| {
        let caller = std::thread::current().id();
        let worker = std::thread::spawn(move || {
            let background = std::thread::current().id() != caller;
            let mut relay = Relay::new();
            let (mut delivered, mut bytes) = (0u64, 0u64);
            for i in 0..count {
                let piece = format!("piece {i} · ü · 語 · 🙂\n");
                let len = piece.len() as u64;
                let flow = relay.call(|| listener.on_text(piece));
                if relay.failed() {
                    break;
                }
                delivered += 1;
                bytes += len;
                if flow == Flow::Stop {
                    break;
                }
            }
            relay.finish(Ok(SelfTestReport {
                delivered,
                bytes,
                from_background_thread: background,
            }))
        });
        worker.join().unwrap_or_else(|panic| {
            Err(NextquillError::Internal(format!(
                "the self-test thread panicked: {}",
                panic_message(&*panic)
            )))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Collect(Mutex<Vec<String>>, Option<usize>);

    impl TextListener for Collect {
        fn on_text(&self, text: String) -> Flow {
            let mut seen = self.0.lock().unwrap();
            seen.push(text);
            match self.1 {
                Some(stop_at) if seen.len() == stop_at => Flow::Stop,
                _ => Flow::Continue,
            }
        }
    }

    struct Throw;

    impl TextListener for Throw {
        fn on_text(&self, _text: String) -> Flow {
            panic!("listener threw ValueError")
        }
    }

    #[test]
    fn the_self_test_delivers_every_piece_in_order_from_another_thread() {
        let report = callback_self_test(1000, Box::new(Collect(Mutex::new(Vec::new()), None)));
        let report = report.unwrap();
        assert_eq!(report.delivered, 1000);
        assert!(report.from_background_thread);
    }

    #[test]
    fn a_listener_that_stops_gets_no_more_pieces() {
        let listener = std::sync::Arc::new(Collect(Mutex::new(Vec::new()), Some(3)));
        struct Shared(std::sync::Arc<Collect>);
        impl TextListener for Shared {
            fn on_text(&self, text: String) -> Flow {
                self.0.on_text(text)
            }
        }
        let report = callback_self_test(10, Box::new(Shared(listener.clone()))).unwrap();
        assert_eq!(report.delivered, 3);
        assert_eq!(listener.0.lock().unwrap().len(), 3);
    }

    #[test]
    fn a_throwing_listener_ends_the_call_with_listener_failed() {
        let result = callback_self_test(5, Box::new(Throw));
        let Err(NextquillError::ListenerFailed(message)) = result else {
            panic!("expected ListenerFailed, got {result:?}");
        };
        assert!(message.contains("listener threw ValueError"), "{message}");
    }
}
