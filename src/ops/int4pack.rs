//! `aclnnConvertWeightToINT4Pack` (the operator behind `torch_npu.npu_convert_weight_to_int4pack`),
//! a host fast path that produces the same bytes, and unpacking.
//!
//! The operator does all its work in phase 1, synchronously, on the host: it copies the whole
//! weight to the host, packs two 4-bit codes per byte (lower index in the low nibble), optionally
//! lays the bytes out as FRACTAL_NZ, and copies them back. It ignores streams and the view offset,
//! masks out-of-range values instead of rejecting them, and corrupts 3D FRACTAL_NZ weights whose
//! rows are not tile-aligned. This module guards against all of that (see `docs/int4pack.md`).

use std::sync::Arc;

use aclnn_sys as sys;

use crate::error::{Error, Result};
use crate::kernels::{self, GroupOffset, NzGeometry, PackError};
use crate::kit::Call;
use crate::memory::{DeviceBuffer, PinnedHostBuffer};
use crate::plan::Plan;
use crate::soc::{ChipFamily, Container};
use crate::stream::Stream;
use crate::tensor::{DType, Format, Tensor, TensorDesc, TensorMut, contiguous_strides};
use crate::workspace::Workspace;

/// What the source weights are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightKind {
    /// `int32` values in [-8, 7], packed as signed int4.
    Int4,
    /// `float32` values carrying FP4 E2M1 numbers, packed as FP4 codes.
    Fp4,
}

/// How to pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PackOptions {
    /// Eight values per 32-bit element (`INT32` / `FLOAT` output, the torch_npu default) or one
    /// value per 4-bit element (`INT4` / `FLOAT4_E2M1` output).
    pub container: Container,
    /// [`Format::Nd`] or [`Format::FractalNz`].
    pub format: Format,
}

impl Default for PackOptions {
    /// INT32 containers in ND, as `torch_npu.npu_convert_weight_to_int4pack(w)`.
    fn default() -> Self {
        PackOptions { container: Container::ThirtyTwoBit, format: Format::Nd }
    }
}

/// The full description of a packed weight: tensor descriptor, byte size and NZ geometry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackLayout {
    /// What was packed.
    pub kind: WeightKind,
    /// The options used.
    pub options: PackOptions,
    /// The source weight shape: `(k, n)`, `(n, k)` or `(groups, k, n)`.
    pub weight_shape: Vec<i64>,
    /// Descriptor of the packed tensor (view `(.., k, n)` or `(.., k, n/8)`; NZ storage shape).
    pub desc: TensorDesc,
    /// Bytes of packed data (what the operator writes).
    pub bytes: usize,
    /// Geometry of the FRACTAL_NZ layout, when NZ.
    pub nz: Option<NzGeometry>,
}

