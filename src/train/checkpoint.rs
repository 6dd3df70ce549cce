//! Checkpoints of a run in progress: adapter, optimizer moments, the best
//! adapter so far and the loop's position, in one safetensors file written
//! atomically (temporary file, fsync, rename), so a process killed at any
//! moment leaves either the previous checkpoint or the new one.
//!
//! No random-number state needs saving: shuffling and dropout masks are drawn
//! from streams seeded by (seed, epoch) and (seed, step), so the position in
//! the loop determines them.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of the checkpoint inside the checkpoint folder.
pub(crate) const FILE_NAME: &str = "checkpoint.safetensors";

/// Where the loop stands, and what it must match to be resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LoopState {
    /// Describes the run (config and example count); a resume must match it.
    pub(crate) fingerprint: String,
    /// Optimizer steps done.
    pub(crate) step: usize,
    /// Epoch in progress, from 0.
    pub(crate) epoch: usize,
    /// Examples of that epoch's order already consumed.
    pub(crate) position: usize,
    /// AdamW's step counter (skipped steps do not count).
    pub(crate) adam_steps: u64,
    /// Steps skipped for a non-finite loss or gradient.
    pub(crate) skipped_non_finite: usize,
    /// Loss of the first step, if any.
    pub(crate) first_loss: Option<f32>,
    /// Loss of the latest step, if any.
    pub(crate) last_loss: Option<f32>,
    /// Lowest training step loss so far.
    pub(crate) best_loss: Option<f32>,
    /// Lowest validation loss so far.
    pub(crate) best_validation_loss: Option<f32>,
    /// Tokens run through the model so far.
    pub(crate) tokens: u64,
}

/// Everything a checkpoint holds.
#[derive(Debug)]
pub(crate) struct Checkpoint {
    pub(crate) state: LoopState,
    pub(crate) lora: Vec<Tensor>,
    pub(crate) adam_m: Vec<Tensor>,
    pub(crate) adam_v: Vec<Tensor>,
    pub(crate) best: Option<Vec<Tensor>>,
}

fn checkpoint_err(path: &Path, reason: impl ToString) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Writes `checkpoint` to `dir/checkpoint.safetensors` atomically; returns the path.
pub(crate) fn save(dir: &Path, checkpoint: &Checkpoint) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(FILE_NAME);
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));

    let mut named: Vec<(String, &Tensor)> = Vec::new();
    let groups = [
        ("lora", Some(&checkpoint.lora)),
        ("adam_m", Some(&checkpoint.adam_m)),
        ("adam_v", Some(&checkpoint.adam_v)),
        ("best", checkpoint.best.as_ref()),
    ];
    for (prefix, tensors) in groups {
        for (i, t) in tensors.into_iter().flatten().enumerate() {
            named.push((format!("{prefix}.{i:04}"), t));
        }
    }
    let state = serde_json::to_string(&checkpoint.state).map_err(|e| checkpoint_err(&path, e))?;
    let metadata = HashMap::from([("nextquill.loop".to_string(), state)]);
    let bytes =
        safetensors::serialize(named, Some(metadata)).map_err(|e| checkpoint_err(&path, e))?;

    let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    file.write_all(&bytes).map_err(|e| Error::io(&tmp, e))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    // The rename is durable only once the folder entry is on disk.
    if let Ok(folder) = std::fs::File::open(dir) {
        let _ = folder.sync_all();
    }
    Ok(path)
}

/// Reads `dir/checkpoint.safetensors`, or `None` when there is none.
pub(crate) fn load(dir: &Path, device: &Device) -> Result<Option<Checkpoint>> {
    let path = dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| checkpoint_err(&path, e))?;
    let state = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("nextquill.loop"))
        .ok_or_else(|| checkpoint_err(&path, "it has no nextquill loop state"))?;
    let state: LoopState = serde_json::from_str(state).map_err(|e| checkpoint_err(&path, e))?;

    let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| checkpoint_err(&path, e))?;
    let mut group = |prefix: &str| -> Vec<Tensor> {
        let mut out = Vec::new();
        while let Some(t) = tensors.remove(&format!("{prefix}.{:04}", out.len())) {
            out.push(t);
        }
        out
    };
    let lora = group("lora");
    let adam_m = group("adam_m");
    let adam_v = group("adam_v");
    let best = Some(group("best")).filter(|b| !b.is_empty());
    if adam_m.len() != lora.len() || adam_v.len() != lora.len() {
        return Err(checkpoint_err(
            &path,
            "adapter and optimizer tensors do not pair up",
        ));
    }
    Ok(Some(Checkpoint {
        state,
        lora,
        adam_m,
        adam_v,
        best,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_reads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let t = |v: f32| Tensor::from_vec(vec![v, v + 0.25, -v], 3, &Device::Cpu).unwrap();
        let state = LoopState {
            fingerprint: "run".into(),
            step: 7,
            epoch: 1,
            position: 3,
            adam_steps: 6,
            skipped_non_finite: 1,
            first_loss: Some(3.5),
            last_loss: Some(2.25),
            best_loss: Some(2.0),
            best_validation_loss: None,
            tokens: 1234,
        };
        let checkpoint = Checkpoint {
            state: state.clone(),
            lora: vec![t(1.0), t(2.0)],
            adam_m: vec![t(3.0), t(4.0)],
            adam_v: vec![t(5.0), t(6.0)],
            best: None,
        };
        save(dir.path(), &checkpoint).unwrap();
        let back = load(dir.path(), &Device::Cpu).unwrap().unwrap();
        assert_eq!(back.state, state);
        assert_eq!(
            back.lora[1].to_vec1::<f32>().unwrap(),
            vec![2.0, 2.25, -2.0]
        );
        assert_eq!(
            back.adam_v[0].to_vec1::<f32>().unwrap(),
            vec![5.0, 5.25, -5.0]
        );
        assert!(back.best.is_none());
        assert!(!dir.path().join(format!("{FILE_NAME}.tmp")).exists());
        assert!(load(&dir.path().join("none"), &Device::Cpu)
            .unwrap()
            .is_none());
    }
}
