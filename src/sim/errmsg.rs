//! Per-thread recent error messages, as `aclGetRecentErrMsg` reports them.

use std::cell::RefCell;
use std::ffi::{CString, c_char};

thread_local! {
    /// Messages recorded since the last `aclGetRecentErrMsg` on this thread.
    static PENDING: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    /// The string handed out by the last `aclGetRecentErrMsg`; valid until the next call.
    static RETURNED: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// Records a runtime (ACL) error: `EE1001`-style code plus text.
pub(crate) fn runtime(api: &str, code: i32, text: &str) {
    push(format!("EE9999: Inner Error! {api} failed, error code {code}: {text}"));
}

/// Records an aclnn parameter error (161001 / 161002).
pub(crate) fn aclnn_param(text: &str) {
    push(format!("AclNN_Parameter_Error(EZ1001): {text}"));
}

/// Records an aclnn inner/runtime error (361001 and friends).
pub(crate) fn aclnn_inner(text: &str) {
    push(format!("AclNN_Inner_Error(EZ9999): {text}"));
}

fn push(message: String) {
    PENDING.with(|p| p.borrow_mut().push(message));
}

/// `aclGetRecentErrMsg`: the pending messages joined by newlines, then cleared; NULL if none.
pub(crate) fn take() -> *const c_char {
    let joined = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        if p.is_empty() {
            None
        } else {
            let text = p.join("\n").replace('\0', " ");
            p.clear();
            Some(text)
        }
    });
    RETURNED.with(|r| {
        let mut r = r.borrow_mut();
        *r = joined.and_then(|t| CString::new(t).ok());
        r.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
    })
}
