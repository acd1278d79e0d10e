//! Behaviour of the runtime layer: devices, streams, device memory, tensors and the simulator's
//! rules (checked copies, leaks, stream ordering, fault injection). The same bodies run against
//! real CANN with `ACLNN_BACKEND=cann`; simulator-only assertions are skipped there.

mod common;

use std::ffi::c_void;

use aclnn::sys;
use aclnn::{DType, DeviceBuffer, Error, PinnedHostBuffer, Tensor, TensorDesc, Workspace};

#[test]
fn device_stream_and_memory_round_trip() {
    let h = common::harness();
    assert!(h.runtime.device_count().unwrap() >= 1);
    {
        let device = h.runtime.device(0).unwrap();
        let info = device.memory_info().unwrap();
        assert!(info.total > 0 && info.free <= info.total);
        assert!(!device.soc_name().unwrap().is_empty());
        let stream = device.new_stream().unwrap();
        let data: Vec<i32> = (0..1000).collect();
        let buf = DeviceBuffer::from_host(&stream, &data).unwrap();
        assert_eq!(buf.to_vec().unwrap(), data);
        let zeros = DeviceBuffer::<f32>::zeroed(&stream, 33).unwrap();
        assert_eq!(zeros.to_vec().unwrap(), vec![0.0; 33]);
        let empty = DeviceBuffer::<u8>::alloc(&stream, 0).unwrap();
        assert!(empty.is_empty() && empty.as_raw().is_null());
        let after = device.memory_info().unwrap();
        assert!(after.free < info.free, "allocations use device memory");
    }
    h.assert_clean();
}

#[test]
fn length_mismatch_is_a_typed_error() {
    let h = common::harness();
    {
        let stream = h.runtime.device(0).unwrap().new_stream().unwrap();
        let mut buf = DeviceBuffer::<i32>::alloc(&stream, 4).unwrap();
        let err = buf.copy_from_host(&[1, 2, 3]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { argument: "source", .. }), "{err}");
        assert!(err.to_string().contains("4 elements"), "{err}");
        let mut out = vec![0; 5];
        assert!(matches!(buf.copy_to_host(&mut out), Err(Error::InvalidArgument { argument: "destination", .. })));
    }
    h.assert_clean();
}

#[test]
fn async_copies_through_pinned_memory_are_ordered_and_waited_for() {
    let h = common::harness();
    {
        let device = h.runtime.device(0).unwrap();
        let stream = device.new_stream().unwrap();
        let src: Vec<u16> = (0..4096).map(|i| i as u16).collect();
        let pinned = PinnedHostBuffer::from_slice(&device, &src).unwrap();
        let mut dev = DeviceBuffer::<u16>::alloc(&stream, src.len()).unwrap();
        dev.copy_from_pinned_async(&pinned).unwrap();
        let mut back = PinnedHostBuffer::<u16>::zeroed(&device, src.len()).unwrap();
        dev.copy_to_pinned_async(&mut back).unwrap();
        // `as_slice` waits for the stream before handing out the data.
        assert_eq!(back.as_slice().unwrap(), &src[..]);
    }
    h.assert_clean();
}

#[test]
fn tensors_check_their_storage_against_the_buffer() {
    let h = common::harness();
    {
        let stream = h.runtime.device(0).unwrap().new_stream().unwrap();
        let buf = DeviceBuffer::<i32>::alloc(&stream, 12).unwrap();
        let ok = Tensor::new(&buf, TensorDesc::nd(DType::Int32, &[3, 4])).unwrap();
        assert!(!ok.is_writable());
        let too_big = Tensor::new(&buf, TensorDesc::nd(DType::Int32, &[4, 4])).unwrap_err();
        assert!(too_big.to_string().contains("needs 64 bytes but the buffer holds 48"), "{too_big}");
        let negative = Tensor::new(&buf, TensorDesc::nd(DType::Int32, &[-1, 4])).unwrap_err();
        assert!(matches!(negative, Error::InvalidArgument { argument: "tensor view shape", .. }), "{negative}");
        let bad_view = TensorDesc::nd(DType::Int32, &[3, 4]).with_strides(&[8, 1]);
        assert!(Tensor::new(&buf, bad_view).is_err(), "a view reaching past the storage");
        // INT4 storage rounds up to whole bytes: 24 values = 12 bytes.
        let int4 = Tensor::new(&buf, TensorDesc::nd(DType::Int4, &[3, 8])).unwrap();
        assert_eq!(int4.desc().storage_bytes().unwrap(), 12);
        let owned =
            Tensor::owned(DeviceBuffer::<u8>::alloc(&stream, 8).unwrap(), TensorDesc::nd(DType::UInt8, &[8])).unwrap();
        assert!(owned.is_writable());
        let back: DeviceBuffer<u8> = owned.into_buffer().unwrap();
        assert_eq!(back.len(), 8);
    }
    h.assert_clean();
}

