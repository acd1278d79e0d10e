//! The process-level entry point: which backend, `aclInit`, device discovery.

use std::ffi::CStr;
use std::fmt;
use std::sync::Arc;

use aclnn_sys::{self as sys, Api, FunctionTable, LoaderConfig};

use crate::device::Device;
use crate::error::{Error, Result, check_runtime};

/// Which implementation of the C API to use. The safe layer never chooses on its own and never
/// falls back from one to the other.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // built once per runtime; boxing would only add noise
pub enum Backend {
    /// The real CANN libraries, found by the loader.
    Cann(LoaderConfig),
    /// A table of entry points supplied by another implementation (e.g. the simulated device).
    Table {
        /// Name for messages (e.g. `"sim"`).
        name: String,
        /// The entry points.
        table: FunctionTable,
    },
}

impl Backend {
    /// The real CANN libraries with the loader's configuration from the environment
    /// (`ACLNN_LIB_DIR`, `ASCEND_HOME_PATH`, ...).
    pub fn cann() -> Backend {
        Backend::Cann(LoaderConfig::from_env())
    }

    /// A backend named `name` that supplies `table`.
    pub fn table(name: impl Into<String>, table: FunctionTable) -> Backend {
        Backend::Table { name: name.into(), table }
    }

    /// Short name: `"cann"` or the table's name.
    pub fn name(&self) -> &str {
        match self {
            Backend::Cann(_) => "cann",
            Backend::Table { name, .. } => name,
        }
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Backend").field(&self.name()).finish()
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
}

impl Runtime {
    /// Loads (or takes) the backend's entry points and initialises ACL.
    pub fn new(backend: Backend) -> Result<Runtime> {
        let name = backend.name().to_string();
        let api = match backend {
            Backend::Cann(config) => Api::load(config)?,
            Backend::Table { table, .. } => Api::from_table(table),
        };
        let init = api.aclInit()?;
        // SAFETY: a null config path is documented as "no configuration file".
        let code = unsafe { init(std::ptr::null()) };
        if code == sys::ACL_ERROR_REPEAT_INITIALIZE {
            // Already initialised in this process: fine, but do not leave the runtime's note
            // about it to be mistaken for the reason of a later failure.
            let _ = crate::error::recent_message(&api);
        } else {
            check_runtime(&api, "aclInit", code)?;
        }
        Ok(Runtime { inner: Arc::new(RuntimeInner { api, backend: name }) })
    }

    /// The backend chosen by `ACLNN_BACKEND` (see [`crate::backend_from_env`]).
    pub fn from_env() -> Result<Runtime> {
        Runtime::new(crate::backend_from_env()?)
    }

    /// The raw function table, for calls this crate does not wrap.
    pub fn api(&self) -> &Api {
        &self.inner.api
    }

    /// The backend's name (`"cann"`, `"sim"`, ...).
    pub fn backend_name(&self) -> &str {
        &self.inner.backend
    }

    /// Number of devices visible to this process.
    pub fn device_count(&self) -> Result<u32> {
        let f = self.api().aclrtGetDeviceCount()?;
        let mut count = 0u32;
        // SAFETY: `count` is a valid out-pointer.
        check_runtime(self.api(), "aclrtGetDeviceCount", unsafe { f(&mut count) })?;
        Ok(count)
    }

    /// Opens device `id` (`aclrtSetDevice` plus a context of this crate's own).
    pub fn device(&self, id: u32) -> Result<Arc<Device>> {
        Device::open(self.clone(), id)
    }

    /// The SoC name (`aclrtGetSocName`; ACL reports device 0's name).
    pub fn soc_name(&self) -> Result<String> {
        let f = self.api().aclrtGetSocName()?;
        // SAFETY: takes no arguments; returns null or a static NUL-terminated string.
        let ptr = unsafe { f() };
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