impl PackLayout {
    /// Plans the packed tensor for a weight of `weight_shape` on a chip of `family`, refusing
    /// every shape the operator rejects or corrupts.
    pub fn new(weight_shape: &[i64], kind: WeightKind, options: PackOptions, family: ChipFamily) -> Result<PackLayout> {
        let rank = weight_shape.len();
        if !(2..=3).contains(&rank) {
            return Err(Error::invalid(
                "weight shape",
                format!("{weight_shape:?} has {rank} dims"),
                "2 dims (k, n) or (n, k), or 3 dims (groups, k, n)",
            ));
        }
        if let Some(d) = weight_shape.iter().find(|d| **d <= 0) {
            return Err(Error::invalid("weight shape", format!("{weight_shape:?} has the dim {d}"), "every dim >= 1"));
        }
        let elements = weight_shape
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(*d as usize))
            .filter(|e| e.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize))
            .ok_or_else(|| {
                Error::invalid("weight shape", format!("{weight_shape:?} is too large"), "fewer than 2^61 elements")
            })?;
        let (k, n) = (weight_shape[rank - 2], weight_shape[rank - 1]);
        let groups = if rank == 3 { weight_shape[0] } else { 1 };
        let per_element = match options.container {
            Container::ThirtyTwoBit => 8,
            Container::FourBit => 2,
        };
        if n % per_element != 0 {
            return Err(Error::invalid(
                "weight shape",
                format!("the last dim is {n}"),
                format!(
                    "a last dim that is a multiple of {per_element} for {:?} output",
                    packed_dtype(kind, options.container)
                ),
            ));
        }
        let dtype = packed_dtype(kind, options.container);
        let pn = match options.container {
            Container::ThirtyTwoBit => n / 8,
            Container::FourBit => n,
        };
        let mut view = weight_shape.to_vec();
        view[rank - 1] = pn;
        let (desc, nz) = match options.format {
            Format::Nd => (TensorDesc::nd(dtype, &view), None),
            Format::FractalNz => {
                let tile = family.nz_storage_shape(options.container, k, pn);
                let geom = NzGeometry {
                    groups: groups as usize,
                    rows: k as usize,
                    row_bytes: (n / 2) as usize,
                    c0: family.nz_c0_bytes(tile[3]),
                };
                if rank == 3 && !geom.is_aligned() {
                    return Err(unaligned_3d_nz(weight_shape, geom));
                }
                let mut storage = Vec::with_capacity(5);
                if rank == 3 {
                    storage.push(groups);
                }
                storage.extend_from_slice(&tile);
                (TensorDesc::nz(dtype, &view, &storage), Some(geom))
            }
            other => {
                return Err(Error::invalid("pack format", format!("{other:?}"), "Format::Nd or Format::FractalNz"));
            }
        };
        let bytes = match nz {
            Some(g) => g.total_bytes(),
            None => elements / 2,
        };
        Ok(PackLayout { kind, options, weight_shape: weight_shape.to_vec(), desc, bytes, nz })
    }
}

/// The refusal of 3D FRACTAL_NZ shapes whose groups CANN's operator would overlap.
fn unaligned_3d_nz(weight_shape: &[i64], geom: NzGeometry) -> Error {
    Error::invalid(
        "weight shape",
        format!(
            "3D weight {weight_shape:?} in FRACTAL_NZ has k = {} and {} bytes per row; CANN's operator offsets \
             each group by its unpadded size, so groups overlap and the packed data is corrupted",
            geom.rows, geom.row_bytes
        ),
        format!(
            "k a multiple of 16 and n a multiple of {} for 3D NZ; otherwise pack in ND, or pack each group as \
             its own 2D weight",
            geom.c0 * 2
        ),
    )
}

fn packed_dtype(kind: WeightKind, container: Container) -> DType {
    match (kind, container) {
        (WeightKind::Int4, Container::ThirtyTwoBit) => DType::Int32,
        (WeightKind::Int4, Container::FourBit) => DType::Int4,
        (WeightKind::Fp4, Container::ThirtyTwoBit) => DType::Float,
        (WeightKind::Fp4, Container::FourBit) => DType::Float4E2M1,
    }
}

/// A packed weight in device memory, ready for `aclnnWeightQuantBatchMatmulV2`.
#[derive(Debug)]
pub struct PackedWeight {
    buffer: DeviceBuffer<u8>,
    layout: PackLayout,
}

impl PackedWeight {
    /// How the weight is packed.
    pub fn layout(&self) -> &PackLayout {
        &self.layout
    }

    /// The tensor description of the packed data.
    pub fn desc(&self) -> &TensorDesc {
        &self.layout.desc
    }

    /// The device memory holding the packed bytes.
    pub fn buffer(&self) -> &DeviceBuffer<u8> {
        &self.buffer
    }

