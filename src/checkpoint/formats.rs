//! The four 4-bit formats: configuration, planning (which linears, what shapes) and conversion
//! of one linear to CANN's W4A16 form. Layouts are in `docs/checkpoints.md`.

use std::path::Path;

use rayon::prelude::*;
use safetensors::tensor::Dtype;
use serde_json::Value;

use super::source::{FLOATS, Source, TensorRef, float_at, int_at, words};
use super::{CheckpointError, Int4Linear, LinearPlan, Result};

/// Which format to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FormatKind {
    /// Detect from the configuration files.
    #[default]
    Auto,
    /// GPTQ (`quant_method = "gptq"`).
    Gptq,
    /// AWQ GEMM (`quant_method = "awq"`).
    Awq,
    /// compressed-tensors `pack-quantized`.
    CompressedTensors,
    /// ModelSlim W4A16 (`quant_model_description.json`).
    ModelSlim,
}

impl std::str::FromStr for FormatKind {
    type Err = CheckpointError;
    fn from_str(s: &str) -> Result<FormatKind> {
        Ok(match s {
            "auto" => FormatKind::Auto,
            "gptq" => FormatKind::Gptq,
            "awq" => FormatKind::Awq,
            "compressed-tensors" => FormatKind::CompressedTensors,
            "modelslim" => FormatKind::ModelSlim,
            other => {
                return Err(CheckpointError::Unsupported {
                    what: format!("format `{other}`"),
                    expected: "gptq, awq, compressed-tensors, modelslim or auto".into(),
                });
            }
        })
    }
}

/// A detected format with the configuration the conversion needs.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantFormat {
    /// GPTQ.
    Gptq {
        /// `group_size` (0 for per channel, written as -1).
        group_size: usize,
        /// `sym`.
        sym: bool,
        /// `desc_act` (act-order).
        desc_act: bool,
        /// `checkpoint_format = "gptq_v2"` (zero points stored as is; v1 stores `z - 1`).
        v2: bool,
    },
    /// AWQ GEMM.
    Awq {
        /// `group_size` / `q_group_size`.
        group_size: usize,
        /// `zero_point`.
        zero_point: bool,
    },
    /// compressed-tensors pack-quantized.
    CompressedTensors {
        /// Group size (0 for the channel strategy).
        group_size: usize,
        /// `symmetric`.
        symmetric: bool,
        /// Layers (prefixes or `re:` patterns) left unquantized.
        ignore: Vec<String>,
    },
    /// ModelSlim W4A16.
    ModelSlim {
        /// Layers the description marks `W4A16`.
        quantized: Vec<String>,
        /// The description's `version`: `"1.0.0"` (ascendV1) packs two int4 per int8; absent in
        /// the older format, which stores one value per int8.
        version: String,
        /// The description's `group_size` (ascendV1 writes it when grouped), else 0.
        group_size: usize,
    },
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| CheckpointError::Format { path: path.to_path_buf(), problem: format!("invalid JSON: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CheckpointError::io(path, e)),
    }
}

fn unsupported(what: impl Into<String>, expected: impl Into<String>) -> CheckpointError {
    CheckpointError::Unsupported { what: what.into(), expected: expected.into() }
}

/// `bits` (or its aliases) must be 4.
fn check_bits(cfg: &Value, keys: &[&str]) -> Result<()> {
    match keys.iter().find_map(|k| cfg.get(*k)).and_then(Value::as_i64) {
        Some(4) | None => Ok(()),
        Some(b) => Err(unsupported(format!("{b}-bit quantization"), "4 bits (W4A16)")),
    }
}

/// A group size from the config: -1 (or absent) means per channel; otherwise a multiple of 32.
fn group_size(cfg: &Value, keys: &[&str]) -> Result<usize> {
    let g = keys.iter().find_map(|k| cfg.get(*k)).and_then(Value::as_i64).unwrap_or(-1);
    if g == -1 || g == 0 {
        return Ok(0);
    }
    if g < 0 || g % 32 != 0 {
        return Err(unsupported(format!("group size {g}"), "-1 (per channel) or a multiple of 32 (CANN's W4A16 rule)"));
    }
    Ok(g as usize)
}

