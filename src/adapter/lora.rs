//! The in-memory form of a trained LoRA adapter, as it travels from the
//! trainer to the exporters.
//!
//! Shapes follow PEFT and llama.cpp alike: for a frozen projection
//! `W: (n_out, n_in)`, `lora_a` is `(rank, n_in)` and `lora_b` is
//! `(n_out, rank)`, both row-major, and the adapted layer computes
//! `y = W x + (alpha / rank) * B (A x)`.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A linear projection of a transformer block that a LoRA pair can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// Attention query projection.
    Q,
    /// Attention key projection.
    K,
    /// Attention value projection.
    V,
    /// Attention output projection.
    O,
    /// Feed-forward gate projection.
    Gate,
    /// Feed-forward up projection.
    Up,
    /// Feed-forward down projection.
    Down,
}

impl LoraTarget {
    /// Every target, in block order.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The tensor name stem llama.cpp uses inside a block (`blk.N.<stem>.weight`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "attn_q",
            LoraTarget::K => "attn_k",
            LoraTarget::V => "attn_v",
            LoraTarget::O => "attn_output",
            LoraTarget::Gate => "ffn_gate",
            LoraTarget::Up => "ffn_up",
            LoraTarget::Down => "ffn_down",
        }
    }

    /// The module name PEFT and Hugging Face use (`q_proj`, `down_proj`, ...).
    pub fn peft_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// Parses a short name as typed on the command line: `q`, `k`, `v`, `o`, `gate`, `up`, `down`.
    pub fn parse(name: &str) -> Option<LoraTarget> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "q" | "q_proj" | "attn_q" => LoraTarget::Q,
            "k" | "k_proj" | "attn_k" => LoraTarget::K,
            "v" | "v_proj" | "attn_v" => LoraTarget::V,
            "o" | "o_proj" | "attn_output" => LoraTarget::O,
            "gate" | "gate_proj" | "ffn_gate" => LoraTarget::Gate,
            "up" | "up_proj" | "ffn_up" => LoraTarget::Up,
            "down" | "down_proj" | "ffn_down" => LoraTarget::Down,
            _ => return None,
        })
    }
}

/// One adapted projection: the low-rank pair for `layer`'s `target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraPair {
    /// Transformer block index, from 0.
    pub layer: usize,
    /// Which projection of the block.
    pub target: LoraTarget,
    /// Input width of the frozen projection.
    pub n_in: usize,
    /// Output width of the frozen projection.
    pub n_out: usize,
    /// `A`, row-major `(rank, n_in)`.
    pub lora_a: Vec<f32>,
    /// `B`, row-major `(n_out, rank)`.
    pub lora_b: Vec<f32>,
}

/// A whole LoRA adapter in f32, independent of any file format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraWeights {
    /// Rank `r` shared by every pair.
    pub rank: usize,
    /// Scaling numerator: the update is scaled by `alpha / rank`.
    pub alpha: f32,
    /// The adapted projections, sorted by layer then target.
    pub pairs: Vec<LoraPair>,
}

impl LoraWeights {
    /// The scale llama.cpp and PEFT apply to `B (A x)`: `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// The distinct targets present, in block order.
    pub fn targets(&self) -> Vec<LoraTarget> {
        let mut targets: Vec<LoraTarget> = self.pairs.iter().map(|p| p.target).collect();
        targets.sort();
        targets.dedup();
        targets
    }
}

impl LoraWeights {
    /// Checks that the weights describe one well-formed adapter: a rank above
    /// zero shared by every pair, a finite alpha, buffers of the sizes the
    /// shapes give, finite values, and no projection adapted twice.
    ///
    /// Every writer calls this first, so no file is ever written from
    /// weights that llama.cpp or PEFT would misread.
    pub fn check(&self) -> Result<()> {
        let invalid = |reason: String| {
            Err(Error::InvalidArgument {
                name: "LoRA weights",
                reason,
            })
        };
        if self.rank == 0 {
            return invalid("rank is 0; a LoRA pair needs rank >= 1".into());
        }
        if !self.alpha.is_finite() {
            return invalid(format!("alpha {} is not a finite number", self.alpha));
        }
        if self.pairs.is_empty() {
            return invalid("no adapted projections; an adapter needs at least one pair".into());
        }
        let mut seen = std::collections::HashSet::new();
        for pair in &self.pairs {
            let name = format!("layer {} {}", pair.layer, pair.target.gguf_name());
            if !seen.insert((pair.layer, pair.target)) {
                return invalid(format!("{name} is adapted twice"));
            }
            if pair.n_in == 0 || pair.n_out == 0 {
                return invalid(format!(
                    "{name} has shape {}x{}; both widths must be above 0",
                    pair.n_out, pair.n_in
                ));
            }
            let (want_a, want_b) = (self.rank * pair.n_in, pair.n_out * self.rank);
            if pair.lora_a.len() != want_a || pair.lora_b.len() != want_b {
                return invalid(format!(
                    "{name}: lora_a holds {} values and lora_b {}, but rank {} with n_in {} \
                     and n_out {} needs {want_a} and {want_b}",
                    pair.lora_a.len(),
                    pair.lora_b.len(),
                    self.rank,
                    pair.n_in,
                    pair.n_out
                ));
            }
            if pair
                .lora_a
                .iter()
                .chain(&pair.lora_b)
                .any(|v| !v.is_finite())
            {
                return invalid(format!("{name} holds a value that is NaN or infinite"));
            }
        }
        Ok(())
    }

    /// The pairs in file order (by layer, then target in block order).
    pub(crate) fn sorted_pairs(&self) -> Vec<&LoraPair> {
        let mut pairs: Vec<&LoraPair> = self.pairs.iter().collect();
        pairs.sort_by_key(|p| (p.layer, p.target));
        pairs
    }
}
