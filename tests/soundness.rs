//! Soundness regressions through the safe API: every hazard of the soundness issue, written as a
//! hostile but ordinary user would (no `unsafe` except where a test has to inspect or clean up
//! what the safe layer deliberately leaked), must now be impossible, refused with a typed error,
//! or handled without a violation on the simulated device. Compile-time halves (an `unsafe`
//! table constructor, `Tensor: !Sync`, `Plan: !Send`) are `compile_fail` doctests on those items.
//! The C-level twins of these hazards are in `tests/sanitizer.rs`.

mod common;

use std::sync::Arc;

use aclnn::ops::wqbmm::{HostW4A16, WeightQuantMatmul};
use aclnn::{DType, DeviceBuffer, Error, Format, PinnedHostBuffer, Stream, Tensor, TensorDesc, Workspace};

#[cfg(feature = "sim")]
use aclnn::sim;

/// Violations recorded by the simulator since the last call (none on hardware).
fn violations() -> Vec<String> {
    #[cfg(feature = "sim")]
    if common::on_sim() {
        return sim::take_reports().1;
    }
    Vec::new()
}

// ---------------------------------------------------------------------------------------------
// 1. Untrusted function table
// ---------------------------------------------------------------------------------------------

/// The simulator is reachable safely; arbitrary tables only through `unsafe` (compile_fail
/// doctest on `Backend::table`). Even a table that breaks its contract by reporting success
/// with a null pinned pointer gets a typed error instead of a write through null.
#[cfg(feature = "sim")]
#[test]
fn a_null_pointer_reported_with_success_is_refused() {
    if !common::on_sim() {
        return;
    }
    use aclnn::sys;
    unsafe extern "C" fn lying_malloc_host(_out: *mut *mut std::ffi::c_void, _size: usize) -> sys::aclError {
        0 // success, out-pointer never written
    }
    let h = common::harness();
    let mut table = sim::table();
    table.aclrtMallocHost = Some(lying_malloc_host);
    // SAFETY: deliberately breaks the contract in one entry (aclrtMallocHost) to show the
    // safe layer checks the out-pointer anyway; every other entry is the simulator's.
    let runtime = aclnn::Runtime::new(unsafe { aclnn::Backend::table("liar", table) }).unwrap();
    let device = runtime.device(0).unwrap();
    let err = PinnedHostBuffer::<u8>::zeroed(&device, 64).unwrap_err();
    assert!(matches!(err, Error::NullHandle { api: "aclrtMallocHost", .. }), "{err:?}");
    drop((device, runtime));
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// 2. Free after a failed wait: leak and count, never free memory that may be in use
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "sim")]
#[test]
fn a_pinned_buffer_whose_wait_fails_is_leaked_not_freed() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    let rig = common::Rig::new(&h);
    let src: Vec<u32> = (0..1024).collect();
    let dev = DeviceBuffer::from_host(&rig.stream, &src).unwrap();
    let mut pinned = PinnedHostBuffer::<u32>::zeroed(&rig.device, 1024).unwrap();
    dev.copy_to_pinned_async(&mut pinned).unwrap();
    let raw = pinned.as_raw();
    assert!(sim::inject_fault("aclrtSynchronizeEvent", 1, aclnn::sys::ACL_ERROR_RT_DRV_INTERNAL_ERROR));
    drop(pinned); // its wait fails: leaked, not freed under the queued copy
    sim::clear_faults();
    assert_eq!(h.runtime.leaked().host_buffers, 1);
    assert_eq!(h.runtime.leaked().host_bytes, 4096);
    rig.stream.synchronize().unwrap(); // the copy lands in memory that is still allocated
    assert!(violations().is_empty());
    // SAFETY: 1024 u32 of pinned memory the safe layer leaked; the copy into it has completed.
    let landed = unsafe { std::slice::from_raw_parts(raw as *const u32, 1024) };
    assert_eq!(landed, &src[..]);
    free_host(&h.runtime, raw);
    let context = rig.device.raw_context();
    drop((dev, rig));
    // Something on the device was leaked while possibly in use: the device is kept set too.
    assert_eq!(h.runtime.leaked().devices, 1);
    recover_device(&h.runtime, context);
    h.assert_clean();
}

