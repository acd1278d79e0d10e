//! The process-level entry point: which backend, `aclInit`, device discovery.

use std::ffi::CStr;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aclnn_sys::{self as sys, Api, FunctionTable, LoaderConfig};

use crate::device::Device;
use aclnn_sys::result as c;

use crate::error::{Error, Result, call};

/// Which implementation of the C API to use. The safe layer never chooses on its own and never
/// falls back from one to the other.
///
/// The safe layer trusts every entry point of its backend to behave as the C API documents
/// (valid out-pointers, live strings, memory that is what it claims). A backend is therefore
/// either the real CANN libraries ([`Backend::cann`]), the simulated device ([`Backend::sim`]),
/// or a table whose author promises that contract ([`Backend::table`], `unsafe`).
#[derive(Clone)]
pub struct Backend {
    kind: Kind,
}

#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // built once per runtime; boxing would only add noise
enum Kind {
    Cann(LoaderConfig),
    Table { name: String, table: FunctionTable },
}

impl Backend {
    /// The real CANN libraries with the loader's configuration from the environment
    /// (`ACLNN_LIB_DIR`, `ASCEND_HOME_PATH`, ...).
    pub fn cann() -> Backend {
        Backend::cann_with(LoaderConfig::from_env())
    }

    /// The real CANN libraries, searched as `config` says.
    pub fn cann_with(config: LoaderConfig) -> Backend {
        Backend { kind: Kind::Cann(config) }
    }

    /// The simulated device, configured as `config` says (see [`crate::sim::install`]).
    #[cfg(feature = "sim")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sim")))]
    pub fn sim(config: crate::sim::SimConfig) -> Result<Backend> {
        let table = crate::sim::install(config).map_err(|e| Error::Backend(e.to_string()))?;
        // SAFETY: the simulator's table implements every entry as the C API documents it; that
        // is what the simulator exists for, and its own tests hold it to that.
        Ok(unsafe { Backend::table("sim", table) })
    }

    /// A backend named `name` that supplies `table`.
    ///
    /// # Safety
    /// Every entry of `table` must behave as the ACL / aclnn C function of the same name is
    /// documented to, for as long as any object of the runtime lives: out-pointers written on
    /// success, returned strings NUL-terminated and valid until the documented point, device and
    /// host memory of the sizes asked for, handles valid until destroyed, asynchronous work
    /// ordered as on its stream, and thread-safety as in ACL. The safe layer builds its
    /// soundness on these promises; a table that breaks one can cause undefined behaviour in
    /// safe code.
    ///
    /// Safe code cannot hand the safe layer a table:
    ///
    /// ```compile_fail,E0133
    /// let table = aclnn::sys::FunctionTable::default();
    /// let backend = aclnn::Backend::table("mine", table); // error: call to unsafe function
    /// ```
    pub unsafe fn table(name: impl Into<String>, table: FunctionTable) -> Backend {
        Backend { kind: Kind::Table { name: name.into(), table } }
    }

    /// Short name: `"cann"` or the table's name.
    pub fn name(&self) -> &str {
        match &self.kind {
            Kind::Cann(_) => "cann",
            Kind::Table { name, .. } => name,
        }
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Backend").field(&self.name()).finish()
    }
}

/// Resources this runtime gave up on instead of releasing them while they might still be in
/// use: when the wait that guards a free fails (a failed synchronize, a failed event query), the
/// memory, stream or event is leaked and counted here, never freed while the device may still
/// touch it. All zero in a healthy process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leaked {
    /// Device allocations not freed.
    pub device_buffers: u64,
    /// Their bytes.
    pub device_bytes: u64,
    /// Pinned host buffers not freed.
    pub host_buffers: u64,
    /// Their bytes.
    pub host_bytes: u64,
    /// Streams not destroyed.
    pub streams: u64,
    /// Events not destroyed.
    pub events: u64,
    /// Descriptors (tensors, tensor lists, scalars, arrays) whose destroy call failed.
    pub descriptors: u64,
    /// Executors possibly leaked: unlaunched ones whose `aclDestroyAclOpExecutor` failed, and
    /// ones whose phase 2 failed (CANN does not document whether it released them; they are
    /// never destroyed twice).
    pub executors: u64,
    /// Devices left set (context not destroyed, `aclrtResetDevice` not called) because
    /// something on them was leaked: resetting would free it under possibly pending work.
    pub devices: u64,
}

/// The counters behind [`Leaked`].
#[derive(Default)]
pub(crate) struct LeakCounters {
    device_buffers: AtomicU64,
    device_bytes: AtomicU64,
    host_buffers: AtomicU64,
    host_bytes: AtomicU64,
    streams: AtomicU64,
    events: AtomicU64,
    descriptors: AtomicU64,
    executors: AtomicU64,
    devices: AtomicU64,
}

