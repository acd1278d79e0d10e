//! Reliability of the safe layer on the simulated device: no panic, no leak and no corruption
//! under injected faults (a sweep over every C call of the int4pack flows), concurrent use from
//! several threads and streams, and arbitrary bad requests to the safe API.
//!
//! Everything here relies on the simulator's inspection hooks (`sim::inject_fault`,
//! `sim::call_counts`, `sim::stats`), so the file needs the `sim` feature and skips itself when
//! `ACLNN_BACKEND=cann`.

#![cfg(feature = "sim")]

mod common;

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use aclnn::ops::int4pack::{
    PackLayout, PackOptions, WeightKind, convert_weight_to_int4_pack, pack_int4_on_host, reference_pack_int4,
};
use aclnn::sim::{self, LeakReport};
use aclnn::sys;
use aclnn::{Backend, ChipFamily, Container, DType, Device, DeviceBuffer, Error, Format, Runtime, Tensor, TensorDesc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

// ---------------------------------------------------------------------------------------------
// A spying function table: the simulator's entry points, with the few teardown calls whose
// arguments the sweep must know (which allocation a failed free left behind, which descriptor a
// failed destroy left alive) recorded on the way through.
// ---------------------------------------------------------------------------------------------

mod spy {
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{Mutex, OnceLock};

    use aclnn::sim;
    use aclnn::sys;

    /// What went through the spy since the last [`take`].
    #[derive(Debug, Default)]
    pub struct Log {
        /// Requested size of every successful `aclrtMalloc`, by address.
        pub sizes: HashMap<u64, u64>,
        /// Addresses passed to an `aclrtFree` that failed.
        pub failed_frees: Vec<u64>,
        /// Descriptors passed to an `aclDestroyTensor` that failed.
        pub failed_destroys: Vec<usize>,
    }

    static LOG: Mutex<Option<Log>> = Mutex::new(None);
    static SIM: OnceLock<sys::FunctionTable> = OnceLock::new();

    fn inner() -> &'static sys::FunctionTable {
        SIM.get_or_init(sim::table)
    }

    fn with_log(f: impl FnOnce(&mut Log)) {
        let mut guard = LOG.lock().unwrap_or_else(|e| e.into_inner());
        f(guard.get_or_insert_with(Log::default));
    }

    /// Returns and clears the log.
    pub fn take() -> Log {
        LOG.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default()
    }

    unsafe extern "C" fn malloc(
        out: *mut *mut c_void,
        size: usize,
        policy: sys::aclrtMemMallocPolicy,
    ) -> sys::aclError {
        let Some(f) = inner().aclrtMalloc else { return sys::ACL_ERROR_INTERNAL_ERROR };
        // SAFETY: forwarded verbatim; the caller upholds aclrtMalloc's contract.
        let code = unsafe { f(out, size, policy) };
        if code == sys::ACL_SUCCESS && !out.is_null() {
            // SAFETY: on success the runtime stored the address through the valid out-pointer.
            let addr = unsafe { *out } as usize as u64;
            with_log(|l| {
                l.sizes.insert(addr, size as u64);
            });
        }
        code
    }

    unsafe extern "C" fn free(ptr: *mut c_void) -> sys::aclError {
        let Some(f) = inner().aclrtFree else { return sys::ACL_ERROR_INTERNAL_ERROR };
        // SAFETY: forwarded verbatim.
        let code = unsafe { f(ptr) };
        if code != sys::ACL_SUCCESS {
            with_log(|l| l.failed_frees.push(ptr as usize as u64));
        }
        code
    }

    unsafe extern "C" fn destroy_tensor(tensor: *const sys::aclTensor) -> sys::aclnnStatus {
        let Some(f) = inner().aclDestroyTensor else { return sys::ACLNN_ERR_INNER };
        // SAFETY: forwarded verbatim.
        let code = unsafe { f(tensor) };
        if code != sys::ACLNN_SUCCESS {
            with_log(|l| l.failed_destroys.push(tensor as usize));
        }
        code
    }

    /// The simulator's table with the spying entries.
    pub fn table() -> sys::FunctionTable {
        let mut t = *inner();
        t.aclrtMalloc = Some(malloc);
        t.aclrtFree = Some(free);
        t.aclDestroyTensor = Some(destroy_tensor);
        t
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn opts(container: Container, format: Format) -> PackOptions {
    PackOptions { container, format }
}

/// Deterministic weights in [-8, 7].
fn weights_for(shape: &[i64]) -> Vec<i32> {
    let n: i64 = shape.iter().product();
    (0..n).map(|i| ((i * 7 + 3) % 16) as i32 - 8).collect()
}

fn expected_bytes(weights: &[i32], shape: &[i64], options: PackOptions) -> Vec<u8> {
    let layout = PackLayout::new(shape, WeightKind::Int4, options, ChipFamily::A2A3).expect("valid layout");
    reference_pack_int4(weights, &layout).expect("reference")
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Packs through the operator: upload, tensor, `convert_weight_to_int4_pack`, copy back.
fn pack_via_op(
    stream: &Arc<aclnn::Stream>,
    weights: &[i32],
    shape: &[i64],
    options: PackOptions,
) -> aclnn::Result<Vec<u8>> {
    let buffer = DeviceBuffer::from_host(stream, weights)?;
    let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, shape))?;
    let packed = convert_weight_to_int4_pack(&weight, options)?;
    packed.to_host_bytes()
}

// ---------------------------------------------------------------------------------------------
// 1. Fault sweep
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Op,
    Host,
}