impl QuantFormat {
    /// Reads the configuration of `dir` and returns its format (checked against `kind`).
    pub fn detect(dir: &Path, kind: FormatKind) -> Result<QuantFormat> {
        let config = read_json(&dir.join("config.json"))?;
        let quantize_config = match read_json(&dir.join("quantize_config.json"))? {
            Some(q) => Some(q),
            None => read_json(&dir.join("quant_config.json"))?,
        };
        // ModelSlim: quant_model_description.json (ascendV1) or quant_model_description_w4a16.json.
        let description = match read_json(&dir.join("quant_model_description.json"))? {
            Some(d) => Some(d),
            None => read_json(&dir.join("quant_model_description_w4a16.json"))?,
        };
        let qc = config.as_ref().and_then(|c| c.get("quantization_config")).or(quantize_config.as_ref());
        // GPTQModel writes `method` and `format`; `quant_method` and `checkpoint_format` are aliases.
        let key = |q: &Value, keys: &[&str]| {
            keys.iter().find_map(|k| q.get(*k)).and_then(Value::as_str).map(str::to_ascii_lowercase)
        };
        let method = qc.and_then(|q| key(q, &["quant_method", "method"]));
        let detected = match (method.as_deref(), &description) {
            (Some("gptq"), _) => FormatKind::Gptq,
            (Some("awq"), _) => FormatKind::Awq,
            (Some("compressed-tensors"), _) => FormatKind::CompressedTensors,
            (None, Some(_)) => FormatKind::ModelSlim,
            // quantize_config.json of AutoGPTQ carries no quant_method.
            (None, None) if quantize_config.is_some() => FormatKind::Gptq,
            (Some(other), _) => {
                return Err(unsupported(format!("quant_method `{other}`"), "gptq, awq or compressed-tensors"));
            }
            (None, None) => {
                return Err(CheckpointError::Missing {
                    what: format!("a quantization config in {}", dir.display()),
                    expected: "config.json with quantization_config, quantize_config.json, or \
                               quant_model_description.json"
                        .into(),
                });
            }
        };
        if kind != FormatKind::Auto && kind != detected {
            return Err(unsupported(format!("the checkpoint is {detected:?}"), format!("{kind:?}, as --from says")));
        }
        let cfg = qc.cloned().unwrap_or(Value::Null);
        match detected {
            FormatKind::Gptq => {
                check_bits(&cfg, &["bits"])?;
                let v2 = match key(&cfg, &["checkpoint_format", "format"]).as_deref() {
                    None | Some("gptq") => false,
                    Some("gptq_v2") => true,
                    Some(other) => {
                        return Err(unsupported(format!("GPTQ checkpoint_format `{other}`"), "gptq or gptq_v2"));
                    }
                };
                if let Some(p) = key(&cfg, &["pack_dtype"])
                    && p != "int32"
                {
                    return Err(unsupported(format!("GPTQ pack_dtype `{p}`"), "int32"));
                }
                Ok(QuantFormat::Gptq {
                    group_size: group_size(&cfg, &["group_size"])?,
                    sym: cfg.get("sym").and_then(Value::as_bool).unwrap_or(true),
                    desc_act: cfg.get("desc_act").and_then(Value::as_bool).unwrap_or(false),
                    v2,
                })
            }
            FormatKind::Awq => {
                check_bits(&cfg, &["bits", "w_bit"])?;
                let version = cfg.get("version").and_then(Value::as_str).unwrap_or("gemm").to_ascii_lowercase();
                if version != "gemm" {
                    return Err(unsupported(format!("AWQ version `{version}`"), "gemm"));
                }
                Ok(QuantFormat::Awq {
                    group_size: group_size(&cfg, &["group_size", "q_group_size"])?,
                    zero_point: cfg.get("zero_point").and_then(Value::as_bool).unwrap_or(true),
                })
            }
            FormatKind::CompressedTensors => {
                let fmt = cfg.get("format").and_then(Value::as_str).unwrap_or("");
                if fmt != "pack-quantized" {
                    return Err(unsupported(format!("compressed-tensors format `{fmt}`"), "pack-quantized"));
                }
                let groups =
                    cfg.get("config_groups").and_then(Value::as_object).ok_or_else(|| CheckpointError::Missing {
                        what: "quantization_config.config_groups".into(),
                        expected: "one config group with 4-bit int weights".into(),
                    })?;
                if groups.len() != 1 {
                    return Err(unsupported(format!("{} config groups", groups.len()), "one config group"));
                }
                let weights = groups.values().next().and_then(|g| g.get("weights")).cloned().unwrap_or(Value::Null);
                check_bits(&weights, &["num_bits"])?;
                if weights.get("type").and_then(Value::as_str).is_some_and(|t| t != "int") {
                    return Err(unsupported("non-int weights", "type int"));
                }
                let strategy = weights.get("strategy").and_then(Value::as_str).unwrap_or("group");
                let group_size = match strategy {
                    "channel" => 0,
                    "group" => group_size(&weights, &["group_size"])?,
                    other => return Err(unsupported(format!("strategy `{other}`"), "group or channel")),
                };
                let ignore = cfg
                    .get("ignore")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
                    .unwrap_or_default();
                Ok(QuantFormat::CompressedTensors {
                    group_size,
                    symmetric: weights.get("symmetric").and_then(Value::as_bool).unwrap_or(true),
                    ignore,
                })
            }
            FormatKind::ModelSlim => {
                let d = description.unwrap_or(Value::Null);
                let kind = d.get("model_quant_type").and_then(Value::as_str).unwrap_or("");
                if kind != "W4A16" {
                    return Err(unsupported(format!("ModelSlim model_quant_type `{kind}`"), "W4A16"));
                }
                let quantized = d
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter(|(_, v)| v.as_str() == Some("W4A16"))
                            .filter_map(|(k, _)| k.strip_suffix(".weight").map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                let version = d.get("version").and_then(Value::as_str).unwrap_or("").to_string();
                let group_size = d.get("group_size").and_then(Value::as_u64).unwrap_or(0) as usize;
                Ok(QuantFormat::ModelSlim { quantized, version, group_size })
            }
            FormatKind::Auto => unreachable!("detection yields a concrete format"),
        }
    }

    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            QuantFormat::Gptq { .. } => "gptq",
            QuantFormat::Awq { .. } => "awq",
            QuantFormat::CompressedTensors { .. } => "compressed-tensors",
            QuantFormat::ModelSlim { .. } => "modelslim",
        }
    }

    /// Every quantized linear of `src`, planned (shapes checked, nothing converted).
    pub fn plan(&self, src: &Source) -> Result<Vec<LinearPlan>> {
        let suffix = match self {
            QuantFormat::Gptq { .. } | QuantFormat::Awq { .. } => ".qweight",
            QuantFormat::CompressedTensors { .. } => ".weight_packed",
            QuantFormat::ModelSlim { .. } => ".weight_scale",
        };
        let prefixes: Vec<String> =
            src.tensors().filter_map(|t| t.name.strip_suffix(suffix).map(String::from)).collect();
        let mut plans = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            let plan = match self {
                QuantFormat::Gptq { group_size, sym, desc_act, .. } => {
                    gptq_plan(src, &prefix, *group_size, *sym, *desc_act)?
                }
                QuantFormat::Awq { group_size, zero_point } => awq_plan(src, &prefix, *group_size, *zero_point)?,
                QuantFormat::CompressedTensors { group_size, symmetric, .. } => {
                    ct_plan(src, &prefix, *group_size, *symmetric)?
                }
                QuantFormat::ModelSlim { quantized, version, group_size } => {
                    if !quantized.is_empty() && !quantized.contains(&prefix) {
                        continue;
                    }
                    ms_plan(src, &prefix, version, *group_size)?
                }
            };
            plans.push(plan);
        }
        Ok(plans)
    }

    /// Converts one planned linear.
    ///
    /// `scratch` becomes the packed weight (its memory is reused: a converter that converts layer
    /// after layer hands the previous layer's buffer back, so no layer pays for fresh pages).
    pub fn convert(&self, src: &Source, plan: &LinearPlan, scratch: Vec<u8>) -> Result<Int4Linear> {
        let mut out = scratch;
        out.clear();
        out.resize(plan.k * plan.n / 2, 0);
        match self {
            QuantFormat::Gptq { v2, sym, .. } => gptq_convert(src, plan, *v2, *sym, out),
            QuantFormat::Awq { .. } => awq_convert(src, plan, out),
            QuantFormat::CompressedTensors { .. } => ct_convert(src, plan, out),
            QuantFormat::ModelSlim { version, group_size, .. } => ms_convert(src, plan, version, *group_size, out),
        }
    }
}

