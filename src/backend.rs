//! The one place that reads `ACLNN_BACKEND` and knows which backends this build has.

use crate::error::{Error, Result};
use crate::runtime::Backend;

/// Environment variable that selects the backend: `cann` or `sim`. When unset, see
/// [`backend_from_env`].
pub const BACKEND_ENV: &str = "ACLNN_BACKEND";

/// Variables CANN's `set_env.sh` exports; any of them set means "this is an NPU host".
pub const CANN_ENV: [&str; 2] = ["ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"];

/// The backend named by `ACLNN_BACKEND`.
///
/// When the variable is unset or empty: `cann` if CANN's environment is present (one of
/// [`CANN_ENV`] is set, i.e. `set_env.sh` was sourced), else the simulator (or `cann` in a
/// build without the `sim` feature). Never falls back after a failure: `cann` on a machine
/// whose libraries do not load gives an error from [`crate::Runtime::new`] that lists every
/// path searched, not a silent switch to a fake device.
pub fn backend_from_env() -> Result<Backend> {
    match choice_from_env()? {
        Choice::Cann => Ok(Backend::cann()),
        Choice::Sim => sim_backend(),
    }
}

/// The name (`"cann"` or `"sim"`) of the backend [`backend_from_env`] picks, without building it
/// (so without configuring the simulator).
pub fn backend_name_from_env() -> Result<&'static str> {
    Ok(match choice_from_env()? {
        Choice::Cann => "cann",
        Choice::Sim => "sim",
    })
}

fn choice_from_env() -> Result<Choice> {
    choose(&std::env::var(BACKEND_ENV).unwrap_or_default(), cann_environment_present())
}

#[derive(Debug, PartialEq, Eq)]
enum Choice {
    Cann,
    Sim,
}

/// The decision of [`backend_from_env`], apart from reading the environment.
fn choose(value: &str, cann_environment: bool) -> Result<Choice> {
    match value.trim() {
        "cann" => Ok(Choice::Cann),
        "sim" => Ok(Choice::Sim),
        "" if cann_environment || !cfg!(feature = "sim") => Ok(Choice::Cann),
        "" => Ok(Choice::Sim),
        other => Err(Error::invalid(
            "ACLNN_BACKEND",
            format!("`{other}` is not a backend"),
            if cfg!(feature = "sim") { "`cann` or `sim`" } else { "`cann` (this build has no `sim` feature)" },
        )),
    }
}

#[cfg(feature = "sim")]
fn sim_backend() -> Result<Backend> {
    Backend::sim(crate::sim::SimConfig::default())
}

#[cfg(not(feature = "sim"))]
fn sim_backend() -> Result<Backend> {
    Err(Error::Backend("ACLNN_BACKEND=sim, but this build has no `sim` feature".into()))
}

/// Whether CANN's `set_env.sh` has been sourced in this process's environment.
fn cann_environment_present() -> bool {
    CANN_ENV.iter().any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_npu_host_gets_cann_unless_told_otherwise() {
        assert_eq!(choose("", true).unwrap(), Choice::Cann);
        assert_eq!(choose("sim", true).unwrap(), Choice::Sim);
        assert_eq!(choose(" cann ", false).unwrap(), Choice::Cann);
        let default = if cfg!(feature = "sim") { Choice::Sim } else { Choice::Cann };
        assert_eq!(choose("", false).unwrap(), default);
        let err = choose("npu", false).unwrap_err().to_string();
        assert!(err.contains("`npu` is not a backend") && err.contains("`cann`"), "{err}");
    }
}