struct FlowSpec {
    name: &'static str,
    path: Path,
    shape: &'static [i64],
    options: PackOptions,
}

/// Where the flow is, recorded in the baseline run as call-count snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Mark {
    /// Just before `convert_weight_to_int4_pack` (op path only).
    OpStart,
    /// Just after it.
    OpEnd,
    /// Every result is in host memory; only drops follow.
    Teardown,
}

/// C functions that only run from `Drop` impls: their failures cannot be returned.
const DROP_APIS: &[&str] = &[
    "aclrtFree",
    "aclrtFreeHost",
    "aclDestroyTensor",
    "aclrtDestroyStream",
    "aclrtDestroyContext",
    "aclrtResetDevice",
    "aclDestroyAclOpExecutor",
];

/// A plausible failure code for `api`.
fn fault_code(api: &str) -> i32 {
    match api {
        "aclrtMalloc" => sys::ACL_ERROR_RT_MEMORY_ALLOCATION,
        a if a.starts_with("aclnn") || a.ends_with("Tensor") || a == "aclDestroyAclOpExecutor" => 561_000,
        _ => sys::ACL_ERROR_RT_DRV_INTERNAL_ERROR,
    }
}

/// runtime → device → stream → buffers → tensors → op (or host pack) → copy back → teardown,
/// with every object dropped explicitly and in a fixed order.
fn run_flow(runtime: &Runtime, spec: &FlowSpec, weights: &[i32], mark: &mut dyn FnMut(Mark)) -> aclnn::Result<Vec<u8>> {
    let device = runtime.device(0)?;
    let stream = device.new_stream()?;
    let bytes = match spec.path {
        Path::Op => {
            let buffer = DeviceBuffer::from_host(&stream, weights)?;
            let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, spec.shape))?;
            mark(Mark::OpStart);
            let packed = convert_weight_to_int4_pack(&weight, spec.options)?;
            mark(Mark::OpEnd);
            let bytes = packed.to_host_bytes()?;
            mark(Mark::Teardown);
            drop(packed);
            drop(weight);
            drop(buffer);
            bytes
        }
        Path::Host => {
            let packed = pack_int4_on_host(&stream, weights, spec.shape, spec.options)?;
            let bytes = packed.to_host_bytes()?;
            mark(Mark::Teardown);
            drop(packed);
            bytes
        }
    };
    drop(stream);
    drop(device);
    Ok(bytes)
}

/// `true` if `e` is the typed error of `api` failing with `code`.
fn names_failing_api(e: &Error, api: &str, code: i32) -> bool {
    let typed = match e {
        Error::Runtime { api: a, code: c, .. } | Error::Aclnn { api: a, code: c, .. } => *a == api && *c == code,
        // Null-returning entry points (aclCreateTensor, aclrtGetSocName) carry no code.
        Error::NullHandle { api: a, .. } => *a == api,
        _ => false,
    };
    typed && e.to_string().contains(api)
}

struct SweepResult {
    covered: usize,
    returned_errors: usize,
    teardown_failures: usize,
    /// Forward-path failures the flow absorbed with the right bytes (an event that could not be
    /// created or recorded falls back to ordering by stream synchronisation).
    absorbed: usize,
}

/// C functions whose failure on the forward path may be absorbed: marks fall back to stream
/// synchronisation when an event cannot be made, and binding the context is part of that.
const ABSORBABLE_APIS: &[&str] = &[
    "aclrtCreateEvent",
    "aclrtRecordEvent",
    "aclrtDestroyEvent",
    "aclrtQueryEventStatus",
    "aclrtQueryEventWaitStatus",
    "aclrtSetCurrentContext",
];

