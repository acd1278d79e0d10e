//! The simulator as a stream sanitizer, tested at the C level: each stream hazard, written
//! directly against the function table, must be reported as a violation, and the same sequence
//! ordered correctly (an event wait, or a synchronize) must not be. Also the event API itself:
//! record, stream wait, query, synchronize, elapsed time, destroy. These read the in-process
//! simulator's records, so they run only on the `sim` backend.

#![cfg(feature = "sim")]

mod common;

use std::ffi::c_void;

use aclnn::sim;
use aclnn::sys::{self, Api};

/// Raw calls with their status checked; the test fails on any non-zero status.
struct Raw<'a> {
    api: &'a Api,
}

impl Raw<'_> {
    fn malloc(&self, size: usize) -> u64 {
        let f = self.api.aclrtMalloc().unwrap();
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer, non-zero size.
        assert_eq!(unsafe { f(&mut p, size, sys::ACL_MEM_MALLOC_HUGE_FIRST) }, 0);
        p as usize as u64
    }

    fn free(&self, p: u64) {
        let f = self.api.aclrtFree().unwrap();
        // SAFETY: a live allocation of this test.
        assert_eq!(unsafe { f(p as usize as *mut c_void) }, 0);
    }

    fn malloc_host(&self, size: usize) -> *mut u8 {
        let f = self.api.aclrtMallocHost().unwrap();
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer, non-zero size.
        assert_eq!(unsafe { f(&mut p, size) }, 0);
        p.cast()
    }

    fn free_host(&self, p: *mut u8) {
        let f = self.api.aclrtFreeHost().unwrap();
        // SAFETY: a live pinned buffer of this test.
        assert_eq!(unsafe { f(p.cast()) }, 0);
    }

    fn stream(&self) -> sys::aclrtStream {
        let f = self.api.aclrtCreateStream().unwrap();
        let mut s: sys::aclrtStream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the harness's device context is current.
        assert_eq!(unsafe { f(&mut s) }, 0);
        s
    }

    fn destroy_stream(&self, s: sys::aclrtStream) {
        let f = self.api.aclrtDestroyStream().unwrap();
        // SAFETY: a live stream of this test.
        assert_eq!(unsafe { f(s) }, 0);
    }

    /// Synchronizes `s`; returns the status (queued work touching freed memory fails it).
    fn sync(&self, s: sys::aclrtStream) -> i32 {
        let f = self.api.aclrtSynchronizeStream().unwrap();
        // SAFETY: a live stream.
        unsafe { f(s) }
    }

    fn copy_async(&self, dst: u64, src: u64, n: usize, kind: sys::aclrtMemcpyKind, s: sys::aclrtStream) {
        let f = self.api.aclrtMemcpyAsync().unwrap();
        // SAFETY: the test keeps host sides alive until the stream is synchronized, except where
        // a test frees them on purpose to show that the simulator catches it (and then never
        // performs the copy).
        let code = unsafe { f(dst as usize as *mut c_void, n, src as usize as *const c_void, n, kind, s) };
        assert_eq!(code, 0);
    }

    fn copy(&self, dst: u64, src: u64, n: usize, kind: sys::aclrtMemcpyKind) {
        let f = self.api.aclrtMemcpy().unwrap();
        // SAFETY: both sides valid for `n` bytes.
        let code = unsafe { f(dst as usize as *mut c_void, n, src as usize as *const c_void, n, kind) };
        assert_eq!(code, 0);
    }

    fn event(&self) -> sys::aclrtEvent {
        let f = self.api.aclrtCreateEvent().unwrap();
        let mut e: sys::aclrtEvent = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { f(&mut e) }, 0);
        e
    }

    fn record(&self, e: sys::aclrtEvent, s: sys::aclrtStream) {
        let f = self.api.aclrtRecordEvent().unwrap();
        // SAFETY: live handles.
        assert_eq!(unsafe { f(e, s) }, 0);
    }

    fn wait(&self, s: sys::aclrtStream, e: sys::aclrtEvent) {
        let f = self.api.aclrtStreamWaitEvent().unwrap();
        // SAFETY: live handles.
        assert_eq!(unsafe { f(s, e) }, 0);
    }

    fn sync_event(&self, e: sys::aclrtEvent) {
        let f = self.api.aclrtSynchronizeEvent().unwrap();
        // SAFETY: a live event.
        assert_eq!(unsafe { f(e) }, 0);
    }

    fn destroy_event(&self, e: sys::aclrtEvent) {
        let f = self.api.aclrtDestroyEvent().unwrap();
        // SAFETY: a live event.
        assert_eq!(unsafe { f(e) }, 0);
    }
}