fn layer_error(prefix: &str, problem: impl Into<String>, expected: impl Into<String>) -> CheckpointError {
    CheckpointError::Layer { prefix: prefix.to_string(), problem: problem.into(), expected: expected.into() }
}

/// CANN's shape rules for one W4A16 linear.
fn check_linear(prefix: &str, k: usize, n: usize, group_size: usize) -> Result<()> {
    if n == 0 || !n.is_multiple_of(8) {
        return Err(layer_error(
            prefix,
            format!("N = {n} output features"),
            "N a multiple of 8 (eight int4 per int32)",
        ));
    }
    if k == 0 {
        return Err(layer_error(prefix, "K = 0 input features", "K >= 1"));
    }
    if group_size > 0 && !k.is_multiple_of(group_size) {
        return Err(layer_error(
            prefix,
            format!("K = {k} is not a multiple of the group size {group_size}"),
            "whole groups",
        ));
    }
    Ok(())
}

/// The bias of `prefix`, if the source has one.
fn bias_of(src: &Source, prefix: &str) -> Option<String> {
    let name = format!("{prefix}.bias");
    src.get(&name).map(|_| name)
}

/// Packs one output row: `value(n)` gives the int4 (as its nibble) of column `n`.
fn pack_rows(mut out: Vec<u8>, k: usize, n: usize, nibble: impl Fn(usize, usize) -> u8 + Sync) -> Vec<u8> {
    debug_assert_eq!(out.len(), k * n / 2);
    out.par_chunks_mut(n / 2).enumerate().for_each(|(r, row)| {
        for (j, b) in row.iter_mut().enumerate() {
            *b = (nibble(r, 2 * j) & 0xF) | (nibble(r, 2 * j + 1) << 4);
        }
    });
    out
}