/// Whether every leak the simulator reported (plus `host_buffers` pinned buffers found alive
/// after the run) is one the runtime counted on purpose (the fail-closed policy: memory,
/// streams or events whose guarding wait failed are leaked, not freed), and nothing was counted
/// that the simulator did not see.
fn leaks_explained(reports: &[LeakReport], host_buffers: u64, before: aclnn::Leaked, after: aclnn::Leaked) -> bool {
    let sum = |f: fn(&LeakReport) -> u64| reports.iter().map(f).sum::<u64>();
    sum(|r| r.allocations.len() as u64) == after.device_buffers - before.device_buffers
        && sum(|r| r.streams as u64) == after.streams - before.streams
        && sum(|r| r.events as u64) == after.events - before.events
        && sum(|r| r.host_buffers as u64) + host_buffers == after.host_buffers - before.host_buffers
        && sum(|r| r.contexts as u64) == after.devices - before.devices
}

/// Learns the flow's C calls, then fails each call index of each function once and checks the
/// outcome: typed error naming the API (forward path) or `Ok` with correct bytes (teardown path),
/// never a panic, nothing live afterwards.
fn sweep(spec: &FlowSpec) -> SweepResult {
    let h = common::harness();
    // SAFETY: the spy forwards every call to the simulator's entries unchanged and only records
    // what went through, so it keeps the C API's contract as the simulator does.
    let runtime = Runtime::new(unsafe { Backend::table("sim-spy", spy::table()) }).expect("spy runtime");
    let weights = weights_for(spec.shape);
    let expected = expected_bytes(&weights, spec.shape, spec.options);

    // Baseline: which functions are called how often, and where the phases start.
    let _ = spy::take();
    sim::reset_call_counts();
    let mut marks: HashMap<Mark, HashMap<&'static str, u64>> = HashMap::new();
    let got = run_flow(&runtime, spec, &weights, &mut |m| {
        marks.insert(m, sim::call_counts());
    })
    .expect("baseline flow");
    let totals = sim::call_counts();
    assert_eq!(got, expected, "{}: baseline bytes", spec.name);
    h.assert_clean();
    let at = |m: Mark, api: &str| marks.get(&m).and_then(|c| c.get(api)).copied().unwrap_or(0);

    let mut result = SweepResult { covered: 0, returned_errors: 0, teardown_failures: 0, absorbed: 0 };
    for &api in sys::FUNCTION_NAMES {
        let count = totals.get(api).copied().unwrap_or(0);
        for n in 1..=count {
            let point = format!("{}: {api} call #{n}", spec.name);
            let code = fault_code(api);
            let _ = spy::take();
            sim::reset_call_counts();
            assert!(sim::inject_fault(api, n, code), "{point}: not injectable");
            let before = runtime.leaked();
            let outcome = catch_unwind(AssertUnwindSafe(|| run_flow(&runtime, spec, &weights, &mut |_| {})));
            sim::clear_faults();
            let outcome = outcome.unwrap_or_else(|p| panic!("{point}: panicked: {}", panic_text(&*p)));
            assert!(sim::call_counts().get(api).copied().unwrap_or(0) >= n, "{point}: the fault never fired");
            let log = spy::take();
            if runtime.leaked().devices > before.devices {
                // A device kept set because something on it was leaked on purpose: the work has
                // run by now, so reset it at the C level, which reports what it reclaims.
                reset_raw_device(&runtime);
            }
            let (leaks, violations) = sim::take_reports();
            assert!(violations.is_empty(), "{point}: violations {violations:?}");
            let mut host_buffers = 0;
            if runtime.leaked().host_buffers > before.host_buffers {
                // Pinned memory leaked on purpose (the wait before its free failed) belongs to no
                // device, so no reset reclaims it: discard it, and nothing else may be left.
                let found = sim::discard_all();
                host_buffers = found.host_buffers as u64;
                assert_eq!(found, sim::Discarded { host_buffers: found.host_buffers, ..Default::default() }, "{point}");
            }
            let explained = leaks_explained(&leaks, host_buffers, before, runtime.leaked());

            let teardown = n > at(Mark::Teardown, api);
            let in_op = spec.path == Path::Op && n > at(Mark::OpStart, api) && n <= at(Mark::OpEnd, api);
            if DROP_APIS.contains(&api) || teardown {
                // Cannot be returned from Drop: the flow succeeds with the right bytes.
                let bytes = outcome.unwrap_or_else(|e| panic!("{point}: a teardown failure surfaced as {e:?}"));
                assert_eq!(bytes, expected, "{point}: bytes");
                result.teardown_failures += 1;
                let report = |at: &str| LeakReport {
                    at: at.to_string(),
                    allocations: Vec::new(),
                    streams: 0,
                    contexts: 0,
                    tensors: 0,
                    host_buffers: 0,
                    events: 0,
                };
                match api {
                    "aclrtFree" => {
                        // Reclaimed (and reported) by the device reset: exactly that allocation.
                        assert_eq!(log.failed_frees.len(), 1, "{point}: {log:?}");
                        let addr = log.failed_frees[0];
                        let size = *log.sizes.get(&addr).unwrap_or_else(|| panic!("{point}: {addr:#x} not allocated"));
                        let want = LeakReport { allocations: vec![(addr, size)], ..report("aclrtResetDevice(0)") };
                        assert_eq!(leaks, vec![want], "{point}");
                    }
                    "aclrtDestroyStream" => {
                        // Reclaimed (and reported) by the context's destruction.
                        assert_eq!(leaks.len(), 1, "{point}: {leaks:?}");
                        assert!(leaks[0].at.starts_with("aclrtDestroyContext("), "{point}: {leaks:?}");
                        assert_eq!(
                            LeakReport { at: String::new(), ..leaks[0].clone() },
                            LeakReport { streams: 1, ..report("") }
                        );
                    }
                    "aclrtDestroyContext" => {
                        let want = LeakReport { contexts: 1, ..report("aclrtResetDevice(0)") };
                        assert_eq!(leaks, vec![want], "{point}");
                    }
                    "aclDestroyTensor" => {
                        // Tensor::drop never retries a failed destroy (the library may have
                        // released the descriptor before failing): it is leaked and counted.
                        assert!(leaks.is_empty(), "{point}: {leaks:?}");
                        assert_eq!(log.failed_destroys.len(), 1, "{point}: {log:?}");
                        assert_eq!(sim::stats().live_tensors, 1, "{point}");
                        destroy_raw_tensor(&runtime, log.failed_destroys[0]);
                    }
                    "aclrtResetDevice" => {
                        // The device stays set (memory, streams and contexts are already gone);
                        // balance it so that later runs start from an idle device.
                        assert!(leaks.is_empty(), "{point}: {leaks:?}");
                        assert_eq!(sim::stats().devices_in_use, 1, "{point}");
                        reset_raw_device(&runtime);
                        assert_eq!(sim::stats().devices_in_use, 0, "{point}");
                    }
                    _ => assert!(explained, "{point}: unexplained leaks {leaks:?}, counted {:?}", runtime.leaked()),
                }
            } else if let Ok(bytes) = outcome {
                assert!(ABSORBABLE_APIS.contains(&api), "{point}: a forward-path failure was swallowed");
                assert_eq!(bytes, expected, "{point}: absorbed failure, bytes");
                assert!(explained, "{point}: unexplained leaks {leaks:?}");
                result.absorbed += 1;
            } else {
                let Err(e) = outcome else { unreachable!("Ok handled above") };
                if api == "aclrtMemcpy" && in_op {
                    // The operator copies through the runtime and reports its own status.
                    let op_error = matches!(
                        &e,
                        Error::Aclnn { api: "aclnnConvertWeightToINT4PackGetWorkspaceSize", code: 361_001, message: Some(m) }
                            if m.contains("aclrtMemcpy")
                    );
                    assert!(op_error, "{point}: expected the operator's 361001 naming aclrtMemcpy, got {e:?}");
                } else {
                    assert!(
                        names_failing_api(&e, api, code),
                        "{point}: expected an error of {api} ({code}), got {e:?}"
                    );
                }
                assert!(explained, "{point}: a forward failure leaked {leaks:?}");
                result.returned_errors += 1;
            }
            h.assert_clean();
            result.covered += 1;
        }
    }
    // The flow still works after the sweep.
    assert_eq!(run_flow(&runtime, spec, &weights, &mut |_| {}).expect("flow after the sweep"), expected);
    drop(runtime);
    h.assert_clean();
    println!(
        "fault sweep {}: {} injection points covered ({} returned typed errors, {} teardown failures absorbed, \
         {} forward failures absorbed by a fallback)",
        spec.name, result.covered, result.returned_errors, result.teardown_failures, result.absorbed
    );
    let mut points: Vec<String> =
        sys::FUNCTION_NAMES.iter().filter_map(|api| totals.get(api).map(|n| format!("{api} x{n}"))).collect();
    points.sort();
    println!("  injection points per function: {}", points.join(", "));
    result
}