#[cfg(feature = "sim")]
#[test]
fn a_device_buffer_or_stream_whose_wait_fails_is_leaked_not_freed() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    let rig = common::Rig::new(&h);
    let other = rig.device.new_stream().unwrap();
    let pinned = PinnedHostBuffer::from_slice(&rig.device, &[7u8; 512]).unwrap();
    let mut dev = DeviceBuffer::<u8>::alloc(&rig.stream, 512).unwrap();
    dev.copy_from_pinned_async_on(&pinned, &other).unwrap();
    let raw = dev.as_raw();
    assert!(sim::inject_fault("aclrtSynchronizeEvent", 1, aclnn::sys::ACL_ERROR_RT_DRV_INTERNAL_ERROR));
    drop(dev);
    sim::clear_faults();
    assert_eq!(h.runtime.leaked().device_buffers, 1);
    drop(pinned); // its marks (which hold the stream) go with it
    // The stream: its final synchronize fails, so it is not destroyed with work queued.
    let raw_stream = other.raw();
    assert!(sim::inject_fault("aclrtSynchronizeStream", 1, aclnn::sys::ACL_ERROR_RT_DRV_INTERNAL_ERROR));
    drop(other);
    sim::clear_faults();
    assert_eq!(h.runtime.leaked().streams, 1);
    assert!(violations().is_empty());
    // Clean up what was leaked on purpose, now that the work has run.
    let api = h.runtime.api();
    rig.device.bind().unwrap();
    // SAFETY: the stream the safe layer leaked; nothing else refers to it.
    unsafe {
        assert_eq!(api.aclrtSynchronizeStream().unwrap()(raw_stream), 0);
        assert_eq!(api.aclrtDestroyStream().unwrap()(raw_stream), 0);
        assert_eq!(api.aclrtFree().unwrap()(raw), 0);
    }
    let context = rig.device.raw_context();
    drop(rig);
    assert_eq!(h.runtime.leaked().devices, 1);
    recover_device(&h.runtime, context);
    h.assert_clean();
}

/// What a process would do to recover a device the safe layer kept set after a deliberate
/// leak, once the work it waited for has run: destroy the context and reset the device.
#[cfg(feature = "sim")]
fn recover_device(runtime: &aclnn::Runtime, context: aclnn::sys::aclrtContext) {
    let api = runtime.api();
    // SAFETY: the context the dropped `Device` left alive, and the device it set; nothing
    // refers to either any more.
    unsafe {
        assert_eq!(api.aclrtDestroyContext().unwrap()(context), 0);
        assert_eq!(api.aclrtResetDevice().unwrap()(0), 0);
    }
}

#[cfg(feature = "sim")]
fn free_host(runtime: &aclnn::Runtime, raw: *mut std::ffi::c_void) {
    // SAFETY: a pinned buffer the safe layer leaked, idle, freed once here.
    assert_eq!(unsafe { runtime.api().aclrtFreeHost().unwrap()(raw) }, 0);
}

// ---------------------------------------------------------------------------------------------
// 3. One pinned buffer, copies queued on two streams from two threads
// ---------------------------------------------------------------------------------------------

