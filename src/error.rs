//! The crate's error type: which layer failed, which API, the raw code and the runtime's text.

use aclnn_sys as sys;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong. Codes stay integers: a newer CANN may return codes this crate
/// does not know, and they are reported as they are.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An ACL runtime call (`acl*`, `aclrt*`) returned a non-zero `aclError`.
    #[error("{api} failed: ACL runtime error {code} ({}){}", runtime_code_name(*code), detail(message))]
    Runtime {
        /// The C function that failed.
        api: &'static str,
        /// The raw `aclError`.
        code: i32,
        /// `aclGetRecentErrMsg` text, when the runtime had any.
        message: Option<String>,
    },
    /// An aclnn call (tensor descriptors, operators) returned a non-zero `aclnnStatus`.
    #[error("{api} failed: aclnn status {code} ({}){}", aclnn_code_name(*code), detail(message))]
    Aclnn {
        /// The C function that failed.
        api: &'static str,
        /// The raw `aclnnStatus`.
        code: i32,
        /// `aclGetRecentErrMsg` text, when the runtime had any.
        message: Option<String>,
    },
    /// A C function returned a null handle (e.g. `aclCreateTensor` on allocation failure).
    #[error("{api} returned null{}", detail(message))]
    NullHandle {
        /// The C function.
        api: &'static str,
        /// `aclGetRecentErrMsg` text, when the runtime had any.
        message: Option<String>,
    },
    /// The CANN libraries or a symbol could not be loaded.
    #[error(transparent)]
    Load(#[from] sys::LoadError),
    /// An argument was rejected by this crate before reaching the C API.
    #[error("invalid {argument}: {problem}; expected {expected}")]
    InvalidArgument {
        /// The argument (or part of it) that is wrong.
        argument: &'static str,
        /// What is wrong with it.
        problem: String,
        /// What would have been accepted.
        expected: String,
    },
    /// A data value lies outside the range the operation accepts.
    #[error("{argument}[{index}] = {value} is out of range; expected a value in {expected}")]
    ValueOutOfRange {
        /// The data argument.
        argument: &'static str,
        /// Flat (row-major) index of the first offending element.
        index: usize,
        /// The offending value, as text.
        value: String,
        /// The accepted range.
        expected: &'static str,
    },
    /// `aclrtSetDevice` refused a device index the process cannot see.
    #[error("device {id} is not visible to this process: {}", visible_hint(*visible))]
    DeviceNotVisible {
        /// The requested device index.
        id: u32,
        /// How many devices the process sees (`aclrtGetDeviceCount`).
        visible: u32,
        /// The runtime's code from `aclrtSetDevice` (e.g. 107001).
        code: i32,
    },
    /// Backend selection or configuration failed.
    #[error("backend: {0}")]
    Backend(String),
}

impl Error {
    /// The raw ACL / aclnn code, if the error came from the C API.
    pub fn code(&self) -> Option<i32> {
        match self {
            Error::Runtime { code, .. } | Error::Aclnn { code, .. } | Error::DeviceNotVisible { code, .. } => {
                Some(*code)
            }
            _ => None,
        }
    }

    /// `true` for device out-of-memory conditions.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(
            self.code(),
            Some(sys::ACL_ERROR_RT_MEMORY_ALLOCATION | sys::ACL_ERROR_RT_DEVICE_OOM | sys::ACL_ERROR_BAD_ALLOC)
        ) && matches!(self, Error::Runtime { .. })
    }

    pub(crate) fn invalid(argument: &'static str, problem: impl Into<String>, expected: impl Into<String>) -> Error {
        Error::InvalidArgument { argument, problem: problem.into(), expected: expected.into() }
    }
}

fn visible_hint(visible: u32) -> String {
    if visible == 0 {
        "no NPU is visible at all; check that the driver sees the cards (`npu-smi info`), that \
         ASCEND_RT_VISIBLE_DEVICES does not hide them, and, in a container, that /dev/davinci*, \
         /dev/davinci_manager, /dev/devmm_svm and /dev/hisi_hdc are mounted"
            .to_string()
    } else {
        format!("it sees {visible} device(s), indices 0 to {} (ASCEND_RT_VISIBLE_DEVICES renumbers them)", visible - 1)
    }
}