    /// A read-only tensor over the packed data (e.g. the matmul's `weight` argument).
    pub fn tensor(&self) -> Result<Tensor<'_>> {
        Tensor::new(&self.buffer, self.layout.desc.clone())
    }

    /// A read-only `(k, n)` view of a weight packed as `(n, k)`, the transposed form
    /// `aclnnWeightQuantBatchMatmulV2` takes: the view's last two dims swapped, strides
    /// `(1, packed k)`, over the same storage. 2D weights only.
    pub fn transposed_tensor(&self) -> Result<Tensor<'_>> {
        let d = &self.layout.desc;
        if d.view.len() != 2 {
            return Err(Error::invalid("packed weight", format!("view {:?}", d.view), "a 2D packed weight"));
        }
        let view = [d.view[1], d.view[0]];
        let desc = TensorDesc {
            dtype: d.dtype,
            format: d.format,
            view: view.to_vec(),
            strides: vec![1, view[0]],
            offset: 0,
            storage: d.storage.clone(),
        };
        Tensor::new(&self.buffer, desc)
    }

    /// The packed bytes, as the device holds them.
    pub fn to_host_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = self.buffer.to_vec()?;
        bytes.truncate(self.layout.bytes);
        Ok(bytes)
    }

    /// The packed bytes back in ND order (undoing FRACTAL_NZ).
    fn nd_bytes(&self) -> Result<Vec<u8>> {
        let bytes = self.to_host_bytes()?;
        let Some(geom) = self.layout.nz else { return Ok(bytes) };
        let mut nd = vec![0u8; geom.groups * geom.rows * geom.row_bytes];
        kernels::nz_to_nd(&bytes, geom, &mut nd).map_err(layout_error)?;
        Ok(nd)
    }

    /// Unpacks an int4 weight to one `i32` per value, in the source weight's shape.
    pub fn unpack_int4(&self) -> Result<Vec<i32>> {
        if self.layout.kind != WeightKind::Int4 {
            return Err(Error::invalid("packed weight", "it holds FP4 codes", "an int4 weight (use unpack_fp4)"));
        }
        let nd = self.nd_bytes()?;
        let mut out = vec![0i32; nd.len() * 2];
        kernels::unpack_int4(&nd, &mut out).map_err(layout_error)?;
        Ok(out)
    }

    /// Unpacks an FP4 weight to one `f32` per value, in the source weight's shape.
    pub fn unpack_fp4(&self) -> Result<Vec<f32>> {
        if self.layout.kind != WeightKind::Fp4 {
            return Err(Error::invalid("packed weight", "it holds int4 values", "an FP4 weight (use unpack_int4)"));
        }
        let nd = self.nd_bytes()?;
        let mut out = vec![0f32; nd.len() * 2];
        kernels::unpack_fp4(&nd, &mut out).map_err(layout_error)?;
        Ok(out)
    }

    /// Gives up the packed data's device memory.
    pub fn into_buffer(self) -> DeviceBuffer<u8> {
        self.buffer
    }
}

fn layout_error(e: kernels::LayoutError) -> Error {
    Error::invalid("packed data", e.to_string(), "data matching its layout")
}

fn chip_family(stream: &Stream) -> Result<ChipFamily> {
    Ok(ChipFamily::from_soc_name(&stream.device().soc_name()?))
}

fn weight_kind(dtype: DType) -> Result<WeightKind> {
    match dtype {
        DType::Int32 => Ok(WeightKind::Int4),
        DType::Float => Ok(WeightKind::Fp4),
        other => Err(Error::invalid(
            "weight dtype",
            format!("{other:?}"),
            "DType::Int32 (int4 values) or DType::Float (FP4 values)",
        )),
    }
}

/// Bytes the operator writes for a weight view: it sizes the write from the weight, not from
/// the packed tensor (`int4pack.md` 1.4).
fn operator_write_bytes(weight: &TensorDesc, pack: &TensorDesc, family: ChipFamily) -> Option<u64> {
    let elements = weight.view.iter().try_fold(1u64, |acc, d| acc.checked_mul(u64::try_from(*d).ok()?))?;
    if pack.format != Format::FractalNz {
        return Some(elements / 2);
    }
    let rank = weight.view.len();
    if rank < 2 {
        return None; // the operator's own rank check reports it
    }
    let (kk, n) = (weight.view[rank - 2] as u64, weight.view[rank - 1] as u64);
    let groups = if rank == 3 { weight.view[0] as u64 } else { 1 };
    let c0 = family.nz_c0_bytes(pack.storage.last().copied().unwrap_or(0)) as u64;
    let p = (n / 2).div_ceil(c0).checked_mul(kk.div_ceil(16))?.checked_mul(16 * c0)?;
    groups.checked_mul(p)
}