/// Releases a descriptor the safe layer leaked after a failed destroy, so later runs start clean.
fn destroy_raw_tensor(runtime: &Runtime, tensor: usize) {
    let f = runtime.api().aclDestroyTensor().expect("aclDestroyTensor");
    // SAFETY: a live descriptor (its only destroy failed) that nothing refers to any more.
    assert_eq!(unsafe { f(tensor as *const sys::aclTensor) }, 0);
}

fn reset_raw_device(runtime: &Runtime) {
    let f = runtime.api().aclrtResetDevice().expect("aclrtResetDevice");
    // SAFETY: plain value argument; balances the aclrtSetDevice whose reset failed.
    assert_eq!(unsafe { f(0) }, 0);
}

fn check_sweep(spec: FlowSpec, min_points: usize) {
    if !common::on_sim() {
        return;
    }
    let started = Instant::now();
    let r = sweep(&spec);
    println!("fault sweep {}: {:.2?}", spec.name, started.elapsed());
    assert!(r.covered >= min_points, "{}: only {} injection points", spec.name, r.covered);
    assert!(r.returned_errors >= 10 && r.teardown_failures >= 5, "{}: too few of each kind", spec.name);
}

#[test]
fn fault_sweep_op_path_nd() {
    check_sweep(
        FlowSpec {
            name: "op/ND int32",
            path: Path::Op,
            shape: &[32, 64],
            options: opts(Container::ThirtyTwoBit, Format::Nd),
        },
        30,
    );
}