#[test]
fn a_pinned_buffer_shared_by_two_threads_waits_for_both_streams() {
    let h = common::harness();
    let rig = common::Rig::new(&h);
    let streams = [rig.device.new_stream().unwrap(), rig.device.new_stream().unwrap()];
    for round in 0..50u8 {
        let payload = vec![round; 4096];
        let pinned = PinnedHostBuffer::from_slice(&rig.device, &payload).unwrap();
        let mut targets = [
            DeviceBuffer::<u8>::alloc(&rig.stream, 4096).unwrap(),
            DeviceBuffer::<u8>::alloc(&rig.stream, 4096).unwrap(),
        ];
        std::thread::scope(|scope| {
            for (target, stream) in targets.iter_mut().zip(&streams) {
                let pinned = &pinned;
                scope.spawn(move || target.copy_from_pinned_async_on(pinned, stream).unwrap());
            }
        });
        drop(pinned); // waits for both copies
        let decoy = PinnedHostBuffer::from_slice(&rig.device, &[0xEEu8; 4096]).unwrap();
        for s in &streams {
            s.synchronize().unwrap();
        }
        for t in &targets {
            assert_eq!(t.to_vec().unwrap(), payload, "round {round}");
        }
        drop(decoy);
    }
    assert!(violations().is_empty());
    drop((streams, rig));
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// 4 and 5. Operators on foreign streams, shared workspaces, device checks
// ---------------------------------------------------------------------------------------------

/// Device operands of a W4A16 problem, uploaded asynchronously on `upload` (so they carry marks
/// of that stream).
struct Operands {
    x: DeviceBuffer<u16>,
    w: DeviceBuffer<i8>,
    scale: DeviceBuffer<u16>,
    offset: DeviceBuffer<u16>,
    _pinned: Vec<PinnedHostBuffer<u16>>,
    _pinned_w: PinnedHostBuffer<i8>,
}

fn f16(values: &[f32]) -> Vec<u16> {
    values.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect()
}

fn upload(p: &HostW4A16, upload: &Arc<Stream>) -> Operands {
    let device = upload.device();
    let async_copy = |host: Vec<u16>| {
        let pinned = PinnedHostBuffer::from_slice(device, &host).unwrap();
        let mut d = DeviceBuffer::<u16>::alloc(upload, host.len()).unwrap();
        d.copy_from_pinned_async_on(&pinned, upload).unwrap();
        (d, pinned)
    };
    let (x, px) = async_copy(f16(&p.x));
    let (scale, ps) = async_copy(f16(&p.scale));
    let (offset, po) = async_copy(f16(&p.offset));
    let w8: Vec<i8> = p.w.iter().map(|v| *v as i8).collect();
    let pw = PinnedHostBuffer::from_slice(device, &w8).unwrap();
    let mut w = DeviceBuffer::<i8>::alloc(upload, w8.len()).unwrap();
    w.copy_from_pinned_async_on(&pw, upload).unwrap();
    Operands { x, w, scale, offset, _pinned: vec![px, ps, po], _pinned_w: pw }
}

/// Runs the matmul of `p` on `stream` with `workspace` into `y`.
fn matmul(
    p: &HostW4A16,
    o: &Operands,
    y: &mut DeviceBuffer<u16>,
    stream: &Arc<Stream>,
    ws: &mut Workspace,
) -> aclnn::Result<()> {
    let (m, k, n) = (p.m as i64, p.k as i64, p.n as i64);
    let groups = k / p.group_size.max(1) as i64;
    let scale_shape = if p.group_size > 0 { vec![groups, n] } else { vec![n] };
    let x = Tensor::new(&o.x, TensorDesc::nd(DType::Float16, &[m, k]))?;
    let w = Tensor::new(&o.w, TensorDesc::nd(DType::Int8, &[k, n]))?;
    let scale = Tensor::new(&o.scale, TensorDesc::nd(DType::Float16, &scale_shape))?;
    let offset = Tensor::new(&o.offset, TensorDesc::nd(DType::Float16, &scale_shape))?;
    let mut yt = Tensor::new_mut(y, TensorDesc::nd(DType::Float16, &[m, n]))?;
    let op = WeightQuantMatmul {
        antiquant_offset: Some(&offset),
        antiquant_group_size: p.group_size as i32,
        ..WeightQuantMatmul::new(&x, &w, &scale)
    };
    op.run(&mut yt, stream, ws)
}

fn decode(y: &DeviceBuffer<u16>) -> Vec<f32> {
    y.to_vec().unwrap().into_iter().map(|b| half::f16::from_bits(b).to_f32()).collect()
}

#[test]
fn a_matmul_on_a_foreign_stream_waits_for_its_operands_and_keeps_them_alive() {
    let h = common::harness();
    let rig = common::Rig::new(&h);
    let compute = rig.device.new_stream().unwrap();
    let p = HostW4A16::seeded(4, 128, 32, 32, 11);
    let ops = upload(&p, &rig.stream); // marks on the home stream
    let mut y = DeviceBuffer::<u16>::alloc(&rig.stream, p.m * p.n).unwrap();
    let mut ws = Workspace::new(&rig.stream); // a workspace made on the home stream...
    matmul(&p, &ops, &mut y, &compute, &mut ws).unwrap(); // ...used on another
    // Drop the operands at once: their memory waits for the matmul queued on `compute`.
    drop(ops);
    drop(ws);
    assert!(violations().is_empty());
    let got = decode(&y);
    assert!(HostW4A16::max_error(&got, &p.golden().unwrap()) < 1e-2, "{got:?}");
    drop((y, compute, rig));
    h.assert_clean();
}

#[test]
fn one_workspace_on_two_streams_is_never_shared_at_once() {
    let h = common::harness();
    let rig = common::Rig::new(&h);
    let (b, c) = (rig.device.new_stream().unwrap(), rig.device.new_stream().unwrap());
    let p = HostW4A16::seeded(2, 64, 16, 32, 5);
    let ops = upload(&p, &rig.stream);
    let mut ws = Workspace::new(&rig.stream);
    let mut y1 = DeviceBuffer::<u16>::alloc(&rig.stream, p.m * p.n).unwrap();
    let mut y2 = DeviceBuffer::<u16>::alloc(&rig.stream, p.m * p.n).unwrap();
    matmul(&p, &ops, &mut y1, &b, &mut ws).unwrap();
    assert!(ws.capacity() > 0, "the per-group path uses a workspace");
    matmul(&p, &ops, &mut y2, &c, &mut ws).unwrap();
    assert!(violations().is_empty(), "the second launch waits for the first's use of the workspace");
    assert_eq!(decode(&y1), decode(&y2));
    drop((ops, ws, y1, y2, b, c, rig));
    h.assert_clean();
}

#[test]
fn a_workspace_or_stream_of_another_device_is_refused() {
    let h = common::harness();
    if h.runtime.device_count().unwrap() < 2 {
        return;
    }
    let rig = common::Rig::new(&h);
    let other = h.runtime.device(1).unwrap().new_stream().unwrap();
    let p = HostW4A16::seeded(2, 64, 16, 32, 5);
    let ops = upload(&p, &rig.stream);
    let mut y = DeviceBuffer::<u16>::alloc(&rig.stream, p.m * p.n).unwrap();
    let mut foreign_ws = Workspace::new(&other);
    let err = matmul(&p, &ops, &mut y, &rig.stream, &mut foreign_ws).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { argument: "workspace", .. }), "{err}");
    let mut ws = Workspace::new(&rig.stream);
    let err = matmul(&p, &ops, &mut y, &other, &mut ws).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { argument: "stream", .. }), "{err}");
    // Async copies check devices too.
    let pinned = PinnedHostBuffer::<u16>::zeroed(&rig.device, p.m * p.n).unwrap();
    let err = y.copy_from_pinned_async_on(&pinned, &other).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { argument: "stream", .. }), "{err}");
    assert!(violations().is_empty());
    drop((ops, y, ws, foreign_ws, pinned, other, rig));
    h.assert_clean();
}