/// Phase 1 of the operator on tensors the caller built, as a [`Plan`].
///
/// Before calling CANN it synchronizes the streams of both tensors (the operator copies with the
/// synchronous `aclrtMemcpy` and ignores streams), and it refuses what would corrupt memory or
/// data (a read-only `pack` cannot even be passed: it takes a [`TensorMut`]): a view offset (ignored by the operator), a write larger than the
/// pack's buffer, and unaligned 3D FRACTAL_NZ. Everything else is left to the operator's own
/// checks, whose status code comes back as [`Error::Aclnn`].
pub fn convert_weight_to_int4_pack_plan<'t>(
    weight: &'t Tensor<'_>,
    pack_mut: &'t mut TensorMut<'_>,
) -> Result<Plan<'t>> {
    let pack: &Tensor<'_> = pack_mut;
    if !Arc::ptr_eq(weight.stream().device(), pack.stream().device()) {
        return Err(Error::invalid(
            "weightInt4Pack",
            "it lives on another device than weight",
            "both tensors on one device",
        ));
    }
    for (name, t) in [("weight", weight.desc()), ("weightInt4Pack", pack.desc())] {
        if t.offset != 0 {
            return Err(Error::invalid(
                name,
                format!("view offset {}: the operator ignores offsets and would use the base address", t.offset),
                "offset 0 (make a buffer per tensor instead)",
            ));
        }
    }
    let family = chip_family(weight.stream())?;
    let rank = weight.desc().view.len();
    if pack.desc().format == Format::FractalNz && rank == 3 && weight.desc().view.iter().all(|d| *d > 0) {
        // The same refusal as `PackLayout::new`, for hand-made descriptors, with the C0 the
        // operator derives from this pack's storage.
        let view = &weight.desc().view;
        let geom = NzGeometry {
            groups: view[0] as usize,
            rows: view[1] as usize,
            row_bytes: (view[2] / 2) as usize,
            c0: family.nz_c0_bytes(pack.desc().storage.last().copied().unwrap_or(0)),
        };
        if !geom.is_aligned() {
            return Err(unaligned_3d_nz(view, geom));
        }
    }
    if let Some(write) = operator_write_bytes(weight.desc(), pack.desc(), family)
        && write > pack.capacity_bytes() as u64
    {
        return Err(Error::invalid(
            "weightInt4Pack",
            format!(
                "the operator writes {write} bytes for weight {:?} but the buffer holds {}",
                weight.desc().view,
                pack.capacity_bytes()
            ),
            format!("a buffer of at least {write} bytes"),
        ));
    }
    let mut call = Call::new("aclnnConvertWeightToINT4Pack", "aclnnConvertWeightToINT4PackGetWorkspaceSize");
    // The operator copies synchronously on the host and ignores streams: phase 1 is a host read
    // of the weight and a host write of the pack, after every queued use of them has finished.
    call.phase1_on_host();
    let weight_raw = call.input("weight", weight)?;
    let pack_raw = call.output("weightInt4Pack", pack_mut)?;
    // SAFETY: the generated pointer type of the operator's phase-1 declaration.
    let phase1: sys::pfn::aclnnConvertWeightToINT4PackGetWorkspaceSize = unsafe { call.phase1()? };
    // SAFETY: both descriptors are live for 't; `pack` is writable and its buffer holds every
    // byte the operator writes (checked above); the operator never writes the out-pointers,
    // which the kit initialises to 0 and null as the official example does.
    unsafe { call.plan(|workspace_size, executor| phase1(weight_raw, pack_raw, workspace_size, executor)) }
}