/// `out[j]` nibble `i` = `w[i]` nibble `j`: an 8x8 transpose of 4-bit cells, by swapping
/// 4x4, then 2x2, then 1x1 blocks across the diagonal (12 masked swaps instead of 64 moves).
fn transpose_nibbles(mut w: [u32; 8]) -> [u32; 8] {
    #[inline(always)]
    fn swap(w: &mut [u32; 8], a: usize, b: usize, shift: u32, mask: u32) {
        let t = ((w[a] >> shift) ^ w[b]) & mask;
        w[b] ^= t;
        w[a] ^= t << shift;
    }
    for i in 0..4 {
        swap(&mut w, i, i + 4, 16, 0x0000_FFFF);
    }
    for i in [0, 1, 4, 5] {
        swap(&mut w, i, i + 2, 8, 0x00FF_00FF);
    }
    for i in [0, 2, 4, 6] {
        swap(&mut w, i, i + 1, 4, 0x0F0F_0F0F);
    }
    w
}

/// Writes one block of 8 output rows (`block`, `8 * cols8 * 4` bytes) from 8-word groups:
/// `words(cb)` gives the 8 input words whose nibble `j` is row `j` of the block at column
/// `8 cb + i` (`i` the word), stored unsigned (`q + 8` or `q`); written as INT4Pack's bytes,
/// `x ^ 8` per nibble.
#[inline(always)]
fn transpose_block(block: &mut [u8], cols8: usize, words: impl Fn(usize) -> [u32; 8]) {
    let row_bytes = cols8 * 4;
    let (rows, _) = block.as_chunks_mut::<4>();
    for cb in 0..cols8 {
        let t = transpose_nibbles(words(cb));
        for (j, w) in t.iter().enumerate() {
            rows[j * cols8 + cb] = (w ^ 0x8888_8888).to_le_bytes();
        }
    }
    debug_assert_eq!(block.len(), 8 * row_bytes);
}

/// Row blocks per stripe: between stripes, the input a stripe read is given back to the kernel
/// (one `madvise` per stripe: per block, the TLB shootdowns would cost more than the work).
const STRIPE_BLOCKS: usize = 256;

/// GPTQ's `qweight` `[K/8, N]` (row `r` packs input rows `8r..8r+8` of every column) to
/// INT4Pack's `[K, N/2]` bytes: each 8x8 block of nibbles transposed, `q ^ 8`. Input rows are
/// read front to back and given back stripe by stripe, so the input and output of one large
/// layer are never resident at once.
fn gptq_blocks(mut out: Vec<u8>, src: &Source, qweight: &TensorRef, k8: usize, n: usize) -> Vec<u8> {
    let input = src.bytes(qweight);
    let (row_bytes, in_row) = (n / 2 * 8, n * 4);
    for (stripe, chunk) in out.chunks_mut(STRIPE_BLOCKS * row_bytes).enumerate() {
        let first = stripe * STRIPE_BLOCKS;
        chunk.par_chunks_mut(row_bytes).enumerate().for_each(|(i, block)| {
            let row = &input[(first + i) * in_row..(first + i + 1) * in_row];
            let (words, _) = row.as_chunks::<4>();
            transpose_block(block, n / 8, |cb| std::array::from_fn(|c| u32::from_le_bytes(words[8 * cb + c])));
        });
        let blocks = chunk.len() / row_bytes;
        src.release_range(qweight, first * in_row, (first + blocks) * in_row);
    }
    debug_assert_eq!(out.len(), k8 * row_bytes);
    out
}

/// compressed-tensors' `weight_packed` `[N, K/8]` (word `[n, c]` packs rows `8c..8c+8` of column
/// `n`) to INT4Pack's `[K, N/2]` bytes: each 8x8 block of nibbles transposed, `(q + 8) ^ 8`.
fn ct_blocks(mut out: Vec<u8>, input: &[u8], k8: usize, n: usize) -> Vec<u8> {
    let row_bytes = n / 2 * 8;
    let (words, _) = input.as_chunks::<4>();
    out.par_chunks_mut(row_bytes).enumerate().for_each(|(c, block)| {
        transpose_block(block, n / 8, |nb| std::array::from_fn(|i| u32::from_le_bytes(words[(8 * nb + i) * k8 + c])));
    });
    out
}