#[test]
fn fault_sweep_op_path_nz() {
    check_sweep(
        FlowSpec {
            name: "op/NZ int4 3D",
            path: Path::Op,
            shape: &[2, 16, 64],
            options: opts(Container::FourBit, Format::FractalNz),
        },
        30,
    );
}

#[test]
fn fault_sweep_host_path_nd() {
    check_sweep(
        FlowSpec {
            name: "host/ND int4",
            path: Path::Host,
            shape: &[24, 16],
            options: opts(Container::FourBit, Format::Nd),
        },
        20,
    );
}

#[test]
fn fault_sweep_host_path_nz() {
    check_sweep(
        FlowSpec {
            name: "host/NZ int32",
            path: Path::Host,
            shape: &[17, 72],
            options: opts(Container::ThirtyTwoBit, Format::FractalNz),
        },
        20,
    );
}

/// After a failed `aclDestroyTensor` in `Tensor::drop`, the descriptor is leaked and counted,
/// never destroyed twice; nothing else stays live once every object is dropped.
#[test]
fn failed_destroy_tensor_in_drop_is_counted_not_retried() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    // SAFETY: the spy forwards every call to the simulator's entries unchanged and only records
    // what went through, so it keeps the C API's contract as the simulator does.
    let runtime = Runtime::new(unsafe { Backend::table("sim-spy", spy::table()) }).expect("spy runtime");
    let weights = weights_for(&[16, 64]);
    let _ = spy::take();
    assert!(sim::inject_fault("aclDestroyTensor", 1, 561_000));
    let result = (|| {
        let device = runtime.device(0)?;
        let stream = device.new_stream()?;
        pack_via_op(&stream, &weights, &[16, 64], PackOptions::default())
    })();
    sim::clear_faults();
    let live = sim::stats().live_tensors;
    let failed = spy::take().failed_destroys;
    assert_eq!(failed.len(), 1, "the injected failure happened");
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(live, 1, "the descriptor whose destroy failed is leaked, not destroyed again");
    assert_eq!(runtime.leaked().descriptors, 1, "and counted");
    destroy_raw_tensor(&runtime, failed[0]);
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// 2. Threads
// ---------------------------------------------------------------------------------------------

struct Job {
    shape: &'static [i64],
    options: PackOptions,
    weights: Vec<i32>,
    expected: Vec<u8>,
}