#[test]
fn an_nz_view_larger_than_its_storage_is_refused() {
    let h = common::harness();
    let rig = common::Rig::new(&h);
    let byte = DeviceBuffer::<u8>::alloc(&rig.stream, 1).unwrap();
    let desc = TensorDesc::nz(DType::Int4, &[65535, 65535], &[1, 1, 1, 2]);
    let err = Tensor::new(&byte, desc).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { argument: "tensor view", .. }), "{err}");
    assert!(err.to_string().contains("FRACTAL_NZ"), "{err}");
    // A view that fits its tiles is accepted, read row-major or transposed (as the strides say);
    // read the other way, or with an offset (NZ data is addressed from its base), it is not.
    let tiles = DeviceBuffer::<u8>::alloc(&rig.stream, 2 * 16 * 64 / 2).unwrap();
    let storage = [2, 1, 16, 64];
    Tensor::new(&tiles, TensorDesc::nz(DType::Int4, &[16, 128], &storage)).unwrap();
    Tensor::new(&tiles, TensorDesc::nz(DType::Int4, &[128, 16], &storage).with_strides(&[1, 128])).unwrap();
    let wrong_way = TensorDesc::nz(DType::Int4, &[128, 16], &storage);
    assert!(matches!(Tensor::new(&tiles, wrong_way), Err(Error::InvalidArgument { argument: "tensor view", .. })));
    let offset = TensorDesc { offset: 64, ..TensorDesc::nz(DType::Int4, &[16, 64], &storage) };
    let err = Tensor::new(&tiles, offset).unwrap_err();
    assert!(err.to_string().contains("offset"), "{err}");
    assert_eq!(Format::FractalNz, TensorDesc::nz(DType::Int4, &[16, 128], &storage).format);
    drop((byte, tiles, rig));
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Cross-stream pipelines need no host synchronisation
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "sim")]
#[test]
fn an_upload_and_matmul_pipeline_on_two_streams_never_blocks_the_host() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    let rig = common::Rig::new(&h);
    let (copy, compute) = (rig.device.new_stream().unwrap(), rig.device.new_stream().unwrap());
    let problems: Vec<HostW4A16> = (0..4).map(|i| HostW4A16::seeded(4, 128, 32, 32, 100 + i)).collect();
    let mut ws = Workspace::new(&compute);
    sim::reset_counters();
    let mut results = Vec::new();
    let mut keep = Vec::new();
    for p in &problems {
        let ops = upload(p, &copy);
        let mut y = DeviceBuffer::<u16>::alloc(&compute, p.m * p.n).unwrap();
        matmul(p, &ops, &mut y, &compute, &mut ws).unwrap();
        keep.push(ops);
        results.push(y);
    }
    let queued = sim::stats().sync;
    assert_eq!(queued.host_syncs, 0, "enqueueing the pipeline blocked the host: {queued:?}");
    assert!(queued.stream_waits >= problems.len() as u64, "the compute stream waits on the device: {queued:?}");
    for (p, y) in problems.iter().zip(&results) {
        assert!(HostW4A16::max_error(&decode(y), &p.golden().unwrap()) < 1e-2);
    }
    assert!(violations().is_empty());
    drop((keep, results, ws, copy, compute, rig));
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Found in review
// ---------------------------------------------------------------------------------------------

