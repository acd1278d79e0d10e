//! The converted checkpoint, streamed as safetensors: the header first (every shape is known
//! from the plan), then each tensor's bytes, produced one linear at a time, so that memory
//! holds one converted linear (or one stacked MoE projection) at most.

use std::collections::BTreeMap;
use std::io::Write;

use safetensors::tensor::Dtype;

use super::{ActDtype, Checkpoint, CheckpointError, Int4Linear, LinearPlan, Result, TensorRef};
use crate::kernels::{self, GroupOffset};
use crate::ops::int4pack::{PackLayout, PackOptions, WeightKind};
use crate::soc::{ChipFamily, Container};
use crate::tensor::Format;

/// How `P.weight` is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    /// `[K, N/8]` int32 (INT4Pack's ND output).
    #[default]
    Nd,
    /// The FRACTAL_NZ storage INT4Pack writes on Atlas A2/A3 (C0 = 32 bytes):
    /// `[ceil(N/64), ceil(K/16), 16, 8]` int32 (`[E, …]` when stacked).
    Nz,
}

/// Where a conversion is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of checkpoint data done (read and converted or copied).
    pub done: u64,
    /// Bytes of checkpoint data in all.
    pub total: u64,
    /// The tensor (or layer) just written.
    pub item: String,
}

/// What a conversion wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Quantized linears converted.
    pub linears: usize,
    /// MoE projections written stacked.
    pub stacked: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Bytes of the output file.
    pub bytes_written: u64,
}

/// One tensor of the output: its header entry.
pub(super) struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub len: usize,
}