#[test]
fn workspace_is_null_for_zero_and_grows_on_demand() {
    let h = common::harness();
    {
        let stream = h.runtime.device(0).unwrap().new_stream().unwrap();
        let mut ws = Workspace::new(&stream);
        assert!(ws.reserve(0).unwrap().is_null());
        assert_eq!(ws.capacity(), 0);
        let a = ws.reserve(100).unwrap();
        assert!(!a.is_null());
        assert_eq!(ws.reserve(50).unwrap(), a, "reused when large enough");
        ws.reserve(1000).unwrap();
        assert_eq!(ws.capacity(), 1000);
    }
    h.assert_clean();
}

#[test]
fn two_devices_and_threads() {
    let h = common::harness();
    if h.runtime.device_count().unwrap() < 2 {
        return;
    }
    {
        let runtime = h.runtime.clone();
        std::thread::scope(|s| {
            for id in 0..2u32 {
                let runtime = runtime.clone();
                s.spawn(move || {
                    let device = runtime.device(id).unwrap();
                    let stream = device.new_stream().unwrap();
                    let data = vec![id as i64; 256];
                    let buf = DeviceBuffer::from_host(&stream, &data).unwrap();
                    assert_eq!(buf.to_vec().unwrap(), data);
                });
            }
        });
    }
    h.assert_clean();
}

#[test]
fn missing_cann_is_an_error_listing_the_paths() {
    let config = sys::LoaderConfig {
        lib_dirs: vec!["/nonexistent/aclnn-test".into()],
        skip_install_dirs: true,
        skip_system_path: true,
    };
    if common::on_sim() {
        let err = aclnn::Runtime::new(aclnn::Backend::cann_with(config)).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Load(sys::LoadError::LibraryNotFound { .. })), "{text}");
        assert!(text.contains("/nonexistent/aclnn-test/libascendcl.so"), "{text}");
        assert!(text.contains("/nonexistent/aclnn-test/libacl_rt.so"), "{text}");
    }
}

/// Simulator rules, asserted through the raw C table with the codes the real runtime returns.
#[cfg(feature = "sim")]
mod simulator {
    use super::*;
    use aclnn::sim;

    fn raw_malloc(api: &sys::Api, size: usize) -> (i32, *mut c_void) {
        let mut p = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        let code = unsafe { api.aclrtMalloc().unwrap()(&mut p, size, sys::ACL_MEM_MALLOC_HUGE_FIRST) };
        (code, p)
    }

    fn raw_free(api: &sys::Api, p: *mut c_void) -> i32 {
        // SAFETY: the simulator checks the pointer.
        unsafe { api.aclrtFree().unwrap()(p) }
    }

    /// Queues a host-to-device copy of `src` on `stream`; `src` must outlive the synchronize.
    fn upload_async(api: &sys::Api, dev: *mut c_void, src: &[u8], stream: sys::aclrtStream) -> i32 {
        // SAFETY: `src` is valid for its length; the callers keep it alive until the stream is
        // synchronized; the device side is checked by the simulator.
        unsafe {
            api.aclrtMemcpyAsync().unwrap()(
                dev,
                src.len(),
                src.as_ptr().cast(),
                src.len(),
                sys::ACL_MEMCPY_HOST_TO_DEVICE,
                stream,
            )
        }
    }

