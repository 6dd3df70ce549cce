//! On-device LoRA training with the NextQuill objective (or plain SFT), in
//! candle on the CPU, from the same GGUF file llama.cpp runs.

mod checkpoint;
mod config;
mod fused;
mod lora;
mod loss;
mod model;
mod ops;
#[cfg(test)]
mod testing;
mod trainer;

pub use config::{
    CheckpointConfig, LoraConfig, LpReduction, LrSchedule, Objective, ResumePolicy, TrainConfig,
    WeightSource,
};
pub use loss::nextquill_weights;
pub use trainer::{
    Completion, Control, Progress, TrainExample, TrainOutcome, TrainSummary, Trainer,
};
