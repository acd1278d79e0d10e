//! Quantized checkpoints to CANN's W4A16 operands (feature `checkpoint`).
//!
//! Reads a checkpoint directory (config + `*.safetensors` shards, memory-mapped, one tensor at
//! a time) in one of four 4-bit formats, GPTQ (v1 and v2 zero points, symmetric or not,
//! act-order), AWQ GEMM, compressed-tensors `pack-quantized` and ModelSlim W4A16, and turns
//! every quantized linear into what `aclnnWeightQuantBatchMatmulV2` consumes:
//!
//! `W[k, n] = (w[k, n] + antiquant_offset[g(k), n]) * antiquant_scale[g(k), n]`, `g(k) = k / G`,
//!
//! with `w` int4 packed eight per int32 along N exactly as INT4Pack packs it. The offset is
//! added, so an unsigned zero point `z` (GPTQ, AWQ) becomes `8 - z`, a signed one
//! (compressed-tensors) `-zp`, ModelSlim's offset `-offset`.
//!
//! [`Checkpoint::open`] detects the format and plans every linear (shapes, group sizes, what
//! will be written) without converting anything; [`Checkpoint::convert_linear`] converts one;
//! [`Checkpoint::write`] streams the whole converted checkpoint (quantized linears converted,
//! every other tensor copied unchanged) into any writer, one tensor at a time.

mod formats;
mod load;
mod output;
mod source;
mod synthetic;

use std::path::{Path, PathBuf};

pub use formats::{FormatKind, QuantFormat};
pub use load::DeviceLinear;
pub use output::{ConvertStats, Layout, Progress};
pub use source::{Source, TensorRef};
pub use synthetic::SyntheticGptq;

/// Why a checkpoint could not be read or converted. Every variant names what was wrong and
/// what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file is not what it should be (JSON, safetensors, truncated).
    #[error("{}: {problem}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The configuration names no format this converter knows, or an unsupported variant.
    #[error("{what}; expected {expected}")]
    Unsupported {
        /// What was found.
        what: String,
        /// What is supported.
        expected: String,
    },
    /// A file or tensor is missing.
    #[error("missing {what}; expected {expected}")]
    Missing {
        /// What is missing.
        what: String,
        /// What should be there.
        expected: String,
    },
    /// A tensor has the wrong dtype, shape or values.
    #[error("tensor `{name}`: {problem}; expected {expected}")]
    Tensor {
        /// The tensor.
        name: String,
        /// What is wrong.
        problem: String,
        /// What was expected.
        expected: String,
    },
    /// A quantized linear cannot be expressed as CANN's W4A16 operands.
    #[error("layer `{prefix}`: {problem}; expected {expected}")]
    Layer {
        /// The linear's prefix.
        prefix: String,
        /// What is wrong.
        problem: String,
        /// What CANN accepts.
        expected: String,
    },
}

impl CheckpointError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> CheckpointError {
        CheckpointError::Io { path: path.to_path_buf(), source }
    }
}

/// Result alias of this module.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// The activation dtype, which the antiquant scale and offset take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ActDtype {
    /// FLOAT16.
    #[default]
    F16,
    /// BFLOAT16.
    Bf16,
}

/// One quantized linear, planned: what the converter will write for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearPlan {
    /// The layer's name prefix (e.g. `model.layers.0.self_attn.q_proj`).
    pub prefix: String,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Group size along K; 0 for one scale per output channel.
    pub group_size: usize,
    /// Whether an antiquant offset is written (the source has zero points).
    pub has_offset: bool,
    /// Whether an activation permutation is written (act-order).
    pub has_act_perm: bool,
    /// The source's bias tensor, copied unchanged.
    pub bias: Option<String>,
    /// Source tensors this linear consumes (not copied through).
    pub consumes: Vec<String>,
}

impl LinearPlan {
    /// Number of scale rows: `ceil(K / G)`, or 1 per channel.
    pub fn groups(&self) -> usize {
        self.k.checked_div(self.group_size).map_or(1, |_| self.k.div_ceil(self.group_size))
    }
}