fn jobs() -> Vec<Job> {
    let specs: [(&'static [i64], PackOptions); 6] = [
        (&[32, 64], opts(Container::ThirtyTwoBit, Format::Nd)),
        (&[16, 64], opts(Container::FourBit, Format::FractalNz)),
        (&[2, 16, 64], opts(Container::FourBit, Format::FractalNz)),
        (&[17, 72], opts(Container::ThirtyTwoBit, Format::FractalNz)),
        (&[8, 16], opts(Container::FourBit, Format::Nd)),
        (&[3, 5, 24], opts(Container::ThirtyTwoBit, Format::Nd)),
    ];
    specs
        .iter()
        .enumerate()
        .map(|(i, (shape, options))| {
            // Different data per job, so that a mix-up between threads shows.
            let weights: Vec<i32> =
                weights_for(shape).iter().enumerate().map(|(j, v)| ((v + 8 + (i * j) as i32) % 16) - 8).collect();
            let expected = expected_bytes(&weights, shape, *options);
            Job { shape, options: *options, weights, expected }
        })
        .collect()
}

/// `threads` threads, each with its own stream on `devices[t % len]`, packing `iterations`
/// jobs each, alternating the operator path and the host path.
fn stress(devices: &[Arc<Device>], jobs: &[Job], threads: usize, iterations: usize) -> usize {
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let device = devices[t % devices.len()].clone();
            let done = &done;
            s.spawn(move || {
                let stream = device.new_stream().expect("stream");
                for i in 0..iterations {
                    let job = &jobs[(t * 5 + i * 7) % jobs.len()];
                    let bytes = if (t + i) % 2 == 0 {
                        pack_via_op(&stream, &job.weights, job.shape, job.options)
                    } else {
                        pack_int4_on_host(&stream, &job.weights, job.shape, job.options).and_then(|p| p.to_host_bytes())
                    };
                    let bytes = bytes.unwrap_or_else(|e| panic!("thread {t} iteration {i}: {e}"));
                    assert_eq!(bytes, job.expected, "thread {t} iteration {i} {:?} {:?}", job.shape, job.options);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    done.into_inner()
}

#[test]
fn concurrent_packing_on_one_device_matches_the_single_threaded_reference() {
    let h = common::harness();
    let jobs = jobs();
    let started = Instant::now();
    let done = {
        let device = h.runtime.device(0).expect("device 0");
        stress(&[device], &jobs, 4, 100)
    };
    println!("threads, one device: {done} packs by 4 threads in {:.2?}", started.elapsed());
    assert_eq!(done, 400);
    h.assert_clean();
}

#[test]
fn concurrent_packing_on_two_devices_matches_the_single_threaded_reference() {
    let h = common::harness();
    if h.runtime.device_count().expect("device count") < 2 {
        return;
    }
    let jobs = jobs();
    let started = Instant::now();
    let done = {
        let devices = [h.runtime.device(0).expect("device 0"), h.runtime.device(1).expect("device 1")];
        stress(&devices, &jobs, 6, 50)
    };
    println!("threads, two devices: {done} packs by 6 threads in {:.2?}", started.elapsed());
    assert_eq!(done, 300);
    h.assert_clean();
}

/// Threads that each open their own device handles and streams, and drop them while others
/// are still packing: set/reset counting and per-thread contexts must hold up.
#[test]
fn threads_opening_and_dropping_devices_concurrently_leak_nothing() {
    let h = common::harness();
    let jobs = jobs();
    let count = h.runtime.device_count().expect("device count").min(2);
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let runtime = h.runtime.clone();
            let jobs = &jobs;
            s.spawn(move || {
                for i in 0..10usize {
                    let device = runtime.device((t + i as u32) % count).expect("device");
                    let stream = device.new_stream().expect("stream");
                    let job = &jobs[(t as usize + i) % jobs.len()];
                    let bytes = pack_via_op(&stream, &job.weights, job.shape, job.options).expect("pack");
                    assert_eq!(bytes, job.expected);
                }
            });
        }
    });
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// 3. Bad input at the safe level
// ---------------------------------------------------------------------------------------------

/// An arbitrary request to the safe API.
#[derive(Clone, Debug)]
struct Request {
    shape: Vec<i64>,
    options: PackOptions,
    /// Use exactly as many weights as the shape has elements (when that is small).
    exact_len: bool,
    other_len: usize,
    seed: u64,
    /// One value outside [-8, 7], at this position modulo the length.
    bad_value: Option<(usize, i32)>,
}

fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => 1i64..100,
        3 => prop::sample::select(vec![8i64, 16, 24, 32, 64, 72, 128]),
        2 => -3i64..=0,
        1 => prop::sample::select(vec![1i64 << 40, 1 << 62, i64::MAX, i64::MIN]),
    ]
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![
        4 => Just(Format::Nd),
        4 => Just(Format::FractalNz),
        1 => Just(Format::Nchw),
        1 => Just(Format::Nhwc),
        2 => prop_oneof![Just(2), Just(29), any::<i32>()].prop_map(Format::Other),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    // Half plausible weights (mostly packable), half anything.
    let k = prop_oneof![1i64..40, (1i64..4).prop_map(|x| x * 16)];
    let n = prop_oneof![(1i64..16).prop_map(|x| x * 8), (1i64..3).prop_map(|x| x * 64), 1i64..20];
    let plausible = (prop::option::of(1i64..4), k, n).prop_map(|(g, k, n)| match g {
        Some(g) => vec![g, k, n],
        None => vec![k, n],
    });
    let wild = prop_oneof![3 => prop::collection::vec(dim(), 2..=3), 1 => prop::collection::vec(dim(), 0..5)];
    let shape = prop_oneof![plausible, wild];
    let container = prop_oneof![Just(Container::FourBit), Just(Container::ThirtyTwoBit)];
    let bad = prop_oneof![Just(i32::MIN), i32::MIN..-8, 8..=i32::MAX, Just(i32::MAX), Just(8), Just(-9)];
    (
        shape,
        container,
        format(),
        prop::bool::weighted(0.75),
        0usize..3000,
        any::<u64>(),
        prop::option::weighted(0.2, (any::<usize>(), bad)),
    )
        .prop_map(|(shape, container, format, exact_len, other_len, seed, bad_value)| Request {
            shape,
            options: PackOptions { container, format },
            exact_len,
            other_len,
            seed,
            bad_value,
        })
}

/// Element count of `shape` if every dim is >= 0 and the product is small enough to allocate.
fn small_elements(shape: &[i64]) -> Option<usize> {
    let n = shape.iter().try_fold(1i128, |acc, d| if *d < 0 { None } else { acc.checked_mul(*d as i128) })?;
    (n <= 1 << 16).then_some(n as usize)
}

/// The arguments a request to `pack_int4_on_host` gets wrong (empty: it is valid). The API may
/// report any one of them.
fn host_problems(shape: &[i64], options: PackOptions, weights: &[i32]) -> Vec<&'static str> {
    let mut problems = Vec::new();
    let rank = shape.len();
    let per_element = if options.container == Container::ThirtyTwoBit { 8 } else { 2 };
    let elements = shape.iter().try_fold(1i128, |acc, d| acc.checked_mul(*d as i128));
    let shape_ok = (2..=3).contains(&rank)
        && shape.iter().all(|d| *d >= 1)
        && elements.and_then(|e| e.checked_mul(4)).is_some_and(|b| b <= isize::MAX as i128)
        && shape[rank - 1] % per_element == 0
        // 3D FRACTAL_NZ needs whole tiles: k % 16 == 0 and n / 2 a multiple of C0 (32 on A2).
        && !(options.format == Format::FractalNz && rank == 3 && (shape[1] % 16 != 0 || (shape[2] / 2) % 32 != 0));
    if !shape_ok {
        problems.push("weight shape");
    }
    if !matches!(options.format, Format::Nd | Format::FractalNz) {
        problems.push("pack format");
    }
    if elements != Some(weights.len() as i128) || weights.iter().any(|v| !(-8..=7).contains(v)) {
        problems.push("weights");
    }
    problems
}

