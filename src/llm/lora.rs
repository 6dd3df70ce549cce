//! LoRA adapters inside llama.cpp: loaded into a [`Model`], applied per [`Session`].
//!
//! An adapter is loaded once into the model ([`Model::load_adapter`]), which
//! keeps it until the model is dropped (llama.cpp frees a model's adapters
//! with it), and a session chooses which one its decodes apply
//! ([`Session::set_adapter`]). Switching costs no file access: the tensors
//! stay in memory, and llama.cpp only re-plans its compute graph on the next
//! decode.
//!
//! Loading needs `&mut Model`, so it can only happen while no session
//! borrows the model; llama.cpp wants adapters loaded before contexts exist
//! anyway.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::Content;
use llama_cpp_2::model::LlamaLoraAdapter;

use super::{Model, Session};
use crate::adapter::{validate, AdapterReport};
use crate::{Error, Result};

/// An adapter loaded into one [`Model`] by [`Model::load_adapter`].
///
/// Only valid with sessions of the model that loaded it; another model's
/// sessions refuse it with [`Error::InvalidArgument`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdapterId {
    model: u64,
    index: usize,
}

/// The adapters a [`Model`] holds.
pub(super) struct LoadedAdapters {
    /// Tells this model's ids from another's.
    model: u64,
    /// llama-cpp-2 hands an adapter to a context only as `&mut`, while
    /// sessions share the model; the mutex gives that exclusive borrow for the
    /// duration of the call. llama.cpp only reads the adapter afterwards.
    adapters: Vec<(Mutex<LlamaLoraAdapter>, AdapterReport)>,
}

impl LoadedAdapters {
    pub(super) fn new() -> LoadedAdapters {
        static NEXT_MODEL: AtomicU64 = AtomicU64::new(0);
        LoadedAdapters {
            model: NEXT_MODEL.fetch_add(1, Ordering::Relaxed),
            adapters: Vec::new(),
        }
    }
}

impl Model {
    /// Loads the GGUF LoRA adapter at `path` into this model.
    ///
    /// The file is checked before llama.cpp sees it: [`validate`](fn@validate) against this
    /// model's architecture and fingerprint (an adapter without nextquill's
    /// fingerprint is refused), then every pair's shape against the base
    /// tensor it adapts, read from the model file's tensor table. A file that
    /// fails is [`Error::InvalidAdapter`] or [`Error::AdapterBaseMismatch`];
    /// the process and the model are unaffected.
    ///
    /// The adapter stays loaded (host memory of its f32 tensors) until the
    /// model is dropped; loading the same file twice loads it twice.
    pub fn load_adapter(&mut self, path: impl AsRef<Path>) -> Result<AdapterId> {
        let path = path.as_ref();
        let report = validate(path, &self.info().architecture, Some(self.fingerprint()))?;
        self.check_adapter_shapes(&report)?;

        let _span = tracing::info_span!("load_adapter", path = %path.display()).entered();
        let adapter = self
            .llama
            .lora_adapter_init(path)
            .map_err(|e| Error::Llama {
                op: "load an adapter",
                reason: format!("{e} for {}; its log says why", path.display()),
            })?;
        tracing::info!(
            "loaded adapter {} (rank {}, alpha {}, {} pairs)",
            path.display(),
            report.rank,
            report.alpha,
            report.pairs.len()
        );
        let index = self.adapters.adapters.len();
        self.adapters.adapters.push((Mutex::new(adapter), report));
        Ok(AdapterId {
            model: self.adapters.model,
            index,
        })
    }

    /// What was checked about a loaded adapter (its rank, alpha, targets).
    pub fn adapter_report(&self, id: AdapterId) -> Result<&AdapterReport> {
        self.adapter_slot(id).map(|(_, report)| report)
    }

    fn adapter_slot(&self, id: AdapterId) -> Result<&(Mutex<LlamaLoraAdapter>, AdapterReport)> {
        self.adapters
            .adapters
            .get(id.index)
            .filter(|_| id.model == self.adapters.model)
            .ok_or_else(|| Error::InvalidArgument {
                name: "adapter",
                reason: "the adapter id belongs to another model; load the adapter into this one"
                    .into(),
            })
    }

    /// Compares every pair's `(n_out, n_in)` with the base tensor it adapts.
    /// llama.cpp would refuse a mismatch too, but only with a null result.
    fn check_adapter_shapes(&self, report: &AdapterReport) -> Result<()> {
        let base = &self.info().path;
        let mut file = std::fs::File::open(base).map_err(|e| Error::io(base, e))?;
        let content = Content::read(&mut file).map_err(|e| Error::InvalidModel {
            path: base.clone(),
            reason: format!("its tensor table cannot be read again ({e})"),
        })?;
        for pair in &report.pairs {
            let name = format!("blk.{}.{}.weight", pair.layer, pair.target.gguf_name());
            let Some(tensor) = content.tensor_infos.get(&name) else {
                return Err(Error::InvalidAdapter {
                    path: report.path.clone(),
                    reason: format!(
                        "it adapts {name}, which the base model does not have \
                         ({} layers); it was made for another model",
                        self.info().n_layer
                    ),
                });
            };
            if tensor.shape.dims() != [pair.n_out, pair.n_in] {
                return Err(Error::InvalidAdapter {
                    path: report.path.clone(),
                    reason: format!(
                        "it adapts {name} as {}x{}, but the base tensor is {:?}",
                        pair.n_out,
                        pair.n_in,
                        tensor.shape.dims()
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Session<'_> {
    /// Applies `adapter` (from this session's model) with `scale` to every
    /// later decode, replacing the one applied before; `None` applies none.
    ///
    /// `scale` multiplies the adapter's own `alpha / rank`; 1.0 applies it as
    /// trained, 0.0 is the same as `None`. The KV cache is cleared, since it
    /// was computed with other weights. Removing an adapter gives logits
    /// bit-identical to a session that never had one.
    pub fn set_adapter(&mut self, adapter: Option<AdapterId>, scale: f32) -> Result<()> {
        if !scale.is_finite() {
            return Err(Error::InvalidArgument {
                name: "adapter scale",
                reason: format!("{scale} is not a finite number"),
            });
        }
        match adapter {
            Some(id) => {
                let (slot, _) = self.model.adapter_slot(id)?;
                let mut lora = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                self.ctx
                    .lora_adapter_set(&mut lora, scale)
                    .map_err(|e| Error::llama("apply an adapter", e))?;
            }
            None => {
                if let Some((id, _)) = self.active_adapter {
                    let (slot, _) = self.model.adapter_slot(id)?;
                    let mut lora = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    // Despite its argument, this clears every adapter of the context.
                    self.ctx
                        .lora_adapter_remove(&mut lora)
                        .map_err(|e| Error::llama("remove the adapter", e))?;
                }
            }
        }
        self.active_adapter = adapter.map(|id| (id, scale));
        self.clear();
        Ok(())
    }

    /// The adapter later decodes apply and its scale, if any.
    pub fn active_adapter(&self) -> Option<(AdapterId, f32)> {
        self.active_adapter
    }
}