/// Packs a device weight through the operator into a new device tensor.
///
/// `weight` is a contiguous ND `int32` (int4 values) or `float32` (FP4 values) tensor of shape
/// `(k, n)`, `(n, k)` or `(groups, k, n)`. The result lives on the weight's stream. Values are
/// masked to 4 bits as CANN does (the device data is not inspected); use
/// [`pack_int4_on_host`] to have them checked.
pub fn convert_weight_to_int4_pack(weight: &Tensor<'_>, options: PackOptions) -> Result<PackedWeight> {
    let desc = weight.desc();
    let kind = weight_kind(desc.dtype)?;
    if desc.format != Format::Nd {
        return Err(Error::invalid("weight format", format!("{:?}", desc.format), "Format::Nd"));
    }
    if desc.strides != contiguous_strides(&desc.view) {
        return Err(Error::invalid(
            "weight strides",
            format!("{:?} for shape {:?} is not contiguous", desc.strides, desc.view),
            "a contiguous weight (pass a transposed weight as its own (n, k) tensor)",
        ));
    }
    let stream = weight.stream().clone();
    let layout = PackLayout::new(&desc.view, kind, options, chip_family(&stream)?)?;
    let mut buffer = DeviceBuffer::<u8>::alloc(&stream, layout.bytes)?;
    {
        let mut pack = Tensor::new_mut(&mut buffer, layout.desc.clone())?;
        let plan = convert_weight_to_int4_pack_plan(weight, &mut pack)?;
        let mut workspace = Workspace::new(&stream);
        plan.launch(&stream, &mut workspace)?;
    }
    Ok(PackedWeight { buffer, layout })
}

fn pack_error(e: PackError) -> Error {
    match e {
        PackError::OutOfRange { index, value } => {
            Error::ValueOutOfRange { argument: "weights", index, value: value.to_string(), expected: "[-8, 7]" }
        }
        PackError::FloatOutOfRange { index, value } => Error::ValueOutOfRange {
            argument: "weights",
            index,
            value: value.to_string(),
            expected: "[-6.0, 6.0] (finite FP4 E2M1 values)",
        },
        PackError::Layout(l) => layout_error(l),
    }
}

fn check_len(len: usize, layout: &PackLayout) -> Result<()> {
    let expected = layout.weight_shape.iter().product::<i64>() as usize;
    if len == expected {
        Ok(())
    } else {
        Err(Error::invalid(
            "weights",
            format!("{len} values"),
            format!("{expected} values for shape {:?}", layout.weight_shape),
        ))
    }
}

/// The host fast path for int4 weights: checks every value is in [-8, 7] (fused into the pack),
/// packs and lays out on the host, and uploads only the packed bytes (1/8 of the input) to a
/// new buffer on `stream`. Produces the same bytes as [`convert_weight_to_int4_pack`].
///
/// A one-off [`HostPacker`]; to pack many weights, keep one and its staging buffers.
pub fn pack_int4_on_host(
    stream: &Arc<Stream>,
    weights: &[i32],
    shape: &[i64],
    options: PackOptions,
) -> Result<PackedWeight> {
    let mut packer = HostPacker::new(stream);
    let packed = packer.pack_int4(weights, shape, options)?;
    // The staging buffers are freed here: wait for their uploads where a failure can be reported.
    packer.wait()?;
    Ok(packed)
}

/// The host fast path for FP4 weights (`f32` values carrying E2M1 numbers): rejects non-finite
/// values and values beyond ±6, packs with the operator's truncating code table, uploads only
/// the packed bytes. Produces the same bytes as [`convert_weight_to_int4_pack`].
///
/// A one-off [`HostPacker`]; to pack many weights, keep one and its staging buffers.
pub fn pack_fp4_on_host(
    stream: &Arc<Stream>,
    weights: &[f32],
    shape: &[i64],
    options: PackOptions,
) -> Result<PackedWeight> {
    let mut packer = HostPacker::new(stream);
    let packed = packer.pack_fp4(weights, shape, options)?;
    packer.wait()?;
    Ok(packed)
}

/// Packed bytes per staging chunk of a [`HostPacker`] by default: 8 MiB (64 MiB of `int32`
/// input, [`kernels::PARALLEL_THRESHOLD`] elements), large enough for the kernels to use every
/// core, small enough that the upload of the last chunk, the only one not hidden behind packing,
/// is short (about 0.3 ms at 25 GB/s).
pub const HOST_CHUNK_BYTES: usize = 8 << 20;