    fn memcpy(api: &sys::Api, dst: *mut c_void, max: usize, src: *const c_void, n: usize, kind: u32) -> i32 {
        // SAFETY: host sides in these tests are valid for `n` bytes; device sides are checked.
        unsafe { api.aclrtMemcpy().unwrap()(dst, max, src, n, kind) }
    }

    #[test]
    fn copies_are_checked_against_live_allocations() {
        if !common::on_sim() {
            return;
        }
        let h = common::harness();
        let device = h.runtime.device(0).unwrap();
        device.bind().unwrap();
        let api = h.runtime.api();
        let (code, dev) = raw_malloc(api, 64);
        assert_eq!(code, 0);
        let mut host = [0u8; 200];
        // In bounds (the runtime pads every allocation by 32 bytes and rounds to 32).
        assert_eq!(memcpy(api, dev, 64, host.as_ptr().cast(), 64, sys::ACL_MEMCPY_HOST_TO_DEVICE), 0);
        assert_eq!(memcpy(api, dev, 96, host.as_ptr().cast(), 96, sys::ACL_MEMCPY_HOST_TO_DEVICE), 0);
        // Out of bounds.
        assert_eq!(
            memcpy(api, dev, 200, host.as_ptr().cast(), 200, sys::ACL_MEMCPY_HOST_TO_DEVICE),
            sys::ACL_ERROR_RT_PARAM_INVALID
        );
        // Wrong kind: a device pointer as the source of a host-to-device copy.
        assert_eq!(memcpy(api, dev, 64, dev, 64, sys::ACL_MEMCPY_HOST_TO_DEVICE), sys::ACL_ERROR_RT_PARAM_INVALID);
        assert_eq!(
            memcpy(api, host.as_mut_ptr().cast(), 64, host.as_ptr().cast(), 64, sys::ACL_MEMCPY_DEVICE_TO_HOST),
            sys::ACL_ERROR_RT_PARAM_INVALID
        );
        let msg = aclnn::sim::stats();
        assert_eq!(msg.live_allocations, 1);
        // count > destMax, null, unknown kind, count 0 (succeeds before any check).
        assert_eq!(
            memcpy(api, dev, 8, host.as_ptr().cast(), 16, sys::ACL_MEMCPY_HOST_TO_DEVICE),
            sys::ACL_ERROR_INVALID_PARAM
        );
        assert_eq!(memcpy(api, std::ptr::null_mut(), 8, host.as_ptr().cast(), 8, 1), sys::ACL_ERROR_INVALID_PARAM);
        assert_eq!(memcpy(api, dev, 8, host.as_ptr().cast(), 8, 9), sys::ACL_ERROR_INVALID_PARAM);
        assert_eq!(memcpy(api, std::ptr::null_mut(), 0, std::ptr::null(), 0, 9), 0);
        // Free, then use after free and double free.
        assert_eq!(raw_free(api, dev), 0);
        assert_eq!(
            memcpy(api, host.as_mut_ptr().cast(), 8, dev, 8, sys::ACL_MEMCPY_DEVICE_TO_HOST),
            sys::ACL_ERROR_RT_PARAM_INVALID
        );
        assert_eq!(raw_free(api, dev), sys::ACL_ERROR_RT_PARAM_INVALID);
        let text = common::recent_message(api);
        assert!(text.contains("already freed"), "{text}");
        // aclrtMalloc rules: size 0 refused; capacity exhausted gives the real OOM code.
        assert_eq!(raw_malloc(api, 0).0, sys::ACL_ERROR_INVALID_PARAM);
        let (code, _) = raw_malloc(api, usize::MAX / 4);
        assert_eq!(code, sys::ACL_ERROR_RT_MEMORY_ALLOCATION);
        drop(device);
        h.assert_clean();
    }