const H2D: sys::aclrtMemcpyKind = sys::ACL_MEMCPY_HOST_TO_DEVICE;
const D2H: sys::aclrtMemcpyKind = sys::ACL_MEMCPY_DEVICE_TO_HOST;
const D2D: sys::aclrtMemcpyKind = sys::ACL_MEMCPY_DEVICE_TO_DEVICE;

/// Runs `body` on a fresh device context and returns the violations it caused.
fn violations_of(body: impl FnOnce(&Raw<'_>)) -> Vec<String> {
    let h = common::harness();
    let device = h.runtime.device(0).unwrap();
    device.bind().unwrap();
    let _ = sim::take_reports();
    body(&Raw { api: h.runtime.api() });
    let (leaks, violations) = sim::take_reports();
    assert!(leaks.is_empty(), "{leaks:?}");
    drop(device);
    h.assert_clean();
    violations
}

fn assert_flagged(violations: &[String], needles: &[&str]) {
    assert!(
        violations.iter().any(|v| needles.iter().all(|n| v.contains(n))),
        "expected a violation containing {needles:?}, got {violations:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Hazard 2: a pinned buffer freed while a queued copy still targets it.
// ---------------------------------------------------------------------------------------------

#[test]
fn freeing_pinned_memory_under_a_queued_copy_is_flagged_and_the_copy_is_not_performed() {
    if !common::on_sim() {
        return; // reads the in-process simulator's reports
    }
    let v = violations_of(|raw| {
        let s = raw.stream();
        let dev = raw.malloc(4096);
        raw.copy(dev, [1u8; 4096].as_ptr() as u64, 4096, H2D);
        let pinned = raw.malloc_host(4096);
        raw.copy_async(pinned as u64, dev, 4096, D2H, s);
        raw.free_host(pinned); // the copy has not run
        assert_eq!(raw.sync(s), 0, "the copy is skipped, not failed");
        raw.free(dev);
        raw.destroy_stream(s);
    });
    assert_flagged(&v, &["aclrtFreeHost", "pinned host memory", "aclrtMemcpyAsync", "may still use it"]);
    assert_flagged(&v, &["touches pinned host memory", "freed after the copy was queued", "not performed"]);
}

#[test]
fn freeing_pinned_memory_after_its_stream_is_synchronized_is_clean() {
    if !common::on_sim() {
        return; // reads the in-process simulator's reports
    }
    let v = violations_of(|raw| {
        let s = raw.stream();
        let dev = raw.malloc(4096);
        raw.copy(dev, [1u8; 4096].as_ptr() as u64, 4096, H2D);
        let pinned = raw.malloc_host(4096);
        raw.copy_async(pinned as u64, dev, 4096, D2H, s);
        assert_eq!(raw.sync(s), 0);
        // SAFETY: 4096 bytes of pinned memory, written by the completed copy.
        assert_eq!(unsafe { std::slice::from_raw_parts(pinned, 4096) }, &[1u8; 4096][..]);
        raw.free_host(pinned);
        raw.free(dev);
        raw.destroy_stream(s);
    });
    assert!(v.is_empty(), "{v:?}");
}

// ---------------------------------------------------------------------------------------------
// Hazard 3: one pinned buffer read by copies on two streams; only one of them is waited for.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_pinned_buffer_read_by_two_streams_must_wait_for_both() {
    if !common::on_sim() {
        return; // reads the in-process simulator's reports
    }
    let v = violations_of(|raw| {
        let (a, b) = (raw.stream(), raw.stream());
        let (da, db) = (raw.malloc(256), raw.malloc(256));
        let pinned = raw.malloc_host(256);
        raw.copy_async(da, pinned as u64, 256, H2D, a);
        raw.copy_async(db, pinned as u64, 256, H2D, b);
        assert_eq!(raw.sync(a), 0); // b's copy is still queued
        raw.free_host(pinned);
        assert_eq!(raw.sync(b), 0);
        raw.free(da);
        raw.free(db);
        raw.destroy_stream(a);
        raw.destroy_stream(b);
    });
    assert_eq!(v.len(), 2, "{v:?}");
    assert_flagged(&v, &["aclrtFreeHost", "may still use it"]);
    assert_flagged(&v, &["not performed"]);
}

#[test]
fn a_pinned_buffer_read_by_two_streams_and_both_waited_for_is_clean() {
    if !common::on_sim() {
        return; // reads the in-process simulator's reports
    }
    let v = violations_of(|raw| {
        let (a, b) = (raw.stream(), raw.stream());
        let (da, db) = (raw.malloc(256), raw.malloc(256));
        let pinned = raw.malloc_host(256);
        raw.copy_async(da, pinned as u64, 256, H2D, a);
        raw.copy_async(db, pinned as u64, 256, H2D, b);
        let (ea, eb) = (raw.event(), raw.event());
        raw.record(ea, a);
        raw.record(eb, b);
        raw.sync_event(ea);
        raw.sync_event(eb);
        raw.free_host(pinned);
        raw.destroy_event(ea);
        raw.destroy_event(eb);
        raw.free(da);
        raw.free(db);
        raw.destroy_stream(a);
        raw.destroy_stream(b);
    });
    assert!(v.is_empty(), "{v:?}");
}

// ---------------------------------------------------------------------------------------------
// Hazard 4: work on a foreign stream reads memory another stream writes, then the memory is
// freed while that work is still queued.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_read_on_another_stream_without_an_event_wait_is_flagged() {
    if !common::on_sim() {
        return; // reads the in-process simulator's reports
    }
    let v = violations_of(|raw| {
        let (a, b) = (raw.stream(), raw.stream());
        let (x, y) = (raw.malloc(512), raw.malloc(512));
        let src = [3u8; 512];
        raw.copy_async(x, src.as_ptr() as u64, 512, H2D, a); // writes x on a
        raw.copy_async(y, x, 512, D2D, b); // reads x on b: unordered
        assert_eq!(raw.sync(a), 0);
        assert_eq!(raw.sync(b), 0);
        raw.free(x);
        raw.free(y);
        raw.destroy_stream(a);
        raw.destroy_stream(b);
    });
    assert_eq!(v.len(), 1, "{v:?}");
    assert_flagged(&v, &["unordered access", "reads it", "wrote it"]);
}

#[test]
fn freeing_memory_a_foreign_stream_still_uses_is_flagged() {
    if !common::on_sim() {
        return; // reads the in-process simulator's reports
    }
    let v = violations_of(|raw| {
        let (a, b) = (raw.stream(), raw.stream());
        let (x, y) = (raw.malloc(512), raw.malloc(512));
        raw.copy(x, [3u8; 512].as_ptr() as u64, 512, H2D);
        raw.copy_async(y, x, 512, D2D, b); // b reads x
        assert_eq!(raw.sync(a), 0); // the owner's stream, not b
        raw.free(x);
        let _ = raw.sync(b); // the queued copy now reads freed memory and fails
        raw.free(y);
        raw.destroy_stream(a);
        raw.destroy_stream(b);
    });
    assert_flagged(&v, &["aclrtFree", "device memory", "may still use it"]);
}

#[test]
fn an_event_wait_orders_a_foreign_stream_and_the_data_arrives() {
    if !common::on_sim() {
        return; // reads the in-process simulator's reports
    }
    let v = violations_of(|raw| {
        let (a, b) = (raw.stream(), raw.stream());
        let (x, y) = (raw.malloc(512), raw.malloc(512));
        let src = [5u8; 512];
        raw.copy_async(x, src.as_ptr() as u64, 512, H2D, a);
        let e = raw.event();
        raw.record(e, a);
        raw.wait(b, e);
        raw.copy_async(y, x, 512, D2D, b);
        // Synchronizing b alone runs a's copy first: the device honours the wait.
        assert_eq!(raw.sync(b), 0);
        let mut out = [0u8; 512];
        raw.copy(out.as_mut_ptr() as u64, y, 512, D2H);
        assert_eq!(out, src);
        assert_eq!(raw.sync(a), 0);
        raw.destroy_event(e);
        raw.free(x);
        raw.free(y);
        raw.destroy_stream(a);
        raw.destroy_stream(b);
    });
    assert!(v.is_empty(), "{v:?}");
}

// ---------------------------------------------------------------------------------------------
// Hazard 5: one workspace written by launches on two streams at once.
// ---------------------------------------------------------------------------------------------

#[test]
fn two_streams_writing_one_scratch_buffer_unordered_are_flagged() {
    if !common::on_sim() {
        return; // reads the in-process simulator's reports
    }
    let v = violations_of(|raw| {
        let (a, b) = (raw.stream(), raw.stream());
        let (x, scratch) = (raw.malloc(256), raw.malloc(256));
        raw.copy(x, [1u8; 256].as_ptr() as u64, 256, H2D);
        raw.copy_async(scratch, x, 256, D2D, a);
        raw.copy_async(scratch, x, 256, D2D, b);
        assert_eq!(raw.sync(a), 0);
        assert_eq!(raw.sync(b), 0);
        raw.free(x);
        raw.free(scratch);
        raw.destroy_stream(a);
        raw.destroy_stream(b);
    });
    assert_eq!(v.len(), 1, "{v:?}");
    assert_flagged(&v, &["unordered access", "writes it", "wrote it"]);
}

#[test]
fn a_kernel_on_a_foreign_stream_is_tracked_like_a_copy() {
    if !common::on_sim() {
        return; // reads the in-process simulator's reports
    }
    // aclnnWeightQuantBatchMatmulV2 on stream b reads a weight that stream a is still writing.
    let h = common::harness();
    let device = h.runtime.device(0).unwrap();
    let (a, b) = (device.new_stream().unwrap(), device.new_stream().unwrap());
    let problem = aclnn::ops::wqbmm::HostW4A16::seeded(2, 64, 16, 0, 7);
    let _ = sim::take_reports();
    {
        use aclnn::{DType, DeviceBuffer, PinnedHostBuffer, Tensor, TensorDesc};
        let enc = |v: &[f32]| v.iter().map(|x| half::f16::from_f32(*x).to_bits()).collect::<Vec<u16>>();
        let w: Vec<i8> = problem.w.iter().map(|v| *v as i8).collect();
        let xb = DeviceBuffer::from_host(&a, &enc(&problem.x)).unwrap();
        let sb = DeviceBuffer::from_host(&a, &enc(&problem.scale)).unwrap();
        let mut wb = DeviceBuffer::<i8>::alloc(&a, w.len()).unwrap();
        let mut yb = DeviceBuffer::<u16>::alloc(&a, 2 * 16).unwrap();
        // The weight upload is queued on a (through the safe layer, so it is tracked there).
        let pinned = PinnedHostBuffer::from_slice(&device, &w).unwrap();
        wb.copy_from_pinned_async_on(&pinned, &a).unwrap();
        let x = Tensor::new(&xb, TensorDesc::nd(DType::Float16, &[2, 64])).unwrap();
        let weight = Tensor::new(&wb, TensorDesc::nd(DType::Int8, &[64, 16])).unwrap();
        let scale = Tensor::new(&sb, TensorDesc::nd(DType::Float16, &[16])).unwrap();
        let y = Tensor::new_mut(&mut yb, TensorDesc::nd(DType::Float16, &[2, 16])).unwrap();
        // Raw phase 1 and phase 2 on b, with no event wait: the C-level hazard.
        let api = h.runtime.api();
        let phase1 = api.aclnnWeightQuantBatchMatmulV2GetWorkspaceSize().unwrap();
        let phase2 = api.aclnnWeightQuantBatchMatmulV2().unwrap();
        let (mut ws, mut exec) = (0u64, std::ptr::null_mut());
        let null = std::ptr::null();
        // SAFETY: live descriptors; optional ones null; valid out-pointers.
        let code = unsafe {
            phase1(
                x.as_raw(),
                weight.as_raw(),
                scale.as_raw(),
                null,
                null,
                null,
                null,
                0,
                y.as_raw(),
                &mut ws,
                &mut exec,
            )
        };
        assert_eq!(code, 0);
        assert_eq!(ws, 0, "per-channel ND needs no workspace");
        // SAFETY: the executor of the phase 1 above, launched once; every buffer outlives the
        // synchronize below.
        assert_eq!(unsafe { phase2(std::ptr::null_mut(), 0, exec, b.raw()) }, 0);
        let (_, v) = sim::take_reports();
        assert_flagged(&v, &["unordered access", "aclnnWeightQuantBatchMatmulV2", "reads it", "aclrtMemcpyAsync"]);
        b.synchronize().unwrap();
        a.synchronize().unwrap();
    }
    let (_, v) = sim::take_reports();
    assert!(v.is_empty(), "nothing else: {v:?}");
    drop((a, b, device));
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Events themselves.
// ---------------------------------------------------------------------------------------------

#[test]
fn destroying_an_event_under_a_pending_stream_wait_is_flagged() {
    if !common::on_sim() {
        return; // reads the in-process simulator's reports
    }
    let v = violations_of(|raw| {
        let (a, b) = (raw.stream(), raw.stream());
        let x = raw.malloc(64);
        raw.copy_async(x, [0u8; 64].as_ptr() as u64, 64, H2D, a);
        let e = raw.event();
        raw.record(e, a);
        raw.wait(b, e);
        raw.destroy_event(e); // b's wait has not run
        assert_eq!(raw.sync(b), 0);
        assert_eq!(raw.sync(a), 0);
        raw.free(x);
        raw.destroy_stream(a);
        raw.destroy_stream(b);
    });
    assert_eq!(v.len(), 1, "{v:?}");
    assert_flagged(&v, &["aclrtDestroyEvent", "has not run"]);
}

#[test]
fn events_complete_when_the_work_before_their_record_has_run() {
    if !common::on_sim() {
        return; // reads the in-process simulator's reports
    }
    let h = common::harness();
    let device = h.runtime.device(0).unwrap();
    device.bind().unwrap();
    let api = h.runtime.api();
    let raw = Raw { api };
    let s = raw.stream();
    let x = raw.malloc(1 << 20);
    let host = vec![9u8; 1 << 20];
    raw.copy_async(x, host.as_ptr() as u64, 1 << 20, H2D, s);
    let (start, end) = (raw.event(), raw.event());
    raw.record(start, s);
    raw.copy_async(x, host.as_ptr() as u64, 1 << 20, H2D, s);
    raw.record(end, s);
    let query = api.aclrtQueryEventStatus().unwrap();
    let wait_status = api.aclrtQueryEventWaitStatus().unwrap();
    let elapsed = api.aclrtEventElapsedTime().unwrap();
    let mut ms = 0f32;
    // SAFETY: valid out-pointer and live events.
    assert_eq!(unsafe { elapsed(&mut ms, start, end) }, sys::ACL_ERROR_INVALID_PARAM, "not complete yet");
    raw.sync_event(end);
    // SAFETY: as above.
    assert_eq!(unsafe { elapsed(&mut ms, start, end) }, 0);
    // 1 MiB at the modelled 25 GB/s.
    assert!((ms - (1 << 20) as f32 / 25.0e6).abs() < 1e-4, "{ms}");
    let mut status = sys::ACL_EVENT_RECORDED_STATUS_NOT_READY;
    // SAFETY: valid out-pointer, live event.
    assert_eq!(unsafe { query(start, &mut status) }, 0);
    assert_eq!(status, sys::ACL_EVENT_RECORDED_STATUS_COMPLETE);
    let mut ws = sys::ACL_EVENT_WAIT_STATUS_NOT_READY;
    // SAFETY: valid out-pointer, live event.
    assert_eq!(unsafe { wait_status(start, &mut ws) }, 0);
    assert_eq!(ws, sys::ACL_EVENT_WAIT_STATUS_COMPLETE, "nobody waits on it");
    // An event without ACL_EVENT_TIME_LINE cannot be timed.
    let with_flag = api.aclrtCreateEventWithFlag().unwrap();
    let mut sync_only: sys::aclrtEvent = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { with_flag(&mut sync_only, sys::ACL_EVENT_SYNC as u32) }, 0);
    raw.record(sync_only, s);
    raw.sync_event(sync_only);
    // SAFETY: live events.
    assert_eq!(unsafe { elapsed(&mut ms, start, sync_only) }, sys::ACL_ERROR_INVALID_PARAM);
    // SAFETY: an unknown flag bit is refused.
    assert_eq!(unsafe { with_flag(&mut sync_only, 0x8000) }, sys::ACL_ERROR_INVALID_PARAM);
    for e in [start, end, sync_only] {
        raw.destroy_event(e);
    }
    assert_eq!(raw.sync(s), 0);
    raw.free(x);
    raw.destroy_stream(s);
    let (_, v) = sim::take_reports();
    assert!(v.is_empty(), "{v:?}");
    drop(device);
    h.assert_clean();
}
