//! Fault sweep over every flow the crate has (`reliability.rs` sweeps the INT4Pack flows one-shot
//! with a per-call oracle; here they run again with persistent faults): INT4Pack on the operator
//! and the host path (one-off, and chunked through a reused `HostPacker`), the W4A16 sequence of ops-nn's example (pack, NZ re-init, Cast through the kit, the matmul),
//! pinned asynchronous copies ordered across two streams by events, a plan dropped unlaunched,
//! and objects dropped with work still queued. Every call of every C function a flow makes is
//! failed once (one-shot) and from that call on (persistent: a device that stays broken).
//!
//! Each run must end without a panic, with either the right bytes or a typed error, without any
//! misuse (no free of memory that queued work still uses), and with every object the simulator
//! finds left over explained: counted by the runtime as leaked on purpose (fail closed), or left
//! by a destroy call that itself failed. The machine is then wiped for the next run.

#![cfg(feature = "sim")]

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use aclnn::ops::int4pack::{
    HostPacker, PackOptions, convert_weight_to_int4_pack, convert_weight_to_int4_pack_plan, pack_int4_on_host,
};
use aclnn::sim::{self, Discarded};
use aclnn::sys;
use aclnn::{
    Backend, DType, DeviceBuffer, Error, Format, Leaked, PinnedHostBuffer, Runtime, Stream, Tensor, TensorDesc,
    Workspace,
};

type Flow = fn(&Runtime) -> aclnn::Result<Vec<u8>>;

aclnn::operator! {
    /// `out = self_ * other` (`aclnnMuls`).
    fn muls(self_: In, other: Scalar, out: Out) = unsafe "aclnnMuls";
}

aclnn::operator! {
    /// `out = self_` with its dims reordered (`aclnnPermute`).
    fn permute(self_: In, dims: IntArray, out: Out) = unsafe "aclnnPermute";
}

/// The operator kit's descriptor kinds: a scalar (Muls), an int array (Permute) and tensor
/// lists (the MoE grouped matmul, `aclnnGroupedMatmulV4`).
fn kit_descriptors_and_moe(runtime: &Runtime) -> aclnn::Result<Vec<u8>> {
    let stream = runtime.device(0)?.new_stream()?;
    let x = DeviceBuffer::from_host(&stream, &[1.5f32, -2.0, 4.0, 0.25, 8.0, -1.0])?;
    let mut y = DeviceBuffer::<f32>::alloc(&stream, 6)?;
    let mut t = DeviceBuffer::<f32>::alloc(&stream, 6)?;
    {
        let three = aclnn::Scalar::new(runtime, 3.0f32)?;
        let xt = Tensor::new(&x, TensorDesc::nd(DType::Float, &[2, 3]))?;
        let mut yt = Tensor::new_mut(&mut y, TensorDesc::nd(DType::Float, &[2, 3]))?;
        muls(&xt, &three, &mut yt)?.launch(&stream, &mut Workspace::new(&stream))?;
    }
    {
        let yt = Tensor::new(&y, TensorDesc::nd(DType::Float, &[2, 3]))?;
        let mut tt = Tensor::new_mut(&mut t, TensorDesc::nd(DType::Float, &[3, 2]))?;
        let dims = aclnn::IntArray::new(runtime, &[1, 0])?;
        permute(&yt, &dims, &mut tt)?.launch(&stream, &mut Workspace::new(&stream))?;
    }
    let problem = aclnn::ops::grouped_matmul::HostMoeW4A16::seeded(&[3, 0, 2], 64, 32, 32, 11);
    let moe = problem.run_on(&stream)?;
    let mut out: Vec<u8> = t.to_vec()?.iter().flat_map(|v| v.to_le_bytes()).collect();
    out.extend(moe.iter().flat_map(|v| v.to_le_bytes()));
    Ok(out)
}

/// ops-nn's INT4Pack example (`aclnn::selftest`): every output 72.0, returned as bytes.
fn official_w4a16(runtime: &Runtime) -> aclnn::Result<Vec<u8>> {
    let y = aclnn::selftest::official_int4pack_w4a16(runtime, 4)?;
    Ok(y.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// INT4Pack through the operator, NZ: upload, pack, copy back.
fn int4pack_operator_nz(runtime: &Runtime) -> aclnn::Result<Vec<u8>> {
    let stream = runtime.device(0)?.new_stream()?;
    let weights: Vec<i32> = (0..96 * 128).map(|i| (i * 7 % 16) - 8).collect();
    let buffer = DeviceBuffer::from_host(&stream, &weights)?;
    let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &[96, 128]))?;
    let options = PackOptions { format: Format::FractalNz, ..PackOptions::default() };
    convert_weight_to_int4_pack(&weight, options)?.to_host_bytes()
}