    #[test]
    fn leaks_are_reported_at_device_reset() {
        if !common::on_sim() {
            return;
        }
        let h = common::harness();
        let device = h.runtime.device(1).unwrap();
        device.bind().unwrap();
        let (code, _leaked) = raw_malloc(h.runtime.api(), 1000);
        assert_eq!(code, 0);
        drop(device); // aclrtResetDevice(1) finds the allocation
        let (leaks, violations) = sim::take_reports();
        assert!(violations.is_empty());
        assert_eq!(leaks.len(), 1, "{leaks:?}");
        assert_eq!(leaks[0].at, "aclrtResetDevice(1)");
        assert_eq!(leaks[0].allocations.len(), 1);
        assert_eq!(leaks[0].allocations[0].1, 1000);
        h.assert_clean();
    }

    #[test]
    fn a_missing_synchronize_is_observable() {
        if !common::on_sim() {
            return;
        }
        let h = common::harness();
        {
            let device = h.runtime.device(0).unwrap();
            let stream = device.new_stream().unwrap();
            let api = h.runtime.api();
            let (code, dev) = raw_malloc(api, 16);
            assert_eq!(code, 0);
            let src = [7u8; 16];
            let code = upload_async(api, dev, &src, stream.raw());
            assert_eq!(code, 0);
            let mut out = [0u8; 16];
            assert_eq!(memcpy(api, out.as_mut_ptr().cast(), 16, dev, 16, sys::ACL_MEMCPY_DEVICE_TO_HOST), 0);
            assert_ne!(out, src, "the queued copy has not run before the stream is synchronized");
            // ... and the sanitizer reports the host read as unordered with the queued write.
            let (_, violations) = sim::take_reports();
            assert_eq!(violations.len(), 1, "{violations:?}");
            assert!(violations[0].contains("unordered access") && violations[0].contains("aclrtMemcpyAsync"));
            stream.synchronize().unwrap();
            assert_eq!(memcpy(api, out.as_mut_ptr().cast(), 16, dev, 16, sys::ACL_MEMCPY_DEVICE_TO_HOST), 0);
            assert_eq!(out, src);
            // Freeing memory that queued work still uses is recorded as a violation.
            let code = upload_async(api, dev, &src, stream.raw());
            assert_eq!(code, 0);
            assert_eq!(raw_free(api, dev), 0);
            assert_eq!(stream.synchronize().unwrap_err().code(), Some(sys::ACL_ERROR_RT_DEVICE_MEM_ERROR));
            let (_, violations) = sim::take_reports();
            assert_eq!(violations.len(), 2, "{violations:?}");
            assert!(violations[0].contains("may still use it"), "{violations:?}");
        }
        h.assert_clean();
    }

    #[test]
    fn injected_allocation_failure_is_a_typed_error_and_leaks_nothing() {
        if !common::on_sim() {
            return;
        }
        let h = common::harness();
        {
            let stream = h.runtime.device(0).unwrap().new_stream().unwrap();
            let _first = DeviceBuffer::<u8>::alloc(&stream, 10).unwrap();
            assert!(sim::inject_fault("aclrtMalloc", 2, sys::ACL_ERROR_RT_MEMORY_ALLOCATION));
            let _second = DeviceBuffer::<u8>::alloc(&stream, 10).unwrap();
            let err = DeviceBuffer::<u8>::alloc(&stream, 10).unwrap_err();
            assert!(err.is_out_of_memory(), "{err}");
            assert!(matches!(err, Error::Runtime { api: "aclrtMalloc", code: 207001, message: Some(_) }), "{err:?}");
            assert!(!sim::inject_fault("notAnApi", 1, 1));
        }
        h.assert_clean();
    }