/// One quantized linear in CANN's W4A16 form.
#[derive(Clone, Debug, PartialEq)]
pub struct Int4Linear {
    /// The plan it follows.
    pub plan: LinearPlan,
    /// `(K, N/2)` bytes: int4 two's complement, row-major, column `2j` in the low nibble of
    /// byte `j`: INT4Pack's ND bytes (as `(K, N/8)` little-endian int32 words).
    pub packed: Vec<u8>,
    /// `[groups, N]` scales (exact values of the source's dtype).
    pub scale: Vec<f32>,
    /// `[groups, N]` offsets to add before scaling, when the source has zero points.
    pub offset: Option<Vec<f32>>,
    /// Row `k` of `packed` is input feature `act_perm[k]` (act-order checkpoints).
    pub act_perm: Option<Vec<i32>>,
}

impl Int4Linear {
    /// The int4 value at `(k, n)`.
    pub fn value(&self, k: usize, n: usize) -> i32 {
        let byte = self.packed[k * (self.plan.n / 2) + n / 2];
        let nibble = if n.is_multiple_of(2) { byte & 0xF } else { byte >> 4 };
        i32::from(crate::kernels::int4_value(nibble))
    }

    /// The dequantized weight `(K, N)` in f32, computed as CANN does in the activation dtype
    /// `act` (the shift and the product rounded to it).
    pub fn dequantize(&self, act: ActDtype) -> Vec<f32> {
        let (k, n) = (self.plan.k, self.plan.n);
        let round = |v: f32| match act {
            ActDtype::F16 => half::f16::from_f32(v).to_f32(),
            ActDtype::Bf16 => half::bf16::from_f32(v).to_f32(),
        };
        let mut out = vec![0f32; k * n];
        for r in 0..k {
            let g = r.checked_div(self.plan.group_size).unwrap_or(0);
            for c in 0..n {
                let s = round(self.scale[g * n + c]);
                let o = self.offset.as_ref().map_or(0.0, |o| round(o[g * n + c]));
                out[r * n + c] = round(round(self.value(r, c) as f32 + o) * s);
            }
        }
        out
    }
}

/// A checkpoint directory, opened and planned.
pub struct Checkpoint {
    dir: PathBuf,
    format: QuantFormat,
    source: Source,
    linears: Vec<LinearPlan>,
}

impl Checkpoint {
    /// Opens `dir`: reads its config (`config.json`, `quantize_config.json` or
    /// `quant_model_description.json`), maps its `*.safetensors` files, detects (`FormatKind::Auto`)
    /// or checks the format, and plans every quantized linear.
    pub fn open(dir: &Path, kind: FormatKind) -> Result<Checkpoint> {
        let format = QuantFormat::detect(dir, kind)?;
        let source = Source::open(dir)?;
        let linears = format.plan(&source)?;
        if linears.is_empty() {
            return Err(CheckpointError::Missing {
                what: format!("quantized linear layers in {} ({})", dir.display(), format.name()),
                expected: "at least one 4-bit linear layer".into(),
            });
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), format, source, linears })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The detected format and its configuration.
    pub fn format(&self) -> &QuantFormat {
        &self.format
    }

    /// The tensors of the checkpoint.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Every quantized linear, in name order.
    pub fn linears(&self) -> &[LinearPlan] {
        &self.linears
    }

    /// Converts one linear (reads its tensors, gives their pages back afterwards).
    pub fn convert_linear(&self, plan: &LinearPlan) -> Result<Int4Linear> {
        self.convert_linear_reusing(plan, Vec::new())
    }

    /// [`convert_linear`](Self::convert_linear), with `scratch` (e.g. the previous layer's
    /// packed weight) as the memory of the packed weight.
    pub fn convert_linear_reusing(&self, plan: &LinearPlan, scratch: Vec<u8>) -> Result<Int4Linear> {
        let converted = self.format.convert(&self.source, plan, scratch);
        for name in &plan.consumes {
            if let Some(t) = self.source.get(name) {
                self.source.release(t);
            }
        }
        converted
    }

    /// Writes the converted checkpoint as safetensors to `out`: per linear `P`,
    /// `P.weight`, `P.antiquant_scale`, `P.antiquant_offset` (with zero points), `P.act_perm`
    /// (act-order) and `P.bias`; every other tensor unchanged. With `stack_experts`, the
    /// linears of an MoE block (`….experts.{e}.…`) are written stacked as `(E, …)` tensors.
    pub fn write(
        &self,
        out: &mut dyn std::io::Write,
        layout: Layout,
        act: ActDtype,
        stack_experts: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ConvertStats> {
        output::write(self, out, layout, act, stack_experts, progress)
    }
}