/// What was leaked, for [`LeakCounters::add`].
pub(crate) enum Leak {
    DeviceBuffer(usize),
    HostBuffer(usize),
    Stream,
    Event,
    Descriptor,
    Executor,
    Device,
}

impl LeakCounters {
    pub(crate) fn add(&self, leak: Leak) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        match leak {
            Leak::DeviceBuffer(bytes) => {
                add(&self.device_buffers, 1);
                add(&self.device_bytes, bytes as u64);
            }
            Leak::HostBuffer(bytes) => {
                add(&self.host_buffers, 1);
                add(&self.host_bytes, bytes as u64);
            }
            Leak::Stream => add(&self.streams, 1),
            Leak::Event => add(&self.events, 1),
            Leak::Descriptor => add(&self.descriptors, 1),
            Leak::Executor => add(&self.executors, 1),
            Leak::Device => add(&self.devices, 1),
        }
    }

    fn snapshot(&self) -> Leaked {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Leaked {
            device_buffers: get(&self.device_buffers),
            device_bytes: get(&self.device_bytes),
            host_buffers: get(&self.host_buffers),
            host_bytes: get(&self.host_bytes),
            streams: get(&self.streams),
            events: get(&self.events),
            descriptors: get(&self.descriptors),
            executors: get(&self.executors),
            devices: get(&self.devices),
        }
    }
}

/// An initialised ACL runtime on one backend. Cheap to clone; `Send + Sync`.
///
/// `aclInit` runs when the runtime is created. ACL allows it once per process, so a second
/// runtime (or a host application that already initialised ACL, such as torch_npu) is accepted:
/// `ACL_ERROR_REPEAT_INITIALIZE` is not an error here. `aclFinalize` is left to process exit, as
/// other users of ACL in the same process may still need it.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    api: Api,
    backend: String,
    leaks: LeakCounters,
}

impl Runtime {
    /// Loads (or takes) the backend's entry points and initialises ACL.
    pub fn new(backend: Backend) -> Result<Runtime> {
        let name = backend.name().to_string();
        let api = match backend.kind {
            Kind::Cann(config) => Api::load(config)?,
            Kind::Table { table, .. } => Api::from_table(table),
        };
        // SAFETY: a null config path is documented as "no configuration file".
        let outcome = unsafe { c::aclInit(&api, std::ptr::null()) };
        if let Err(sys::CallError::Status { code: sys::ACL_ERROR_REPEAT_INITIALIZE, .. }) = outcome {
            // Already initialised in this process: fine, but do not leave the runtime's note
            // about it to be mistaken for the reason of a later failure.
            let _ = crate::error::recent_message(&api);
        } else {
            call(&api, outcome)?;
        }
        Ok(Runtime { inner: Arc::new(RuntimeInner { api, backend: name, leaks: LeakCounters::default() }) })
    }

    /// The backend chosen by `ACLNN_BACKEND` (see [`crate::backend_from_env`]).
    pub fn from_env() -> Result<Runtime> {
        Runtime::new(crate::backend_from_env()?)
    }

    /// The raw function table, for calls this crate does not wrap.
    pub fn api(&self) -> &Api {
        &self.inner.api
    }

    /// What this runtime leaked on purpose because a guarding wait failed (see [`Leaked`]).
    pub fn leaked(&self) -> Leaked {
        self.inner.leaks.snapshot()
    }

    pub(crate) fn leaks(&self) -> &LeakCounters {
        &self.inner.leaks
    }

    /// The backend's name (`"cann"`, `"sim"`, ...).
    pub fn backend_name(&self) -> &str {
        &self.inner.backend
    }

    /// Number of devices visible to this process.
    pub fn device_count(&self) -> Result<u32> {
        let mut count = 0u32;
        // SAFETY: `count` is a valid out-pointer.
        call(self.api(), unsafe { c::aclrtGetDeviceCount(self.api(), &mut count) })?;
        Ok(count)
    }

    /// Opens device `id` (`aclrtSetDevice` plus a context of this crate's own).
    pub fn device(&self, id: u32) -> Result<Arc<Device>> {
        Device::open(self.clone(), id)
    }

    /// The SoC name (`aclrtGetSocName`; ACL reports device 0's name).
    pub fn soc_name(&self) -> Result<String> {
        // SAFETY: takes no arguments; returns null or a static NUL-terminated string.
        let ptr = call(self.api(), unsafe { c::aclrtGetSocName(self.api()) })?;
        if ptr.is_null() {
            return Err(Error::NullHandle {
                api: "aclrtGetSocName",
                message: crate::error::recent_message(self.api()),
            });
        }
        // SAFETY: non-null, NUL-terminated, owned by the runtime; copied at once.
        Ok(unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned())
    }
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime").field("backend", &self.inner.backend).field("api", &self.inner.api).finish()
    }
}