fn detail(message: &Option<String>) -> String {
    match message {
        Some(m) if !m.trim().is_empty() => format!(": {}", m.trim()),
        _ => String::new(),
    }
}

/// Name of a runtime status code (ACL or ACL runtime), for messages: every code the headers
/// define ([`sys::STATUS_NAMES`]), else `"unknown code"`.
pub fn runtime_code_name(code: i32) -> &'static str {
    match code {
        sys::ACL_SUCCESS => "ACL_SUCCESS",
        _ => sys::status_name(code).unwrap_or("unknown code"),
    }
}

/// Name of an aclnn status, for messages (aclnn operators also return runtime codes).
pub fn aclnn_code_name(code: i32) -> &'static str {
    match code {
        sys::ACLNN_SUCCESS => "ACLNN_SUCCESS",
        _ => runtime_code_name(code),
    }
}

/// The thread's recent error text (`aclGetRecentErrMsg`), if any.
pub(crate) fn recent_message(api: &sys::Api) -> Option<String> {
    // SAFETY: takes no arguments; returns null or a NUL-terminated string owned by the runtime
    // that stays valid until the next call on this thread, and is copied at once.
    let ptr = unsafe { sys::result::aclGetRecentErrMsg(api) }.ok()?;
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated per the contract above.
    Some(unsafe { std::ffi::CStr::from_ptr(ptr) }.to_string_lossy().into_owned())
}

/// Whether a C function belongs to aclnn (nnopbase descriptors and operators), whose codes are
/// `aclnnStatus`, rather than to the ACL runtime.
fn is_aclnn_layer(api: &str) -> bool {
    api.starts_with("aclnn") || aclnn_sys::LibraryGroup::of_symbol(api) == aclnn_sys::LibraryGroup::Nnopbase
}

/// Converts the outcome of a call through the result layer ([`aclnn_sys::result`]) into this
/// crate's `Result`, with the runtime's recent error text and the right layer.
pub(crate) fn call<T>(api: &sys::Api, outcome: std::result::Result<T, sys::CallError>) -> Result<T> {
    outcome.map_err(|e| match e {
        sys::CallError::Load(load) => Error::Load(load),
        sys::CallError::Status { api: name, code } if is_aclnn_layer(name) => {
            Error::Aclnn { api: name, code, message: recent_message(api) }
        }
        sys::CallError::Status { api: name, code } => Error::Runtime { api: name, code, message: recent_message(api) },
        other => Error::Backend(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_api_code_and_text() {
        let e = Error::Aclnn { api: "aclnnX", code: 161002, message: Some("bad shape".into()) };
        assert_eq!(e.to_string(), "aclnnX failed: aclnn status 161002 (ACLNN_ERR_PARAM_INVALID): bad shape");
        assert_eq!(e.code(), Some(161002));
        let oom = Error::Runtime { api: "aclrtMalloc", code: 207001, message: None };
        assert!(oom.is_out_of_memory());
        assert_eq!(oom.to_string(), "aclrtMalloc failed: ACL runtime error 207001 (ACL_ERROR_RT_MEMORY_ALLOCATION)");
        let unknown = Error::Runtime { api: "aclrtFoo", code: 999_999, message: None };
        assert!(unknown.to_string().contains("999999 (unknown code)"));
    }

    #[test]
    fn every_code_the_headers_define_has_its_name() {
        assert!(sys::STATUS_NAMES.len() > 100);
        for &(code, name) in sys::STATUS_NAMES {
            let shown = if code == 0 { "ACL_SUCCESS" } else { name };
            assert_eq!(runtime_code_name(code), shown);
        }
        assert_eq!(runtime_code_name(507046), "ACL_ERROR_RT_STREAM_SYNC_TIMEOUT");
        assert_eq!(runtime_code_name(507015), "ACL_ERROR_RT_AICORE_EXCEPTION");
        assert_eq!(aclnn_code_name(0), "ACLNN_SUCCESS");
        assert_eq!(aclnn_code_name(561003), "ACLNN_ERR_INNER_FIND_KERNEL_ERROR");
    }
}
