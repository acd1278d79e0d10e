//! Simulated operators by name: what `Api::symbol` finds on the simulator. Each operator module
//! answers for its own entry points, so adding an operator adds a module and a line here and
//! changes no struct.

use std::ffi::c_void;

use super::{elementwise, gmm, int4pack, wqbmm};

/// The operator modules, each resolving its own `aclnnXxxGetWorkspaceSize` / `aclnnXxx`.
const MODULES: &[fn(&str) -> Option<*const c_void>] =
    &[int4pack::lookup, wqbmm::lookup, elementwise::lookup, gmm::lookup];

/// The address of the simulated C function `name`, if the simulator has it.
pub(super) fn lookup(name: &str) -> Option<*const c_void> {
    MODULES.iter().find_map(|module| module(name))
}