    #[test]
    fn every_step_of_the_runtime_flow_fails_cleanly() {
        if !common::on_sim() {
            return;
        }
        let h = common::harness();
        let flow = || -> aclnn::Result<Vec<i32>> {
            let device = h.runtime.device(0)?;
            let stream = device.new_stream()?;
            let buf = DeviceBuffer::from_host(&stream, &[1, 2, 3, 4])?;
            let t = Tensor::new(&buf, TensorDesc::nd(DType::Int32, &[2, 2]))?;
            drop(t);
            buf.to_vec()
        };
        let mut covered = 0;
        for api in [
            "aclrtSetDevice",
            "aclrtCreateContext",
            "aclrtCreateStream",
            "aclrtMalloc",
            "aclrtMemcpy",
            "aclCreateTensor",
        ] {
            assert!(sim::inject_fault(api, 1, 500_000));
            assert!(flow().is_err(), "failure of {api} surfaces");
            sim::clear_faults();
            covered += 1;
        }
        assert_eq!(covered, 6);
        assert_eq!(flow().unwrap(), vec![1, 2, 3, 4]);
        h.assert_clean();
    }

    #[test]
    fn huge_allocations_return_a_status_and_never_abort() {
        if !common::on_sim() {
            return;
        }
        let h = common::harness();
        {
            let device = h.runtime.device(0).unwrap();
            let stream = device.new_stream().unwrap();
            let total = device.memory_info().unwrap().total;
            assert_eq!(total, sim::hbm_bytes(sim::SOC_A2), "capacity is the SoC's HBM size");
            // 40 GiB is more than this host's RAM on small CI machines: reserved lazily.
            let big = DeviceBuffer::<u8>::alloc(&stream, 40 << 30).unwrap();
            assert!(device.memory_info().unwrap().free <= total - (40u64 << 30));
            // Touch the far end; only those pages become real, and they read back.
            device.bind().unwrap();
            let api = h.runtime.api();
            let end = (big.as_raw() as usize + (40 << 30) - 64) as *mut c_void;
            let mut host = [7u8; 64];
            assert_eq!(memcpy(api, end, 64, host.as_ptr().cast(), 64, sys::ACL_MEMCPY_HOST_TO_DEVICE), 0);
            host.fill(0);
            assert_eq!(memcpy(api, host.as_mut_ptr().cast(), 64, end, 64, sys::ACL_MEMCPY_DEVICE_TO_HOST), 0);
            assert_eq!(host, [7u8; 64]);
            for size in [1usize << 40, 30 << 30, usize::MAX / 2] {
                let err = DeviceBuffer::<u8>::alloc(&stream, size).unwrap_err();
                assert!(err.is_out_of_memory(), "{size} bytes: {err}");
            }
            assert!(DeviceBuffer::<u8>::alloc(&stream, usize::MAX).is_err());
            drop(big);
            let again = DeviceBuffer::<u8>::alloc(&stream, 30 << 30).unwrap();
            drop(again);
        }
        h.assert_clean();
    }

    #[test]
    fn reconfiguring_a_busy_simulator_is_refused() {
        if !common::on_sim() {
            return;
        }
        let h = common::harness();
        let device = h.runtime.device(0).unwrap();
        let err = sim::install(sim::SimConfig::with_soc(sim::SOC_950)).unwrap_err();
        assert!(matches!(err, sim::SimError::Busy { .. }), "{err}");
        drop(device);
        sim::install(sim::SimConfig::default()).unwrap();
        assert!(sim::install(sim::SimConfig { device_count: 65, ..Default::default() }).is_err());
        h.assert_clean();
    }

    #[test]
    fn a_device_the_process_cannot_see_is_explained() {
        if !common::on_sim() {
            return;
        }
        let h = common::harness();
        let err = h.runtime.device(5).unwrap_err();
        assert!(matches!(err, Error::DeviceNotVisible { id: 5, visible: 2, code: 107001 }), "{err:?}");
        assert!(err.to_string().contains("indices 0 to 1"), "{err}");
        {
            let none = aclnn::Runtime::new(
                aclnn::Backend::sim(sim::SimConfig { device_count: 0, ..Default::default() }).unwrap(),
            )
            .unwrap();
            assert_eq!(none.device_count().unwrap(), 0);
            let err = none.device(0).unwrap_err();
            assert!(matches!(err, Error::DeviceNotVisible { id: 0, visible: 0, .. }), "{err:?}");
            assert!(err.to_string().contains("npu-smi info"), "{err}");
        }
        sim::install(sim::SimConfig::default()).unwrap();
        h.assert_clean();
    }
}