/// The host packing path with reusable page-locked staging.
///
/// A weight is packed chunk by chunk (runs of whole bytes in ND, whole FRACTAL_NZ column blocks
/// in NZ) straight into one of two pinned buffers, and each chunk's upload is queued on the
/// stream as soon as it is packed, so that it runs while the next chunk is packed. Per weight
/// that is one read of the input, one write of the packed bytes and one DMA: no intermediate
/// `Vec`, no second host copy. A staging buffer is refilled only after its previous upload has
/// finished (its marks make the host wait), and the returned weight carries the marks of its
/// uploads, so later work on any stream of the device is ordered after them without a host
/// synchronize.
///
/// The staging buffers grow to at most two chunks and are kept for the next weight; they are
/// freed (after their last upload) when the packer is dropped.
pub struct HostPacker {
    stream: Arc<Stream>,
    chunk_bytes: usize,
    slots: [Option<PinnedHostBuffer<u8>>; 2],
    next: usize,
}

impl HostPacker {
    /// A packer uploading on `stream`, with chunks of [`HOST_CHUNK_BYTES`].
    pub fn new(stream: &Arc<Stream>) -> Self {
        Self::with_chunk_bytes(stream, HOST_CHUNK_BYTES)
    }

    /// A packer with chunks of about `chunk_bytes` packed bytes (rounded down to whole NZ column
    /// blocks, at least one block or one byte).
    pub fn with_chunk_bytes(stream: &Arc<Stream>, chunk_bytes: usize) -> Self {
        HostPacker { stream: stream.clone(), chunk_bytes: chunk_bytes.max(1), slots: [None, None], next: 0 }
    }

    /// The stream the uploads are queued on.
    pub fn stream(&self) -> &Arc<Stream> {
        &self.stream
    }

    /// Blocks until every upload queued from the staging buffers has finished, and reports a
    /// wait that failed. Dropping the packer waits too, but a drop cannot report: it leaks (and
    /// counts, see `Runtime::leaked`) a staging buffer whose uploads it cannot confirm. The
    /// packed weights never need this: their own uses are ordered after their uploads.
    pub fn wait(&self) -> Result<()> {
        for slot in self.slots.iter().flatten() {
            slot.wait()?;
        }
        Ok(())
    }

    /// Bytes of pinned host memory the packer holds now.
    pub fn staging_bytes(&self) -> usize {
        self.slots.iter().flatten().map(PinnedHostBuffer::len).sum()
    }

    /// Packs int4 weights (`int32` values in [-8, 7]) like [`pack_int4_on_host`].
    pub fn pack_int4(&mut self, weights: &[i32], shape: &[i64], options: PackOptions) -> Result<PackedWeight> {
        self.pack(weights, shape, options, Parts::INT4)
    }

    /// Packs FP4 weights (`f32` values carrying E2M1 numbers) like [`pack_fp4_on_host`].
    pub fn pack_fp4(&mut self, weights: &[f32], shape: &[i64], options: PackOptions) -> Result<PackedWeight> {
        self.pack(weights, shape, options, Parts::FP4)
    }