/// Scales (and offsets) of a `[rows, cols]` float tensor as f32, transposed when asked.
fn floats(src: &Source, t: &TensorRef, transpose: bool) -> Vec<f32> {
    let bytes = src.bytes(t);
    let (rows, cols) = (t.shape[0], t.shape.get(1).copied().unwrap_or(1));
    if !transpose {
        return (0..rows * cols).map(|i| float_at(t.dtype, bytes, i)).collect();
    }
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = float_at(t.dtype, bytes, r * cols + c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// GPTQ
// ---------------------------------------------------------------------------------------------

fn gptq_plan(src: &Source, prefix: &str, group_size: usize, sym: bool, desc_act: bool) -> Result<LinearPlan> {
    let qweight = src.require(&format!("{prefix}.qweight"), &[Dtype::I32], &[None, None])?;
    let (k, n) = (qweight.shape[0] * 8, qweight.shape[1]);
    check_linear(prefix, k, n, group_size)?;
    let groups = k.checked_div(group_size).unwrap_or(1);
    src.require(&format!("{prefix}.qzeros"), &[Dtype::I32], &[Some(groups), Some(n / 8)])?;
    src.require(&format!("{prefix}.scales"), FLOATS, &[Some(groups), Some(n)])?;
    let g_idx = format!("{prefix}.g_idx");
    let mut consumes = vec![format!("{prefix}.qweight"), format!("{prefix}.qzeros"), format!("{prefix}.scales")];
    if src.get(&g_idx).is_some() {
        src.require(&g_idx, &[Dtype::I32, Dtype::I64], &[Some(k)])?;
        consumes.push(g_idx);
    } else if desc_act {
        return Err(CheckpointError::Missing {
            what: format!("tensor `{g_idx}`"),
            expected: "g_idx [K] for an act-order (desc_act) checkpoint".into(),
        });
    }
    let bias = bias_of(src, prefix);
    Ok(LinearPlan {
        prefix: prefix.to_string(),
        k,
        n,
        group_size,
        has_offset: !sym,
        has_act_perm: desc_act,
        bias,
        consumes,
    })
}

/// The rows in group order (stable) and a check that every group is contiguous and whole.
fn group_order(prefix: &str, g_idx: &[i64], group_size: usize, groups: usize) -> Result<Vec<usize>> {
    let mut order: Vec<usize> = (0..g_idx.len()).collect();
    order.sort_by_key(|r| g_idx[*r]);
    for (k, r) in order.iter().enumerate() {
        let want = k.checked_div(group_size).unwrap_or(0);
        if g_idx[*r] != want as i64 || want >= groups {
            return Err(layer_error(
                prefix,
                format!("g_idx gives group {} to row {r}, so group {want} is not {group_size} whole rows", g_idx[*r]),
                "every group exactly group_size rows (then act-order can be undone by a permutation)",
            ));
        }
    }
    Ok(order)
}

fn gptq_convert(src: &Source, plan: &LinearPlan, v2: bool, sym: bool, out: Vec<u8>) -> Result<Int4Linear> {
    let p = &plan.prefix;
    let (k, n, groups) = (plan.k, plan.n, plan.groups());
    let qweight = src.require(&format!("{p}.qweight"), &[Dtype::I32], &[Some(k / 8), Some(n)])?;
    let qzeros = src.require(&format!("{p}.qzeros"), &[Dtype::I32], &[Some(groups), Some(n / 8)])?;
    let scales = src.require(&format!("{p}.scales"), FLOATS, &[Some(groups), Some(n)])?;
    // Row order: by g_idx when present (act-order scatters groups), else input order.
    let order: Vec<usize> = match src.get(&format!("{p}.g_idx")) {
        Some(t) => {
            let bytes = src.bytes(t);
            let g_idx: Vec<i64> = (0..k).map(|i| int_at(t.dtype, bytes, i)).collect();
            group_order(p, &g_idx, plan.group_size, groups)?
        }
        None => (0..k).collect(),
    };
    let identity = order.iter().enumerate().all(|(i, r)| i == *r);
    let qw = src.bytes(qweight);
    let word = |r: usize, c: usize| {
        let i = 4 * (r * n + c);
        u32::from_le_bytes([qw[i], qw[i + 1], qw[i + 2], qw[i + 3]])
    };
    // w = q - 8: the int4 two's-complement nibble of q - 8 is q ^ 8.
    let packed = if identity && k % 8 == 0 {
        // Eight input words (eight columns, eight rows each) are eight output words (eight
        // rows, eight columns each): an 8x8 transpose of nibbles.
        gptq_blocks(out, src, qweight, k / 8, n)
    } else {
        pack_rows(out, k, n, |r, c| {
            let row = order[r];
            (((word(row / 8, c) >> (4 * (row % 8))) & 0xF) as u8) ^ 8
        })
    };
    // Zero points along N; v1 stores z - 1 (add 1 to every nibble of the word, as GPTQModel does).
    let zeros: Vec<u32> = words(src.bytes(qzeros))
        .flat_map(|w| {
            let w = if v2 { w } else { w.wrapping_add(0x1111_1111) };
            (0..8).map(move |j| (w >> (4 * j)) & 0xF)
        })
        .collect();
    if sym && let Some(z) = zeros.iter().find(|z| **z != 8) {
        return Err(layer_error(
            p,
            format!("the config says sym but a zero point is {z}"),
            "zero points of 8 (stored 7 in GPTQ v1), or sym = false",
        ));
    }
    let offset = (!sym).then(|| zeros.iter().map(|z| 8.0 - *z as f32).collect());
    Ok(Int4Linear {
        plan: plan.clone(),
        packed,
        scale: floats(src, scales, false),
        offset,
        act_perm: (!identity).then(|| order.iter().map(|r| *r as i32).collect()),
    })
}

// ---------------------------------------------------------------------------------------------
// AWQ GEMM
// ---------------------------------------------------------------------------------------------

/// AWQ's interleave: nibble `i` of a word holds column `AWQ_ORDER[i]` of its eight.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

fn awq_plan(src: &Source, prefix: &str, group_size: usize, zero_point: bool) -> Result<LinearPlan> {
    let qweight = src.require(&format!("{prefix}.qweight"), &[Dtype::I32], &[None, None])?;
    let (k, n) = (qweight.shape[0], qweight.shape[1] * 8);
    check_linear(prefix, k, n, group_size)?;
    let groups = k.checked_div(group_size).unwrap_or(1);
    src.require(&format!("{prefix}.qzeros"), &[Dtype::I32], &[Some(groups), Some(n / 8)])?;
    src.require(&format!("{prefix}.scales"), FLOATS, &[Some(groups), Some(n)])?;
    Ok(LinearPlan {
        prefix: prefix.to_string(),
        k,
        n,
        group_size,
        has_offset: zero_point,
        has_act_perm: false,
        bias: bias_of(src, prefix),
        consumes: vec![format!("{prefix}.qweight"), format!("{prefix}.qzeros"), format!("{prefix}.scales")],
    })
}

/// Undoes AWQ's interleave of one word: nibble `j` of the result is column `j`.
fn awq_word(w: u32) -> u32 {
    let mut out = 0u32;
    for (i, col) in AWQ_ORDER.iter().enumerate() {
        out |= ((w >> (4 * i)) & 0xF) << (4 * col);
    }
    out
}

fn awq_convert(src: &Source, plan: &LinearPlan, out: Vec<u8>) -> Result<Int4Linear> {
    let p = &plan.prefix;
    let (k, n, groups) = (plan.k, plan.n, plan.groups());
    let qweight = src.require(&format!("{p}.qweight"), &[Dtype::I32], &[Some(k), Some(n / 8)])?;
    let qzeros = src.require(&format!("{p}.qzeros"), &[Dtype::I32], &[Some(groups), Some(n / 8)])?;
    let scales = src.require(&format!("{p}.scales"), FLOATS, &[Some(groups), Some(n)])?;
    // Un-interleave, then q - 8 (XOR 0x8 per nibble): INT4Pack's word, little-endian; input rows
    // are given back as they are done.
    let mut packed = out;
    let row = n / 2;
    packed.par_chunks_mut(row).zip(src.bytes(qweight).par_chunks(row)).enumerate().for_each(|(r, (o, i))| {
        for (o, i) in o.chunks_exact_mut(4).zip(i.chunks_exact(4)) {
            let w = awq_word(u32::from_le_bytes([i[0], i[1], i[2], i[3]])) ^ 0x8888_8888;
            o.copy_from_slice(&w.to_le_bytes());
        }
        src.release_range(qweight, r * row, (r + 1) * row);
    });
    let offset = plan.has_offset.then(|| {
        words(src.bytes(qzeros))
            .flat_map(|w| {
                let w = awq_word(w);
                (0..8).map(move |j| 8.0 - ((w >> (4 * j)) & 0xF) as f32)
            })
            .collect()
    });
    Ok(Int4Linear { plan: plan.clone(), packed, scale: floats(src, scales, false), offset, act_perm: None })
}

// ---------------------------------------------------------------------------------------------
// compressed-tensors pack-quantized
// ---------------------------------------------------------------------------------------------

fn ct_plan(src: &Source, prefix: &str, group_size: usize, symmetric: bool) -> Result<LinearPlan> {
    let packed = src.require(&format!("{prefix}.weight_packed"), &[Dtype::I32], &[None, None])?;
    let shape_name = format!("{prefix}.weight_shape");
    let (n, k) = match src.get(&shape_name) {
        Some(_) => {
            let t = src.require(&shape_name, &[Dtype::I64, Dtype::I32], &[Some(2)])?;
            let b = src.bytes(t);
            (int_at(t.dtype, b, 0) as usize, int_at(t.dtype, b, 1) as usize)
        }
        None => (packed.shape[0], packed.shape[1] * 8),
    };
    if packed.shape != [n, k.div_ceil(8)] {
        return Err(CheckpointError::Tensor {
            name: format!("{prefix}.weight_packed"),
            problem: format!("shape {:?}", packed.shape),
            expected: format!("[N, ceil(K/8)] = [{n}, {}] for weight_shape ({n}, {k})", k.div_ceil(8)),
        });
    }
    check_linear(prefix, k, n, group_size)?;
    let groups = k.checked_div(group_size).unwrap_or(1);
    src.require(&format!("{prefix}.weight_scale"), FLOATS, &[Some(n), Some(groups)])?;
    let mut consumes = vec![format!("{prefix}.weight_packed"), format!("{prefix}.weight_scale")];
    if src.get(&shape_name).is_some() {
        consumes.push(shape_name);
    }
    let zp = format!("{prefix}.weight_zero_point");
    let has_offset = !symmetric && src.get(&zp).is_some();
    if !symmetric && !has_offset {
        return Err(CheckpointError::Missing {
            what: format!("tensor `{zp}`"),
            expected: "weight_zero_point for an asymmetric compressed-tensors checkpoint".into(),
        });
    }
    if has_offset {
        // Packed int32 [ceil(N/8), groups] (compressed-tensors 0.9.4+), or unpacked int8
        // [N, groups] (before).
        let t = src.require(&zp, &[Dtype::I32, Dtype::I8], &[None, Some(groups)])?;
        let rows = if t.dtype == Dtype::I8 { n } else { n.div_ceil(8) };
        src.require(&zp, &[t.dtype], &[Some(rows), Some(groups)])?;
        consumes.push(zp);
    }
    Ok(LinearPlan {
        prefix: prefix.to_string(),
        k,
        n,
        group_size,
        has_offset,
        has_act_perm: false,
        bias: bias_of(src, prefix),
        consumes,
    })
}

fn ct_convert(src: &Source, plan: &LinearPlan, out: Vec<u8>) -> Result<Int4Linear> {
    let p = &plan.prefix;
    let (k, n, groups) = (plan.k, plan.n, plan.groups());
    let kw = k.div_ceil(8);
    let packed_t = src.require(&format!("{p}.weight_packed"), &[Dtype::I32], &[Some(n), Some(kw)])?;
    let scale_t = src.require(&format!("{p}.weight_scale"), FLOATS, &[Some(n), Some(groups)])?;
    let wp = src.bytes(packed_t);
    let word = |r: usize, c: usize| {
        let i = 4 * (r * kw + c);
        u32::from_le_bytes([wp[i], wp[i + 1], wp[i + 2], wp[i + 3]])
    };
    // Stored q + 8, packed along K: the signed nibble of q is stored ^ 8.
    let packed = if k % 8 == 0 {
        ct_blocks(out, wp, kw, n)
    } else {
        pack_rows(out, k, n, |r, c| (((word(c, r / 8) >> (4 * (r % 8))) & 0xF) as u8) ^ 8)
    };
    let offset = if plan.has_offset {
        let zp_t = src.require(&format!("{p}.weight_zero_point"), &[Dtype::I32, Dtype::I8], &[None, Some(groups)])?;
        let zb = src.bytes(zp_t);
        let mut off = vec![0f32; groups * n];
        if zp_t.dtype == Dtype::I8 {
            // Unpacked and signed (compressed-tensors before 0.9.4).
            for col in 0..n {
                for g in 0..groups {
                    off[g * n + col] = -(int_at(Dtype::I8, zb, col * groups + g) as f32);
                }
            }
        } else {
            // Packed along N: word [c, g] holds columns 8c..8c+7 of group g, stored zp + 8.
            for c in 0..n.div_ceil(8) {
                for g in 0..groups {
                    let w = int_at(zp_t.dtype, zb, c * groups + g) as u32;
                    for j in 0..8 {
                        let col = 8 * c + j;
                        if col < n {
                            let zp = ((w >> (4 * j)) & 0xF) as i32 - 8;
                            off[g * n + col] = -(zp as f32);
                        }
                    }
                }
            }
        }
        Some(off)
    } else {
        None
    };
    Ok(Int4Linear { plan: plan.clone(), packed, scale: floats(src, scale_t, true), offset, act_perm: None })
}

// ---------------------------------------------------------------------------------------------
// ModelSlim W4A16
// ---------------------------------------------------------------------------------------------

/// How a ModelSlim weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MsLayout {
    /// ascendV1 per group: int8 `[N/2, K]`, two output rows per byte (low nibble = even row).
    PairedRows,
    /// ascendV1 per channel (or per group with a flat `[N*K/G, 1]` scale): int8 `[N, K/2]`,
    /// two input columns per byte (low nibble = even column).
    PairedCols,
    /// The older format (no `version`): int8 `[N, K]`, one signed value per byte.
    Plain,
}

/// A ModelSlim linear's layout, K, N, group size and its scale's `[N, groups]` reading.
fn ms_layout(src: &Source, prefix: &str, version: &str, desc_group: usize) -> Result<(MsLayout, usize, usize, usize)> {
    let scale = src.require(&format!("{prefix}.weight_scale"), FLOATS, &[None, None])?;
    let weight = src.require(&format!("{prefix}.weight"), &[Dtype::I8], &[None, None])?;
    let (a, b) = (weight.shape[0], weight.shape[1]);
    let (r, c) = (scale.shape[0], scale.shape[1]);
    let packed = !(version.is_empty() || version == "0" || version == "0.0.0");
    let bad = |why: &str| CheckpointError::Tensor {
        name: format!("{prefix}.weight"),
        problem: format!("shape {:?} with weight_scale {:?} ({why})", weight.shape, scale.shape),
        expected: "ascendV1: [N, K/2] with a [N, 1] or [N*K/G, 1] scale, or [N/2, K] with a [N, K/G] scale; \
                   older format: [N, K] with a [N, K/G] or [N, 1] scale"
            .into(),
    };
    let (layout, k, n, groups) = if !packed {
        if r != a {
            return Err(bad("rows differ"));
        }
        (MsLayout::Plain, b, a, c)
    } else if c == 1 && desc_group > 0 {
        let (n, k) = (a, 2 * b);
        if k % desc_group != 0 || r != n * (k / desc_group) {
            return Err(bad("a flat per-group scale needs N * K / group_size rows"));
        }
        (MsLayout::PairedCols, k, n, k / desc_group)
    } else if c == 1 {
        if r != a {
            return Err(bad("rows differ"));
        }
        (MsLayout::PairedCols, 2 * b, a, 1)
    } else {
        if r != 2 * a {
            return Err(bad("a per-group weight pairs output rows"));
        }
        (MsLayout::PairedRows, b, r, c)
    };
    if groups == 0 || k % groups != 0 {
        return Err(layer_error(prefix, format!("K = {k} does not split into {groups} groups"), "whole groups"));
    }
    let group_size = if groups == 1 { 0 } else { k / groups };
    Ok((layout, k, n, group_size))
}

/// A `[N, groups]` float tensor (stored `[N, groups]` or flat `[N*groups, 1]`) as `[groups, N]`.
fn ms_floats(src: &Source, t: &TensorRef, n: usize, groups: usize) -> Vec<f32> {
    let bytes = src.bytes(t);
    let mut out = vec![0f32; n * groups];
    for r in 0..n {
        for g in 0..groups {
            out[g * n + r] = float_at(t.dtype, bytes, r * groups + g);
        }
    }
    out
}

fn ms_plan(src: &Source, prefix: &str, version: &str, desc_group: usize) -> Result<LinearPlan> {
    let (_, k, n, group_size) = ms_layout(src, prefix, version, desc_group)?;
    check_linear(prefix, k, n, group_size)?;
    let scale = src.require(&format!("{prefix}.weight_scale"), FLOATS, &[None, None])?.shape.clone();
    let off = format!("{prefix}.weight_offset");
    let has_offset = src.get(&off).is_some();
    let mut consumes = vec![format!("{prefix}.weight"), format!("{prefix}.weight_scale")];
    if has_offset {
        src.require(&off, FLOATS, &[Some(scale[0]), Some(scale[1])])?;
        consumes.push(off);
    }
    Ok(LinearPlan {
        prefix: prefix.to_string(),
        k,
        n,
        group_size,
        has_offset,
        has_act_perm: false,
        bias: bias_of(src, prefix),
        consumes,
    })
}

fn ms_convert(src: &Source, plan: &LinearPlan, version: &str, desc_group: usize, out: Vec<u8>) -> Result<Int4Linear> {
    let p = &plan.prefix;
    let (layout, k, n, _) = ms_layout(src, p, version, desc_group)?;
    let groups = plan.groups();
    let weight = src.require(&format!("{p}.weight"), &[Dtype::I8], &[None, None])?;
    let scale = src.require(&format!("{p}.weight_scale"), FLOATS, &[None, None])?;
    let w = src.bytes(weight);
    let packed = match layout {
        // Transposed, these bytes are INT4Pack's: byte (k, j) = rows 2j (low) and 2j+1 (high).
        MsLayout::PairedRows => {
            let mut out = out;
            out.par_chunks_mut(n / 2).enumerate().for_each(|(r, row)| {
                for (j, b) in row.iter_mut().enumerate() {
                    *b = w[j * k + r];
                }
            });
            out
        }
        MsLayout::PairedCols => pack_rows(out, k, n, |r, c| {
            let b = w[c * (k / 2) + r / 2];
            if r % 2 == 0 { b & 0xF } else { b >> 4 }
        }),
        MsLayout::Plain => {
            if let Some((i, v)) = w.iter().enumerate().find(|(_, v)| !(-8..=7).contains(&(**v as i8))) {
                return Err(CheckpointError::Tensor {
                    name: format!("{p}.weight"),
                    problem: format!("element {i} is {}", *v as i8),
                    expected: "int4 values in [-8, 7]".into(),
                });
            }
            pack_rows(out, k, n, |r, c| (w[c * k + r] as u8) & 0xF)
        }
    };
    let offset = if plan.has_offset {
        let off = src.require(&format!("{p}.weight_offset"), FLOATS, &[None, None])?;
        Some(ms_floats(src, off, n, groups).into_iter().map(|v| -v).collect())
    } else {
        None
    };
    Ok(Int4Linear { plan: plan.clone(), packed, scale: ms_floats(src, scale, n, groups), offset, act_perm: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_swap_transpose_is_the_plain_transpose() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..1000 {
            let w: [u32; 8] = std::array::from_fn(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u32
            });
            let plain: [u32; 8] =
                std::array::from_fn(|j| (0..8).fold(0u32, |o, i| o | (((w[i] >> (4 * j)) & 0xF) << (4 * i))));
            assert_eq!(transpose_nibbles(w), plain, "{w:08x?}");
        }
    }

    #[test]
    fn awq_interleave_is_undone() {
        // Nibble i holds column AWQ_ORDER[i]: columns 0..7 as values 0..7.
        let word = AWQ_ORDER.iter().enumerate().fold(0u32, |w, (i, col)| w | ((*col as u32) << (4 * i)));
        assert_eq!(awq_word(word), 0x7654_3210);
    }
}