#[track_caller]
fn assert_names_argument(e: &Error, allowed: &[&str], what: &str) {
    let argument = match e {
        Error::InvalidArgument { argument, .. } | Error::ValueOutOfRange { argument, .. } => *argument,
        other => panic!("{what}: expected an argument error, got {other:?}"),
    };
    let text = e.to_string();
    assert!(allowed.contains(&argument), "{what}: blamed {argument:?}, expected one of {allowed:?}: {text}");
    assert!(text.contains(argument), "{what}: {text:?} does not name {argument:?}");
    assert!(text.contains("expected"), "{what}: {text:?} does not say what was expected");
}

/// Outcomes seen by the safe-level proptest: host accepted / refused, operator accepted / refused.
#[derive(Default)]
struct Tally {
    host_ok: AtomicUsize,
    host_err: AtomicUsize,
    op_ok: AtomicUsize,
    op_err: AtomicUsize,
}

fn bump(c: &AtomicUsize) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn check_request(stream: &Arc<aclnn::Stream>, r: &Request, tally: &Tally) -> Result<(), TestCaseError> {
    let elements = small_elements(&r.shape);
    let len = match elements {
        Some(n) if r.exact_len => n,
        _ => r.other_len,
    };
    let mut rng = fastrand::Rng::with_seed(r.seed);
    let mut weights: Vec<i32> = (0..len).map(|_| rng.i32(-8..=7)).collect();
    if let (Some((at, v)), false) = (r.bad_value, weights.is_empty()) {
        let n = weights.len();
        weights[at % n] = v;
    }
    let what = format!("{:?} {:?} with {} weights", r.shape, r.options, weights.len());

    // The layout alone (pure).
    let layout = PackLayout::new(&r.shape, WeightKind::Int4, r.options, ChipFamily::A2A3);

    // Host fast path: checks everything, including values.
    let problems = host_problems(&r.shape, r.options, &weights);
    match pack_int4_on_host(stream, &weights, &r.shape, r.options) {
        Ok(packed) => {
            prop_assert!(problems.is_empty(), "{what}: accepted despite {problems:?}");
            let layout = layout.as_ref().map_err(|e| TestCaseError::fail(format!("{what}: layout {e}")))?;
            prop_assert_eq!(packed.layout(), layout);
            let expected = reference_pack_int4(&weights, layout).expect("reference");
            prop_assert_eq!(packed.to_host_bytes().expect("copy back"), expected, "{}", what);
            prop_assert_eq!(packed.unpack_int4().expect("unpack"), weights.clone(), "{}", what);
            bump(&tally.host_ok);
        }
        Err(e) => {
            prop_assert!(!problems.is_empty(), "{what}: valid request refused: {e}");
            assert_names_argument(&e, &problems, &what);
            bump(&tally.host_err);
        }
    }

    // Operator path: the tensor checks the shape against the buffer, the operator masks values.
    let buffer = DeviceBuffer::from_host(stream, &weights).expect("upload");
    let tensor = match Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &r.shape)) {
        Ok(t) => t,
        Err(e) => {
            // Only shapes that do not fit the buffer (or are not shapes at all) are refused.
            let fits = r.shape.len() <= aclnn::MAX_RANK && small_elements(&r.shape).is_some_and(|n| n <= len);
            prop_assert!(!fits, "{what}: tensor refused: {e}");
            assert_names_argument(
                &e,
                &["tensor view shape", "tensor storage shape", "tensor storage", "tensor view"],
                &what,
            );
            bump(&tally.op_err);
            return Ok(());
        }
    };
    let op_problems: Vec<&str> = problems.iter().copied().filter(|p| *p != "weights").collect();
    match convert_weight_to_int4_pack(&tensor, r.options) {
        Ok(packed) => {
            prop_assert!(op_problems.is_empty(), "{what}: operator path accepted despite {op_problems:?}");
            let n = small_elements(&r.shape).expect("a packable shape is small here");
            let layout = layout.as_ref().map_err(|e| TestCaseError::fail(format!("{what}: layout {e}")))?;
            // CANN's semantics: the first n values, masked to 4 bits.
            let expected = reference_pack_int4(&weights[..n], layout).expect("reference");
            prop_assert_eq!(packed.to_host_bytes().expect("copy back"), expected, "{}", what);
            bump(&tally.op_ok);
        }
        Err(e) => {
            prop_assert!(!op_problems.is_empty(), "{what}: operator path refused a valid request: {e}");
            assert_names_argument(&e, &op_problems, &what);
            bump(&tally.op_err);
        }
    }
    Ok(())
}