/// A plan whose launch fails before phase 2 (here: the device-side wait for an operand written
/// on another stream) still owns its executor, and destroys it when dropped.
#[cfg(feature = "sim")]
#[test]
fn a_launch_that_fails_before_phase_2_does_not_leak_the_executor() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    let rig = common::Rig::new(&h);
    let compute = rig.device.new_stream().unwrap();
    let p = HostW4A16::seeded(2, 64, 16, 0, 9);
    let ops = upload(&p, &rig.stream); // marks on the home stream: the launch must wait for them
    let mut y = DeviceBuffer::<u16>::alloc(&rig.stream, p.m * p.n).unwrap();
    let mut ws = Workspace::new(&compute);
    assert!(sim::inject_fault("aclrtStreamWaitEvent", 1, aclnn::sys::ACL_ERROR_RT_DRV_INTERNAL_ERROR));
    let err = matmul(&p, &ops, &mut y, &compute, &mut ws).unwrap_err();
    sim::clear_faults();
    assert_eq!(err.code(), Some(aclnn::sys::ACL_ERROR_RT_DRV_INTERNAL_ERROR), "{err}");
    assert_eq!(sim::stats().live_executors, 0, "the unlaunched executor was destroyed");
    assert_eq!(h.runtime.leaked(), aclnn::Leaked::default());
    // And the same call works once the fault is gone.
    matmul(&p, &ops, &mut y, &compute, &mut ws).unwrap();
    assert!(HostW4A16::max_error(&decode(&y), &p.golden().unwrap()) < 1e-2);
    assert!(violations().is_empty());
    drop((ops, y, ws, compute, rig));
    h.assert_clean();
}

/// An INT32-packed ND weight described at a view offset is read from that offset.
#[test]
fn a_packed_weight_at_a_view_offset_is_read_from_there() {
    let h = common::harness();
    let rig = common::Rig::new(&h);
    let p = HostW4A16::seeded(2, 64, 16, 0, 21);
    let packed = aclnn::ops::int4pack::pack_int4_on_host(&rig.stream, &p.w, &[64, 16], Default::default()).unwrap();
    let words: Vec<i32> =
        packed.to_host_bytes().unwrap().chunks(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    const PAD: usize = 64;
    let mut padded = vec![-1i32; PAD];
    padded.extend_from_slice(&words);
    let wb = DeviceBuffer::from_host(&rig.stream, &padded).unwrap();
    let xb = DeviceBuffer::from_host(&rig.stream, &f16(&p.x)).unwrap();
    let sb = DeviceBuffer::from_host(&rig.stream, &f16(&p.scale)).unwrap();
    let ob = DeviceBuffer::from_host(&rig.stream, &f16(&p.offset)).unwrap();
    let mut yb = DeviceBuffer::<u16>::alloc(&rig.stream, p.m * p.n).unwrap();
    {
        let desc = TensorDesc {
            offset: PAD as i64,
            storage: vec![(PAD / 2 + 64) as i64, 2],
            ..TensorDesc::nd(DType::Int32, &[64, 2])
        };
        let w = Tensor::new(&wb, desc).unwrap();
        let x = Tensor::new(&xb, TensorDesc::nd(DType::Float16, &[2, 64])).unwrap();
        let s = Tensor::new(&sb, TensorDesc::nd(DType::Float16, &[16])).unwrap();
        let o = Tensor::new(&ob, TensorDesc::nd(DType::Float16, &[16])).unwrap();
        let mut y = Tensor::new_mut(&mut yb, TensorDesc::nd(DType::Float16, &[2, 16])).unwrap();
        let op = WeightQuantMatmul { antiquant_offset: Some(&o), ..WeightQuantMatmul::new(&x, &w, &s) };
        let mut ws = Workspace::new(&rig.stream);
        op.run(&mut y, &rig.stream, &mut ws).unwrap();
    }
    assert!(HostW4A16::max_error(&decode(&yb), &p.golden().unwrap()) < 1e-2);
    assert!(violations().is_empty());
    drop((packed, wb, xb, sb, ob, yb, rig));
    h.assert_clean();
}
