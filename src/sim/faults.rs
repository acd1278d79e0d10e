//! Fault injection: make the Nth call of a named C function fail with a chosen code.

use std::collections::HashMap;
use std::sync::Mutex;

struct Fault {
    /// Calls still to let through before failing.
    skip: u64,
    code: i32,
    /// Keeps failing every call once it has fired.
    persistent: bool,
}

static FAULTS: Mutex<Option<HashMap<String, Vec<Fault>>>> = Mutex::new(None);
static CALLS: Mutex<Option<HashMap<&'static str, u64>>> = Mutex::new(None);

/// How many times each simulated C function was called since the last [`reset_call_counts`]
/// (the injection points a fault sweep can target).
pub fn call_counts() -> HashMap<&'static str, u64> {
    CALLS.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default()
}

/// Zeroes the per-function call counters.
pub fn reset_call_counts() {
    *CALLS.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Makes call number `nth` (1 = the next call) of `api` return `code` without doing anything.
/// Returns `false` (and arms nothing) if `api` is not a simulated function (of the fixed table or
/// of the operator registry) or `nth` is 0.
pub fn inject_fault(api: &str, nth: u64, code: i32) -> bool {
    arm(api, nth, code, false)
}

/// Makes every call of `api` from call number `nth` on (1 = the next call) return `code`
/// without doing anything, until [`clear_faults`]: a device that stays broken. Returns `false`
/// as [`inject_fault`] does.
pub fn inject_persistent_fault(api: &str, nth: u64, code: i32) -> bool {
    arm(api, nth, code, true)
}

fn arm(api: &str, nth: u64, code: i32, persistent: bool) -> bool {
    let known = aclnn_sys::FUNCTION_NAMES.contains(&api) || super::registry::lookup(api).is_some();
    if !known || nth == 0 {
        return false;
    }
    let mut guard = FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    let fault = Fault { skip: nth - 1, code, persistent };
    guard.get_or_insert_with(HashMap::new).entry(api.to_string()).or_default().push(fault);
    true
}

/// Disarms every injected fault.
pub fn clear_faults() {
    *FAULTS.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Called at the top of every simulated function: the code to fail with, if a fault fires now.
pub(crate) fn check(api: &'static str) -> Option<i32> {
    *CALLS.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).entry(api).or_insert(0) += 1;
    let mut guard = FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    let faults = guard.as_mut()?.get_mut(api)?;
    let mut fired = None;
    faults.retain_mut(|f| {
        if f.skip == 0 {
            if fired.is_none() {
                fired = Some(f.code);
                return f.persistent;
            }
            true
        } else {
            f.skip -= 1;
            true
        }
    });
    fired
}