/// INT4Pack on the host (range-checked), uploaded: the fast path.
fn int4pack_host_nd(runtime: &Runtime) -> aclnn::Result<Vec<u8>> {
    let stream = runtime.device(0)?.new_stream()?;
    let weights: Vec<i32> = (0..96 * 128).map(|i| (i * 5 % 16) - 8).collect();
    pack_int4_on_host(&stream, &weights, &[96, 128], PackOptions::default())?.to_host_bytes()
}

/// The host path chunk by chunk through one packer's reused pinned staging: a FRACTAL_NZ weight
/// in eight chunks (one column block each) and an ND weight in three, each chunk's upload
/// queued while the next is packed.
fn host_packer_chunked(runtime: &Runtime) -> aclnn::Result<Vec<u8>> {
    let stream = runtime.device(0)?.new_stream()?;
    let mut packer = HostPacker::with_chunk_bytes(&stream, 3072);
    let nz: Vec<i32> = (0..96 * 512).map(|i| (i * 3 % 16) - 8).collect();
    let nd: Vec<i32> = (0..64 * 256).map(|i| (i * 11 % 16) - 8).collect();
    let options = PackOptions { format: Format::FractalNz, ..PackOptions::default() };
    let a = packer.pack_int4(&nz, &[96, 512], options)?;
    let b = packer.pack_int4(&nd, &[64, 256], PackOptions::default())?;
    let mut bytes = a.to_host_bytes()?;
    bytes.extend(b.to_host_bytes()?);
    Ok(bytes)
}

