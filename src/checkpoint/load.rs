//! A converted checkpoint straight onto one or more devices: each linear is converted on the host
//! into a reused buffer, copied into one of two pinned staging buffers of its device, and
//! uploaded asynchronously, so that its upload runs while the next linear is converted. The
//! staging buffers' marks order everything (a staging buffer is refilled only after its previous
//! upload has run); the returned device buffers carry the marks of their uploads, so any later
//! use on any stream of the device is ordered after them without a host synchronize.

use std::sync::Arc;

use super::output::{Layout, Progress};
use super::{ActDtype, Checkpoint, CheckpointError, LinearPlan, Result};
use crate::kernels::{self, GroupOffset};
use crate::memory::{DeviceBuffer, PinnedHostBuffer};
use crate::ops::int4pack::{PackLayout, PackOptions, WeightKind};
use crate::soc::{ChipFamily, Container};
use crate::stream::Stream;
use crate::tensor::{DType, Format, Tensor, TensorDesc};

/// One quantized linear in device memory, ready for `WeightQuantMatmul`.
#[derive(Debug)]
pub struct DeviceLinear {
    /// What it is (prefix, K, N, group size, ...).
    pub plan: LinearPlan,
    /// The stream (and so the device) it was uploaded on.
    pub stream: Arc<Stream>,
    /// The packed weight: `[K, N/8]` INT32 ND, or the A2/A3 FRACTAL_NZ storage.
    pub weight: DeviceBuffer<u8>,
    /// Its descriptor (INT32 `(K, N/8)`; NZ storage when NZ).
    pub weight_desc: TensorDesc,
    /// `[groups, N]` (or `[N]`) scales in the activation dtype's bits.
    pub scale: DeviceBuffer<u16>,
    /// Offsets like the scales, when the source has zero points.
    pub offset: Option<DeviceBuffer<u16>>,
    /// The activation dtype of scale and offset.
    pub act: ActDtype,
    /// Act-order: row `k` of the weight is input feature `act_perm[k]` (host side: permute x).
    pub act_perm: Option<Vec<i32>>,
}

impl DeviceLinear {
    /// The weight as a read-only tensor.
    pub fn weight_tensor(&self) -> crate::Result<Tensor<'_>> {
        Tensor::new(&self.weight, self.weight_desc.clone())
    }

    fn scale_desc(&self) -> TensorDesc {
        let dtype = match self.act {
            ActDtype::F16 => DType::Float16,
            ActDtype::Bf16 => DType::BFloat16,
        };
        let n = self.plan.n as i64;
        if self.plan.group_size == 0 {
            TensorDesc::nd(dtype, &[n])
        } else {
            TensorDesc::nd(dtype, &[self.plan.groups() as i64, n])
        }
    }

    /// The antiquant scale as a tensor.
    pub fn scale_tensor(&self) -> crate::Result<Tensor<'_>> {
        Tensor::new(&self.scale, self.scale_desc())
    }

    /// The antiquant offset as a tensor, when there is one.
    pub fn offset_tensor(&self) -> crate::Result<Option<Tensor<'_>>> {
        self.offset.as_ref().map(|o| Tensor::new(o, self.scale_desc())).transpose()
    }
}

fn device_error(prefix: &str, e: crate::Error) -> CheckpointError {
    CheckpointError::Layer {
        prefix: prefix.to_string(),
        problem: format!("the upload failed: {e}"),
        expected: "a device with room for the layer".into(),
    }
}

fn encode(values: &[f32], act: ActDtype) -> Vec<u16> {
    match act {
        ActDtype::F16 => values.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect(),
        ActDtype::Bf16 => values.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect(),
    }
}

/// Two pinned staging buffers of one device, used in turn.
struct Staging {
    slots: [Option<PinnedHostBuffer<u8>>; 2],
    next: usize,
}