/// What produces a run of output tensors.
enum Item<'c> {
    Copy(&'c TensorRef),
    Linear(&'c LinearPlan),
    Stacked { name: String, experts: Vec<&'c LinearPlan> },
}

fn act_dtype(act: ActDtype) -> Dtype {
    match act {
        ActDtype::F16 => Dtype::F16,
        ActDtype::Bf16 => Dtype::BF16,
    }
}

fn encode(values: &[f32], act: ActDtype) -> Vec<u8> {
    match act {
        ActDtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        ActDtype::Bf16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
    }
}

/// The weight's layout for `shape` (`[K, N]` or `[E, K, N]`).
fn weight_layout(prefix: &str, shape: &[usize], layout: Layout) -> Result<PackLayout> {
    let format = match layout {
        Layout::Nd => Format::Nd,
        Layout::Nz => Format::FractalNz,
    };
    let dims: Vec<i64> = shape.iter().map(|d| *d as i64).collect();
    let options = PackOptions { container: Container::ThirtyTwoBit, format };
    PackLayout::new(&dims, WeightKind::Int4, options, ChipFamily::A2A3).map_err(|e| CheckpointError::Layer {
        prefix: prefix.to_string(),
        problem: format!("cannot lay out the weight {shape:?} as {layout:?}"),
        expected: e.to_string(),
    })
}

/// The header entries of one linear (or stacked projection) named `name` over `experts`
/// linears (empty for a plain linear).
fn entries(
    name: &str,
    plan: &LinearPlan,
    stacked: Option<usize>,
    layout: Layout,
    act: ActDtype,
    src: &super::Source,
) -> Result<Vec<Entry>> {
    let lead: Vec<usize> = stacked.into_iter().collect();
    let e = stacked.unwrap_or(1);
    let mut shape = lead.clone();
    shape.extend([plan.k, plan.n]);
    let wl = weight_layout(name, &shape, layout)?;
    let mut out = vec![Entry {
        name: format!("{name}.weight"),
        dtype: Dtype::I32,
        shape: wl.desc.storage.iter().map(|d| *d as usize).collect(),
        len: wl.bytes,
    }];
    let scale_shape: Vec<usize> = if plan.group_size == 0 {
        lead.iter().copied().chain([plan.n]).collect()
    } else {
        lead.iter().copied().chain([plan.groups(), plan.n]).collect()
    };
    let scale_len = e * plan.groups() * plan.n * 2;
    let ad = act_dtype(act);
    out.push(Entry { name: format!("{name}.antiquant_scale"), dtype: ad, shape: scale_shape.clone(), len: scale_len });
    if plan.has_offset {
        out.push(Entry { name: format!("{name}.antiquant_offset"), dtype: ad, shape: scale_shape, len: scale_len });
    }
    if plan.has_act_perm {
        out.push(Entry {
            name: format!("{name}.act_perm"),
            dtype: Dtype::I32,
            shape: lead.iter().copied().chain([plan.k]).collect(),
            len: e * plan.k * 4,
        });
    }
    if let Some(b) = plan.bias.as_ref().and_then(|b| src.get(b)) {
        let mut shape = lead;
        shape.extend(&b.shape);
        out.push(Entry { name: format!("{name}.bias"), dtype: b.dtype, shape, len: e * src.bytes(b).len() });
    }
    Ok(out)
}

/// `model.layers.0.mlp.experts.3.gate_proj` → (`model.layers.0.mlp.experts.gate_proj`, 3).
fn expert_of(prefix: &str) -> Option<(String, usize)> {
    let at = prefix.find(".experts.")?;
    let rest = &prefix[at + ".experts.".len()..];
    let (index, tail) = rest.split_once('.')?;
    let e: usize = index.parse().ok()?;
    Some((format!("{}.experts.{tail}", &prefix[..at]), e))
}

/// Linears written one by one, and MoE projections by stacked name.
type Grouped<'c> = (Vec<&'c LinearPlan>, BTreeMap<String, Vec<&'c LinearPlan>>);

/// Groups the linears of MoE blocks; checks that each group can be stacked.
fn stacks(linears: &[LinearPlan]) -> Result<Grouped<'_>> {
    let mut groups: BTreeMap<String, BTreeMap<usize, &LinearPlan>> = BTreeMap::new();
    let mut single = Vec::new();
    for plan in linears {
        match expert_of(&plan.prefix) {
            Some((name, e)) => {
                groups.entry(name).or_default().insert(e, plan);
            }
            None => single.push(plan),
        }
    }
    let mut out = BTreeMap::new();
    for (name, experts) in groups {
        let list: Vec<&LinearPlan> = experts.values().copied().collect();
        let first = list[0];
        let contiguous = experts.keys().copied().eq(0..experts.len());
        let alike = list.iter().all(|p| {
            (p.k, p.n, p.group_size, p.has_offset, p.bias.is_some())
                == (first.k, first.n, first.group_size, first.has_offset, first.bias.is_some())
        });
        if !contiguous || !alike || list.iter().any(|p| p.has_act_perm) {
            return Err(CheckpointError::Layer {
                prefix: name,
                problem: "its experts differ (indices, shapes, group size, offset, bias) or use act-order".into(),
                expected: "experts 0..E-1 of one shape and quantization, without act-order, to stack them".into(),
            });
        }
        out.insert(name, list);
    }
    Ok((single, out))
}

/// Writes the safetensors header (8-byte length, JSON padded to 8 bytes).
pub(super) fn write_header(
    out: &mut dyn Write,
    entries: &[Entry],
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap_or_default());
    let mut offset = 0usize;
    for e in entries {
        let mut info = serde_json::Map::new();
        info.insert("dtype".into(), format!("{:?}", e.dtype).into());
        info.insert("shape".into(), e.shape.clone().into());
        info.insert("data_offsets".into(), vec![offset, offset + e.len].into());
        header.insert(e.name.clone(), info.into());
        offset += e.len;
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    Ok(8 + json.len() as u64)
}

/// The bytes of a linear's parts, in `entries` order.
fn linear_parts(
    mut linears: Vec<Int4Linear>,
    stacked: bool,
    layout: Layout,
    act: ActDtype,
    src: &super::Source,
    name: &str,
) -> Result<Vec<Vec<u8>>> {
    let first = linears[0].plan.clone();
    let first = &first;
    let mut shape: Vec<usize> = if stacked { vec![linears.len()] } else { Vec::new() };
    shape.extend([first.k, first.n]);
    let wl = weight_layout(name, &shape, layout)?;
    // One linear: its packed bytes as they are; experts: one after the other.
    let nd: Vec<u8> = if linears.len() == 1 {
        std::mem::take(&mut linears[0].packed)
    } else {
        let mut all = Vec::with_capacity(linears.iter().map(|l| l.packed.len()).sum());
        for l in &mut linears {
            all.append(&mut l.packed);
        }
        all
    };
    let weight = match wl.nz {
        None => nd,
        Some(geom) => {
            let mut out = vec![0u8; wl.bytes];
            kernels::nd_to_nz(&nd, geom, GroupOffset::Padded, &mut out).map_err(|e| CheckpointError::Layer {
                prefix: name.to_string(),
                problem: format!("FRACTAL_NZ layout failed: {e}"),
                expected: "a weight INT4Pack can lay out".into(),
            })?;
            out
        }
    };
    let mut parts = vec![weight];
    let scale: Vec<f32> = linears.iter().flat_map(|l| l.scale.iter().copied()).collect();
    parts.push(encode(&scale, act));
    if first.has_offset {
        let offset: Vec<f32> = linears.iter().flat_map(|l| l.offset.iter().flatten().copied()).collect();
        parts.push(encode(&offset, act));
    }
    if first.has_act_perm {
        let perm: Vec<u8> = linears
            .iter()
            .flat_map(|l| match &l.act_perm {
                Some(p) => p.clone(),
                None => (0..l.plan.k as i32).collect(),
            })
            .flat_map(i32::to_le_bytes)
            .collect();
        parts.push(perm);
    }
    if first.bias.is_some() {
        let mut bias = Vec::new();
        for l in linears {
            if let Some(b) = l.plan.bias.as_ref().and_then(|b| src.get(b)) {
                bias.extend_from_slice(src.bytes(b));
                src.release(b);
            }
        }
        parts.push(bias);
    }
    Ok(parts)
}

pub(super) fn write(
    ck: &Checkpoint,
    out: &mut dyn Write,
    layout: Layout,
    act: ActDtype,
    stack_experts: bool,
    progress: &mut dyn FnMut(super::Progress),
) -> Result<ConvertStats> {
    let src = ck.source();
    let consumed: std::collections::HashSet<&str> =
        ck.linears().iter().flat_map(|p| p.consumes.iter().chain(p.bias.iter()).map(String::as_str)).collect();
    // Plan the items and the header.
    let (single, stacked) =
        if stack_experts { stacks(ck.linears())? } else { (ck.linears().iter().collect(), BTreeMap::new()) };
    let mut items: Vec<(Item<'_>, Vec<Entry>)> = Vec::new();
    for plan in single {
        items.push((Item::Linear(plan), entries(&plan.prefix, plan, None, layout, act, src)?));
    }
    for (name, experts) in stacked {
        let e = entries(&name, experts[0], Some(experts.len()), layout, act, src)?;
        items.push((Item::Stacked { name, experts }, e));
    }
    for t in src.tensors().filter(|t| !consumed.contains(t.name.as_str())) {
        let entry = Entry { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), len: src.bytes(t).len() };
        items.push((Item::Copy(t), vec![entry]));
    }
    let all: Vec<&Entry> = items.iter().flat_map(|(_, e)| e.iter()).collect();
    let mut names = std::collections::HashSet::new();
    if let Some(dup) = all.iter().find(|e| !names.insert(e.name.as_str())) {
        return Err(CheckpointError::Tensor {
            name: dup.name.clone(),
            problem: "the converted checkpoint would hold two tensors of this name".into(),
            expected: "converted names (P.weight, P.antiquant_scale, ...) not already used by other tensors".into(),
        });
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("aclnn.source_format".to_string(), ck.format().name().to_string());
    metadata.insert("aclnn.layout".to_string(), format!("{layout:?}").to_lowercase());
    metadata.insert("aclnn.act_dtype".to_string(), format!("{act:?}").to_lowercase());
    let flat: Vec<Entry> = items
        .iter()
        .flat_map(|(_, es)| {
            es.iter().map(|e| Entry { name: e.name.clone(), dtype: e.dtype, shape: e.shape.clone(), len: e.len })
        })
        .collect();
    let io = |e| CheckpointError::io(std::path::Path::new("<output>"), e);
    let mut written = write_header(out, &flat, &metadata).map_err(io)?;
    let total = src.data_bytes();
    let mut done = 0u64;
    let mut stats = ConvertStats::default();
    // The packed weight of the previous linear: its memory holds the next one.
    let mut scratch: Vec<u8> = Vec::new();
    for (item, es) in &items {
        let (parts, label, read) = match item {
            Item::Copy(t) => {
                let bytes = src.bytes(t).to_vec();
                src.release(t);
                stats.copied += 1;
                let read = bytes.len() as u64;
                (vec![bytes], t.name.clone(), read)
            }
            Item::Linear(plan) => {
                let converted = ck.convert_linear_reusing(plan, std::mem::take(&mut scratch))?;
                stats.linears += 1;
                let read = plan.consumes.iter().filter_map(|n| src.get(n)).map(|t| src.bytes(t).len() as u64).sum();
                (linear_parts(vec![converted], false, layout, act, src, &plan.prefix)?, plan.prefix.clone(), read)
            }
            Item::Stacked { name, experts } => {
                let converted: Vec<Int4Linear> = experts.iter().map(|p| ck.convert_linear(p)).collect::<Result<_>>()?;
                stats.linears += experts.len();
                stats.stacked += 1;
                let read = experts
                    .iter()
                    .flat_map(|p| p.consumes.iter())
                    .filter_map(|n| src.get(n))
                    .map(|t| src.bytes(t).len() as u64)
                    .sum();
                (linear_parts(converted, true, layout, act, src, name)?, name.clone(), read)
            }
        };
        for (part, entry) in parts.iter().zip(es.iter()) {
            if part.len() != entry.len {
                return Err(CheckpointError::Tensor {
                    name: entry.name.clone(),
                    problem: format!("{} bytes were produced", part.len()),
                    expected: format!("{} bytes, as planned", entry.len),
                });
            }
            out.write_all(part).map_err(io)?;
            written += part.len() as u64;
        }
        if let Item::Linear(_) = item
            && let Some(weight) = parts.into_iter().next()
        {
            scratch = weight;
        }
        done += read;
        progress(super::Progress { done: done.min(total), total, item: label });
    }
    out.flush().map_err(io)?;
    stats.bytes_written = written;
    Ok(stats)
}