/// Pinned upload on a copy stream into a buffer homed on a compute stream, an event between
/// them, and an asynchronous download into pinned memory read by the host.
fn pinned_copies_and_events(runtime: &Runtime) -> aclnn::Result<Vec<u8>> {
    let device = runtime.device(0)?;
    let (copy, compute): (Arc<Stream>, Arc<Stream>) = (device.new_stream()?, device.new_stream()?);
    let data: Vec<u32> = (0..4096u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
    let staging = PinnedHostBuffer::from_slice(&device, &data)?;
    let mut buffer = DeviceBuffer::<u32>::alloc(&compute, data.len())?;
    buffer.copy_from_pinned_async_on(&staging, &copy)?;
    let uploaded = copy.record_event()?;
    compute.wait_event(&uploaded)?;
    let mut back = PinnedHostBuffer::<u32>::zeroed(&device, data.len())?;
    buffer.copy_to_pinned_async_on(&mut back, &compute)?;
    Ok(back.as_slice()?.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// A plan built and dropped without launch: its executor must be destroyed, never leaked.
fn plan_dropped_unlaunched(runtime: &Runtime) -> aclnn::Result<Vec<u8>> {
    let stream = runtime.device(0)?.new_stream()?;
    let weights: Vec<i32> = (0..64 * 32).map(|i| (i % 16) - 8).collect();
    let w = DeviceBuffer::from_host(&stream, &weights)?;
    let mut packed = DeviceBuffer::<u8>::zeroed(&stream, 64 * 32 / 2)?;
    {
        let weight = Tensor::new(&w, TensorDesc::nd(DType::Int32, &[64, 32]))?;
        let mut pack = Tensor::new_mut(&mut packed, TensorDesc::nd(DType::Int4, &[64, 32]))?;
        let plan = convert_weight_to_int4_pack_plan(&weight, &mut pack)?;
        drop(plan);
    }
    packed.to_vec()
}

/// Buffers, pinned memory and streams dropped with copies still queued: drops must wait (or
/// leak and count), never free under pending work.
fn dropped_with_queued_work(runtime: &Runtime) -> aclnn::Result<Vec<u8>> {
    let device = runtime.device(0)?;
    let side = device.new_stream()?;
    let main = device.new_stream()?;
    let data = vec![7u16; 8192];
    let staging = PinnedHostBuffer::from_slice(&device, &data)?;
    let mut a = DeviceBuffer::<u16>::alloc(&main, data.len())?;
    a.copy_from_pinned_async_on(&staging, &side)?;
    drop(staging);
    drop(side);
    let mut b = DeviceBuffer::<u16>::alloc(&main, data.len())?;
    b.copy_from_host(&data)?;
    drop(a);
    let out = b.to_vec()?;
    drop(b);
    drop(main);
    Ok(out.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// The C function whose failure can leave an object of each kind behind.
fn destroyer(kind: &str) -> &'static [&'static str] {
    match kind {
        "allocations" => &["aclrtFree"],
        "streams" => &["aclrtDestroyStream"],
        "contexts" => &["aclrtDestroyContext"],
        "events" => &["aclrtDestroyEvent"],
        "tensors" => &["aclDestroyTensor"],
        "descriptors" => &[
            "aclDestroyScalar",
            "aclDestroyIntArray",
            "aclDestroyFloatArray",
            "aclDestroyBoolArray",
            "aclDestroyTensorList",
        ],
        "host_buffers" => &["aclrtFreeHost"],
        "executors" => &["aclDestroyAclOpExecutor"],
        "devices" => &["aclrtResetDevice"],
        _ => &[],
    }
}

/// Checks `found` against what the runtime counted (`counted`) and what failed destroy calls
/// (`fired` failures of `api`) may leave: counted ≤ found ≤ counted + fired.
fn explain(point: &str, found: &Discarded, counted: &Leaked, api: &str, fired: u64) {
    let kinds: [(&str, usize, u64); 9] = [
        ("allocations", found.allocations, counted.device_buffers),
        ("streams", found.streams, counted.streams),
        ("contexts", found.contexts, counted.devices),
        ("events", found.events, counted.events),
        ("tensors", found.tensors, 0),
        ("descriptors", found.descriptors, 0),
        ("host_buffers", found.host_buffers, counted.host_buffers),
        ("executors", found.executors, counted.executors),
        ("devices", found.devices, counted.devices),
    ];
    let descriptors = (found.tensors + found.descriptors) as u64;
    for (kind, found_n, counted_n) in kinds {
        let allowed = if destroyer(kind).contains(&api) { fired } else { 0 };
        let found_n = found_n as u64;
        let ok = match kind {
            // Counted together by the runtime; checked below.
            "tensors" | "descriptors" => found_n <= counted.descriptors + allowed,
            // Counted after any failed phase 2, which may or may not have released them.
            "executors" => found_n <= counted_n + allowed,
            _ => counted_n <= found_n && found_n <= counted_n + allowed,
        };
        assert!(
            ok,
            "{point}: {found_n} {kind} left over, {counted_n} counted, {allowed} allowed by failed destroys; {found:?} {counted:?}"
        );
    }
    assert!(descriptors >= counted.descriptors, "{point}: counted descriptors the simulator does not have");
}

fn typed(e: &Error) -> bool {
    matches!(e, Error::Runtime { .. } | Error::Aclnn { .. } | Error::NullHandle { .. })
}

/// Fails every call of every C function `flow` makes, once and persistently; returns the number
/// of runs.
fn sweep(name: &str, flow: Flow) -> usize {
    let h = common::harness();
    sim::clear_faults();
    let _ = sim::discard_all();
    let _ = sim::take_reports();
    let runtime = Runtime::new(Backend::sim(sim::SimConfig::default()).unwrap()).unwrap();
    sim::reset_call_counts();
    let expected = flow(&runtime).expect("baseline");
    let totals = sim::call_counts();
    h.assert_clean();
    let mut runs = 0;
    let mut names: Vec<&'static str> = totals.keys().copied().collect();
    names.sort();
    for api in names {
        if matches!(api, "aclInit" | "aclFinalize") {
            continue; // called once per process by Runtime::new, not by the flows
        }
        for n in 1..=totals[api] {
            for persistent in [false, true] {
                let point = format!("{name}: {api} call #{n}{}", if persistent { " and every later one" } else { "" });
                let code = if api == "aclrtMalloc" { sys::ACL_ERROR_RT_MEMORY_ALLOCATION } else { 507_899 };
                sim::reset_call_counts();
                let armed = if persistent {
                    sim::inject_persistent_fault(api, n, code)
                } else {
                    sim::inject_fault(api, n, code)
                };
                assert!(armed, "{point}: not injectable");
                let before = runtime.leaked();
                let outcome = catch_unwind(AssertUnwindSafe(|| flow(&runtime)));
                let calls = sim::call_counts().get(api).copied().unwrap_or(0);
                sim::clear_faults();
                let outcome = outcome.unwrap_or_else(|_| panic!("{point}: panicked"));
                let fired = if persistent { calls.saturating_sub(n - 1) } else { u64::from(calls >= n) };
                match &outcome {
                    Ok(bytes) => assert_eq!(bytes, &expected, "{point}: wrong bytes after an absorbed failure"),
                    Err(e) => assert!(typed(e), "{point}: untyped error {e:?}"),
                }
                let mut counted = runtime.leaked();
                counted.device_buffers -= before.device_buffers;
                counted.host_buffers -= before.host_buffers;
                counted.streams -= before.streams;
                counted.events -= before.events;
                counted.descriptors -= before.descriptors;
                counted.executors -= before.executors;
                counted.devices -= before.devices;
                let found = sim::discard_all();
                let (_, violations) = sim::take_reports();
                assert!(violations.is_empty(), "{point}: misuse {violations:?}");
                explain(&point, &found, &counted, api, fired);
                runs += 1;
            }
        }
    }
    assert_eq!(flow(&runtime).expect("the flow works after the sweep"), expected);
    drop(runtime);
    h.assert_clean();
    println!("fault sweep {name}: {runs} runs over {} functions", totals.len());
    runs
}

#[test]
fn fault_sweep_official_w4a16_sequence() {
    if common::on_sim() {
        assert!(sweep("official W4A16", official_w4a16) > 100);
    }
}

#[test]
fn fault_sweep_pinned_copies_and_events() {
    if common::on_sim() {
        assert!(sweep("pinned copies and events", pinned_copies_and_events) > 40);
    }
}

#[test]
fn fault_sweep_int4pack_operator_nz() {
    if common::on_sim() {
        assert!(sweep("INT4Pack operator NZ", int4pack_operator_nz) > 60);
    }
}

#[test]
fn fault_sweep_int4pack_host_nd() {
    if common::on_sim() {
        assert!(sweep("INT4Pack host ND", int4pack_host_nd) > 30);
    }
}

#[test]
fn fault_sweep_host_packer_chunked() {
    if common::on_sim() {
        assert!(sweep("HostPacker chunked NZ + ND", host_packer_chunked) > 40);
    }
}

#[test]
fn fault_sweep_kit_descriptors_and_moe() {
    if common::on_sim() {
        assert!(sweep("kit descriptors and MoE", kit_descriptors_and_moe) > 100);
    }
}

#[test]
fn fault_sweep_plan_dropped_unlaunched() {
    if common::on_sim() {
        assert!(sweep("plan dropped unlaunched", plan_dropped_unlaunched) > 20);
    }
}

#[test]
fn fault_sweep_objects_dropped_with_queued_work() {
    if common::on_sim() {
        assert!(sweep("dropped with queued work", dropped_with_queued_work) > 30);
    }
}

/// Which bound C functions no flow of the sweeps calls (reported, so a gap is visible).
#[test]
fn the_sweeps_reach_most_bound_functions() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    let runtime = Runtime::new(Backend::sim(sim::SimConfig::default()).unwrap()).unwrap();
    sim::reset_call_counts();
    for flow in [
        int4pack_operator_nz,
        int4pack_host_nd,
        host_packer_chunked,
        official_w4a16,
        pinned_copies_and_events,
        plan_dropped_unlaunched,
        dropped_with_queued_work,
        kit_descriptors_and_moe,
    ] {
        flow(&runtime).unwrap();
    }
    let reached = sim::call_counts();
    let missed: Vec<&str> = sys::FUNCTION_NAMES.iter().copied().filter(|f| !reached.contains_key(f)).collect();
    println!(
        "swept flows reach {} of {} bound functions (plus operators by name); not reached: {}",
        sys::FUNCTION_NAMES.len() - missed.len(),
        sys::FUNCTION_NAMES.len(),
        missed.join(", ")
    );
    assert!(sys::FUNCTION_NAMES.len() - missed.len() >= 36, "{missed:?}");
    drop(runtime);
    h.assert_clean();
}
