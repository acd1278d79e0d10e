//! A simulated Ascend device that implements the C-level function table in Rust.
//!
//! The simulator is a backend like the real CANN libraries: it fills an
//! [`aclnn_sys::FunctionTable`] with `extern "C"` functions that behave like ACL (device memory
//! that is not host memory, checked copies with the real status codes, per-thread current
//! context, streams that run queued work only when synchronized, leak reports) and like the
//! aclnn operators (same check order, status codes and bytes). The safe layer cannot tell it from
//! real hardware; tests use the inspection functions here ([`stats`], [`inject_fault`], ...) to
//! assert what happened underneath.
//!
//! The simulated machine is process-wide, like a real driver. [`install`] (re)configures it while
//! it is idle and returns its function table.

mod elementwise;
mod errmsg;
mod event;
mod faults;
mod gmm;
mod int4pack;
mod machine;
mod registry;
mod runtime;
mod sanitizer;
mod tensor;
mod wqbmm;

use aclnn_sys::FunctionTable;

pub use faults::{call_counts, clear_faults, inject_fault, inject_persistent_fault, reset_call_counts};
pub use machine::{
    CopyCounters, Discarded, LeakReport, SimStats, SyncCounters, discard_all, reset_counters, stats, take_reports,
};

/// SoC name of an Atlas A2 part (Ascend 910B, NZ C0 = 32 bytes).
pub const SOC_A2: &str = "Ascend910B3";
/// SoC name of an Atlas A3 part (Ascend 910_93, same rules as A2).
pub const SOC_A3: &str = "Ascend910_9391";
/// SoC name of an Ascend 950 part (arch DAV_3510, NZ C0 = 16 or 8 bytes).
pub const SOC_950: &str = "Ascend950PR_9599";

/// How the simulated machine looks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Number of devices (`aclrtGetDeviceCount`); 0 models a host (or container) that sees none.
    pub device_count: u32,
    /// Device memory per device in bytes; allocations beyond it fail with the real
    /// out-of-memory code (207001). Large allocations are reserved lazily (address space
    /// only), so a capacity above the host's RAM is fine until the memory is written.
    pub memory_per_device: u64,
    /// SoC name reported by `aclrtGetSocName`; selects the operator's chip-dependent rules.
    pub soc_name: String,
}

impl Default for SimConfig {
    /// Two Atlas A2 devices (Ascend910B3) with 64 GiB of HBM each.
    fn default() -> Self {
        SimConfig::with_soc(SOC_A2)
    }
}

impl SimConfig {
    /// The default machine (two devices) with another SoC name; each device gets that SoC's
    /// HBM size ([`hbm_bytes`]).
    pub fn with_soc(soc_name: &str) -> SimConfig {
        SimConfig { device_count: 2, memory_per_device: hbm_bytes(soc_name), soc_name: soc_name.to_string() }
    }
}

/// HBM capacity per device of a SoC, as the simulator models it: 32 GiB for Ascend910B4,
/// 128 GiB for the Ascend 950 family, 64 GiB for every other part (910B1–B3, 910_93 dies).
pub fn hbm_bytes(soc_name: &str) -> u64 {
    const GIB: u64 = 1 << 30;
    if soc_name.starts_with("Ascend910B4") {
        32 * GIB
    } else if soc_name.starts_with("Ascend950") {
        128 * GIB
    } else {
        64 * GIB
    }
}

/// Why the simulator could not be configured.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// Another configuration is in use and still has live devices or memory.
    #[error(
        "the simulated machine is in use with another configuration ({current}); \
         release its devices first or request the same configuration"
    )]
    Busy {
        /// Description of the configuration in use.
        current: String,
    },
    /// The configuration cannot describe a machine.
    #[error("invalid simulator configuration: {0}")]
    Invalid(String),
}

/// Configures the simulated machine (when idle, or when `config` equals the one in use) and
/// returns its function table.
pub fn install(config: SimConfig) -> Result<FunctionTable, SimError> {
    if config.device_count > 64 {
        return Err(SimError::Invalid(format!("device_count is {}, expected 0 to 64", config.device_count)));
    }
    if config.soc_name.is_empty() || config.soc_name.contains('\0') {
        return Err(SimError::Invalid("soc_name must be a non-empty C string".into()));
    }
    machine::configure(config)?;
    Ok(table())
}

/// The simulator's function table (with whatever configuration is current).
pub fn table() -> FunctionTable {
    let mut t = FunctionTable::default();
    runtime::fill(&mut t);
    tensor::fill(&mut t);
    tensor::fill_args(&mut t);
    int4pack::fill(&mut t);
    wqbmm::fill(&mut t);
    t.lookup = Some(registry::lookup);
    t
}
