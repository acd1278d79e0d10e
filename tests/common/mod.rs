//! Shared set-up for behaviour tests: the backend is chosen like `Runtime::from_env` does
//! (`ACLNN_BACKEND`, else `cann` when CANN's environment is present, else `sim`), so the same
//! test bodies run on the simulated device and on a real NPU host.
#![allow(dead_code)]

use std::ffi::CStr;
use std::sync::{Arc, Mutex, MutexGuard};

use aclnn::{Backend, ChipFamily, Device, Runtime, Stream};

/// The simulated machine is process-wide (like a driver): tests that check its counters or
/// reconfigure it run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// `true` when the tests run on the simulator.
pub fn on_sim() -> bool {
    !matches!(aclnn::backend_name_from_env(), Ok("cann"))
}

/// A test's hold on the backend: serialises tests and, on the simulator, checks at the end that
/// nothing leaked and no misuse was recorded.
pub struct Harness {
    pub runtime: Runtime,
    _guard: MutexGuard<'static, ()>,
}

/// The backend of this run, with the simulator (if used) configured for `soc`.
pub fn harness_with_soc(soc: &str) -> Harness {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let backend = if on_sim() { sim_backend(soc) } else { Backend::cann() };
    let runtime = Runtime::new(backend).expect("runtime");
    #[cfg(feature = "sim")]
    if on_sim() {
        aclnn::sim::clear_faults();
        let _ = aclnn::sim::take_reports();
    }
    Harness { runtime, _guard: guard }
}

/// The backend of this run with the default simulated SoC (Atlas A2).
pub fn harness() -> Harness {
    harness_with_soc(DEFAULT_SOC)
}

#[cfg(feature = "sim")]
pub const SOC_A2: &str = aclnn::sim::SOC_A2;
#[cfg(not(feature = "sim"))]
pub const SOC_A2: &str = "Ascend910B3";
#[cfg(feature = "sim")]
pub const SOC_950: &str = aclnn::sim::SOC_950;
#[cfg(not(feature = "sim"))]
pub const SOC_950: &str = "Ascend950PR_9599";
pub const DEFAULT_SOC: &str = SOC_A2;

/// A device and a stream of the harness's runtime.
pub struct Rig {
    pub device: Arc<Device>,
    pub stream: Arc<Stream>,
}

impl Rig {
    pub fn new(h: &Harness) -> Rig {
        let device = h.runtime.device(0).expect("device 0");
        let stream = device.new_stream().expect("stream");
        Rig { device, stream }
    }

    pub fn family(&self) -> ChipFamily {
        ChipFamily::from_soc_name(&self.device.soc_name().expect("soc name"))
    }
}

/// Drains and returns the thread's recent error text (`aclGetRecentErrMsg`), empty if none.
pub fn recent_message(api: &aclnn::sys::Api) -> String {
    let f = api.aclGetRecentErrMsg().expect("aclGetRecentErrMsg");
    // SAFETY: no arguments; null or a NUL-terminated string valid until the next call.
    let p = unsafe { f() };
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-null and NUL-terminated; copied at once.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

#[cfg(feature = "sim")]
fn sim_backend(soc: &str) -> Backend {
    Backend::sim(aclnn::sim::SimConfig::with_soc(soc)).expect("simulator idle")
}

#[cfg(not(feature = "sim"))]
fn sim_backend(_soc: &str) -> Backend {
    panic!("these tests need the `sim` feature or ACLNN_BACKEND=cann")
}

impl Harness {
    /// Asserts that the simulated machine holds no device memory, streams, contexts, tensors or
    /// pinned buffers and recorded no leak or misuse (in process, or through the simulator's C
    /// libraries). No-op on real hardware.
    pub fn assert_clean(&self) {
        #[cfg(feature = "sim")]
        if on_sim() {
            let stats = aclnn::sim::stats();
            assert_eq!(stats.live_allocations, 0, "leaked device memory: {stats:?}");
            assert_eq!(stats.live_streams, 0, "leaked streams: {stats:?}");
            assert_eq!(stats.live_contexts, 0, "leaked contexts: {stats:?}");
            assert_eq!(stats.live_tensors, 0, "leaked tensors: {stats:?}");
            assert_eq!(stats.live_descriptors, 0, "leaked scalars, arrays or lists: {stats:?}");
            assert_eq!(stats.live_host_buffers, 0, "leaked pinned buffers: {stats:?}");
            assert_eq!(stats.live_executors, 0, "leaked executors: {stats:?}");
            assert!(stats.leaks.is_empty(), "leak reports: {:?}", stats.leaks);
            assert!(stats.violations.is_empty(), "violations: {:?}", stats.violations);
        }
        if !on_sim() {
            self.assert_clean_through_the_c_library();
        }
    }

    /// On the `cann` backend loaded from the simulator's C libraries (`aclnn-simlib`), the same
    /// check through their `aclnnSimCheck`; nothing to check on a real CANN, which lacks it.
    fn assert_clean_through_the_c_library(&self) {
        type Check = unsafe extern "C" fn(*mut std::ffi::c_char, usize) -> i32;
        // SAFETY: `aclnnSimCheck` has this signature wherever it is exported (aclnn-simlib).
        let Ok(check) = (unsafe { self.runtime.api().symbol::<Check>("aclnnSimCheck") }) else { return };
        let mut text = vec![0u8; 4096];
        // SAFETY: `text` is writable for its length.
        let problems = unsafe { check(text.as_mut_ptr().cast(), text.len()) };
        let text = CStr::from_bytes_until_nul(&text).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
        assert_eq!(problems, 0, "the simulator's C library reports: {text}");
    }
}