impl Checkpoint {
    /// Converts every quantized linear and uploads it, round-robin over `streams` (one per
    /// device, or several per device). Each linear's upload overlaps the conversion of the next.
    pub fn load(
        &self,
        streams: &[Arc<Stream>],
        layout: Layout,
        act: ActDtype,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Vec<DeviceLinear>> {
        if streams.is_empty() {
            return Err(CheckpointError::Missing {
                what: "a stream to load onto".into(),
                expected: "one or more".into(),
            });
        }
        let largest = self.linears().iter().map(|p| p.k * p.n / 2).max().unwrap_or(0);
        // Staging per stream (NZ storage is at most a few tiles larger than ND: room for both).
        let mut staging: Vec<Staging> = streams.iter().map(|_| Staging { slots: [None, None], next: 0 }).collect();
        let total = self.source().data_bytes();
        let mut done = 0u64;
        let mut scratch = Vec::new();
        let mut out = Vec::with_capacity(self.linears().len());
        for (i, plan) in self.linears().iter().enumerate() {
            let which = i % streams.len();
            let stream = &streams[which];
            let converted = self.convert_linear_reusing(plan, std::mem::take(&mut scratch))?;
            let dims = [plan.k as i64, plan.n as i64];
            let format = match layout {
                Layout::Nd => Format::Nd,
                Layout::Nz => Format::FractalNz,
            };
            let options = PackOptions { container: Container::ThirtyTwoBit, format };
            let pack = PackLayout::new(&dims, WeightKind::Int4, options, ChipFamily::A2A3)
                .map_err(|e| device_error(&plan.prefix, e))?;
            let bytes: Vec<u8> = match pack.nz {
                None => converted.packed,
                Some(geom) => {
                    let mut nz = vec![0u8; pack.bytes];
                    kernels::nd_to_nz(&converted.packed, geom, GroupOffset::Padded, &mut nz).map_err(|e| {
                        CheckpointError::Layer {
                            prefix: plan.prefix.clone(),
                            problem: format!("FRACTAL_NZ layout failed: {e}"),
                            expected: "a weight INT4Pack can lay out".into(),
                        }
                    })?;
                    nz
                }
            };
            let mut upload = || -> crate::Result<DeviceLinear> {
                let stage = &mut staging[which];
                let slot = stage.next;
                stage.next = 1 - slot;
                if stage.slots[slot].is_none() {
                    stage.slots[slot] = Some(PinnedHostBuffer::zeroed(stream.device(), largest.max(pack.bytes))?);
                }
                let pinned = stage.slots[slot].as_mut().expect("allocated above");
                if pinned.len() < bytes.len() {
                    *pinned = PinnedHostBuffer::zeroed(stream.device(), bytes.len())?;
                }
                // Waits (on the host) only for this slot's previous upload, two layers ago.
                pinned.as_mut_slice()?[..bytes.len()].copy_from_slice(&bytes);
                let mut weight = DeviceBuffer::<u8>::alloc(stream, bytes.len())?;
                weight.copy_from_pinned_async_at(pinned, 0, stream)?;
                let scale = DeviceBuffer::from_host(stream, &encode(&converted.scale, act))?;
                let offset =
                    converted.offset.as_ref().map(|o| DeviceBuffer::from_host(stream, &encode(o, act))).transpose()?;
                Ok(DeviceLinear {
                    plan: plan.clone(),
                    stream: stream.clone(),
                    weight,
                    weight_desc: pack.desc.clone(),
                    scale,
                    offset,
                    act,
                    act_perm: converted.act_perm.clone(),
                })
            };
            out.push(upload().map_err(|e| device_error(&plan.prefix, e))?);
            scratch = bytes;
            done += plan
                .consumes
                .iter()
                .filter_map(|n| self.source().get(n))
                .map(|t| self.source().bytes(t).len() as u64)
                .sum::<u64>();
            progress(Progress { done: done.min(total), total, item: plan.prefix.clone() });
        }
        // The staging buffers drop here: each waits for its last upload (their only host waits).
        Ok(out)
    }
}