#[test]
fn arbitrary_safe_requests_are_refused_with_a_clear_error_or_match_the_reference() {
    let h = common::harness();
    let started = Instant::now();
    let tally = Tally::default();
    {
        let device = h.runtime.device(0).expect("device 0");
        let stream = device.new_stream().expect("stream");
        let mut runner = TestRunner::new(Config { cases: 192, failure_persistence: None, ..Config::default() });
        let outcome =
            runner.run(&request(), |r| match catch_unwind(AssertUnwindSafe(|| check_request(&stream, &r, &tally))) {
                Ok(result) => result,
                Err(p) => Err(TestCaseError::fail(format!("panicked: {}", panic_text(&*p)))),
            });
        if let Err(e) = outcome {
            panic!("{e}");
        }
    }
    let (host_ok, host_err) = (tally.host_ok.into_inner(), tally.host_err.into_inner());
    let (op_ok, op_err) = (tally.op_ok.into_inner(), tally.op_err.into_inner());
    println!(
        "safe-level bad input: {} cases in {:.2?}; host path {host_ok} packed / {host_err} refused, \
         operator path {op_ok} packed / {op_err} refused",
        host_ok + host_err,
        started.elapsed()
    );
    // Both outcomes must be exercised on both paths, or the generator is off.
    assert!(
        host_ok >= 10 && host_err >= 30 && op_ok >= 10 && op_err >= 20,
        "generator balance: host {host_ok} ok / {host_err} refused, operator {op_ok} ok / {op_err} refused"
    );
    h.assert_clean();
}

/// A few hand-picked requests the proptest may miss, with the argument each must name.
#[test]
fn handpicked_bad_requests_name_the_argument() {
    let h = common::harness();
    {
        let stream = h.runtime.device(0).expect("device 0").new_stream().expect("stream");
        let nd = PackOptions::default();
        let cases: Vec<(Vec<i64>, PackOptions, Vec<i32>, &str)> = vec![
            (vec![], nd, vec![1], "weight shape"),
            (vec![64], nd, vec![0; 64], "weight shape"),
            (vec![1, 1, 1, 8], nd, vec![0; 8], "weight shape"),
            (vec![0, 8], nd, vec![], "weight shape"),
            (vec![-1, 8], nd, vec![], "weight shape"),
            (vec![1 << 40, 1 << 40], nd, vec![], "weight shape"),
            (vec![i64::MAX, 8], nd, vec![], "weight shape"),
            (vec![1 << 40, 8], nd, vec![0; 8], "weights"),
            (vec![4, 12], nd, vec![0; 48], "weight shape"),
            (vec![4, 7], opts(Container::FourBit, Format::Nd), vec![0; 28], "weight shape"),
            (vec![4, 6], opts(Container::FourBit, Format::Nd), vec![0; 23], "weights"),
            (vec![2, 8], opts(Container::FourBit, Format::Other(29)), vec![0; 16], "pack format"),
            (vec![2, 8], opts(Container::FourBit, Format::Nchw), vec![0; 16], "pack format"),
            (vec![2, 17, 64], opts(Container::FourBit, Format::FractalNz), vec![0; 2 * 17 * 64], "weight shape"),
            (vec![2, 8], nd, vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "weights"),
            (vec![2, 8], nd, vec![i32::MIN; 16], "weights"),
        ];
        for (shape, options, weights, argument) in cases {
            let what = format!("{shape:?} {options:?} {} weights", weights.len());
            let e = pack_int4_on_host(&stream, &weights, &shape, options).expect_err(&what);
            assert_names_argument(&e, &[argument], &what);
        }
    }
    h.assert_clean();
}