    fn pack<T>(&mut self, weights: &[T], shape: &[i64], options: PackOptions, parts: Parts<T>) -> Result<PackedWeight> {
        let layout = PackLayout::new(shape, parts.kind, options, chip_family(&self.stream)?)?;
        check_len(weights.len(), &layout)?;
        let stream = self.stream.clone();
        let mut buffer = DeviceBuffer::<u8>::alloc(&stream, layout.bytes)?;
        // A chunk is whole units: bytes in ND (byte `b` holds elements 2b and 2b + 1), column
        // blocks in NZ (contiguous in the NZ buffer).
        if layout.nz.is_none() && layout.bytes.checked_mul(2) != Some(weights.len()) {
            // ND packs two values per byte; `PackLayout` guarantees it, this keeps slicing safe.
            return Err(Error::invalid(
                "weights",
                format!("{} values for {} packed bytes", weights.len(), layout.bytes),
                "two values per packed byte",
            ));
        }
        let unit = layout.nz.map_or(1, |geom| geom.block_bytes().max(1));
        let chunk = (self.chunk_bytes / unit).max(1) * unit;
        let mut start = 0;
        while start < layout.bytes {
            let end = start.saturating_add(chunk).min(layout.bytes);
            let len = end - start;
            let slot = self.slot(len)?;
            // Waits (on the host) only for this slot's previous upload, two chunks ago.
            let staging = &mut slot.as_mut_slice()?[..len];
            let packed = match layout.nz {
                Some(geom) => (parts.nz)(weights, geom, start / unit..end / unit, staging),
                None => (parts.nd)(&weights[2 * start..2 * end], staging),
            };
            match packed {
                Ok(()) => {}
                Err(e @ PackError::Layout(_)) => return Err(pack_error(e)),
                // A chunk sees only its part: report the whole weight's first bad element.
                Err(e) => return Err(pack_error((parts.check)(weights).err().unwrap_or(e))),
            }
            buffer.copy_from_pinned_async_into(start, slot, 0..len, &stream)?;
            start = end;
        }
        Ok(PackedWeight { buffer, layout })
    }

    /// The next staging buffer, with room for at least `len` bytes.
    fn slot(&mut self, len: usize) -> Result<&mut PinnedHostBuffer<u8>> {
        let i = self.next;
        self.next = 1 - i;
        let slot = &mut self.slots[i];
        if slot.as_ref().is_none_or(|s| s.len() < len) {
            // Dropping a smaller buffer waits for its last upload first.
            *slot = None;
            *slot = Some(PinnedHostBuffer::zeroed(self.stream.device(), len)?);
        }
        Ok(slot.as_mut().expect("allocated above"))
    }
}

impl std::fmt::Debug for HostPacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPacker")
            .field("chunk_bytes", &self.chunk_bytes)
            .field("staging_bytes", &self.staging_bytes())
            .finish_non_exhaustive()
    }
}

/// What a kernel returns.
type KernelResult = std::result::Result<(), PackError>;

/// The kernels a [`HostPacker`] uses for one element type.
struct Parts<T: 'static> {
    kind: WeightKind,
    /// Packs a run of elements into ND bytes.
    nd: fn(&[T], &mut [u8]) -> KernelResult,
    /// Packs a range of FRACTAL_NZ column blocks.
    nz: fn(&[T], NzGeometry, std::ops::Range<usize>, &mut [u8]) -> KernelResult,
    /// Finds the first bad element of the whole weight.
    check: fn(&[T]) -> KernelResult,
}

impl Parts<i32> {
    const INT4: Self = Parts {
        kind: WeightKind::Int4,
        nd: kernels::pack_int4_checked,
        nz: kernels::pack_int4_nz_checked_blocks,
        check: kernels::check_int4,
    };
}

impl Parts<f32> {
    const FP4: Self = Parts {
        kind: WeightKind::Fp4,
        nd: kernels::pack_fp4_checked,
        nz: kernels::pack_fp4_nz_checked_blocks,
        check: kernels::check_fp4,
    };
}

/// Packs on the host with the operator's exact semantics (masking, no range check, CANN's 3D NZ
/// group offsets): the bytes CANN would produce for `weights`. For tests and comparisons.
pub fn reference_pack_int4(weights: &[i32], layout: &PackLayout) -> Result<Vec<u8>> {
    check_len(weights.len(), layout)?;
    let mut nd = vec![0u8; weights.len() / 2];
    kernels::pack_int4(weights, &mut nd).map_err(layout_error)?;
    match layout.nz {
        None => Ok(nd),
        Some(geom) => {
            let mut out = vec![0u8; geom.total_bytes()];
            kernels::nd_to_nz(&nd, geom, GroupOffset::Unpadded, &mut out).map_err(layout_error)?;
            Ok(out)
        }
    }
}
