//! Trained adapters: their in-memory form and, later, their files.

mod lora;

pub use lora::{LoraPair, LoraTarget, LoraWeights};
