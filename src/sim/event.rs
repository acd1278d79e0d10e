//! Simulated ACL events: create, record, stream-wait, synchronize, query, elapsed time, destroy.
//!
//! An event completes when the work queued on its stream before its last record has run. A
//! stream wait is a queued task that, when it runs, first runs the recording stream up to the
//! record (the device would block the waiting stream until then) and starts no earlier than
//! the record on the modelled timeline. Queries make the device progress: the simulated device
//! runs what the event is waiting for and reports it complete, so polling loops terminate.
//! Destroying an event that a queued stream wait still refers to is a violation (the ACL
//! documentation requires those waits to have passed).

use aclnn_sys::{self as sys, FunctionTable, aclError};

use super::machine::{self, Machine, Record, SimEvent, Task};
use super::runtime::{entry, fail, resolve_stream};
use super::sanitizer;
use super::{errmsg, faults};

/// Flag bits `aclrtCreateEventWithFlag` accepts: SYNC, CAPTURE_STREAM_PROGRESS, TIME_LINE,
/// DEVICE_USE_ONLY, EXTERNAL, IPC.
const KNOWN_FLAGS: u32 = 0x01 | 0x02 | 0x08 | 0x10 | 0x20 | 0x40;

pub(super) fn fill(t: &mut FunctionTable) {
    t.aclrtCreateEvent = Some(create_event);
    t.aclrtCreateEventWithFlag = Some(create_event_with_flag);
    t.aclrtCreateEventExWithFlag = Some(create_event_ex_with_flag);
    t.aclrtDestroyEvent = Some(destroy_event);
    t.aclrtRecordEvent = Some(record_event);
    t.aclrtResetEvent = Some(reset_event);
    t.aclrtQueryEventStatus = Some(query_event_status);
    t.aclrtQueryEventWaitStatus = Some(query_event_wait_status);
    t.aclrtSynchronizeEvent = Some(synchronize_event);
    t.aclrtEventElapsedTime = Some(event_elapsed_time);
    t.aclrtStreamWaitEvent = Some(stream_wait_event);
}

fn create(api: &'static str, out: *mut sys::aclrtEvent, flags: u32) -> aclError {
    if out.is_null() {
        return fail(api, sys::ACL_ERROR_INVALID_PARAM, "event is null");
    }
    if flags & !KNOWN_FLAGS != 0 {
        return fail(api, sys::ACL_ERROR_INVALID_PARAM, format!("event flag {flags:#x} is invalid"));
    }
    machine::with(|m| {
        let Some((_, c)) = m.context() else {
            return fail(api, sys::ACL_ERROR_RT_CONTEXT_NULL, "no current context; set a device first");
        };
        let device = c.device;
        let h = m.new_handle();
        m.events.insert(h, SimEvent { device, flags, record: None, waiters: Vec::new() });
        // SAFETY: checked non-null; the caller passes a writable handle slot.
        unsafe { *out = h as usize as *mut std::ffi::c_void };
        sys::ACL_SUCCESS
    })
}

unsafe extern "C" fn create_event(out: *mut sys::aclrtEvent) -> aclError {
    entry!("aclrtCreateEvent", create("aclrtCreateEvent", out, (sys::ACL_EVENT_SYNC | sys::ACL_EVENT_TIME_LINE) as u32))
}

unsafe extern "C" fn create_event_with_flag(out: *mut sys::aclrtEvent, flag: u32) -> aclError {
    entry!("aclrtCreateEventWithFlag", create("aclrtCreateEventWithFlag", out, flag))
}

unsafe extern "C" fn create_event_ex_with_flag(out: *mut sys::aclrtEvent, flag: u32) -> aclError {
    entry!("aclrtCreateEventExWithFlag", create("aclrtCreateEventExWithFlag", out, flag))
}

/// The live event a handle names.
fn live(m: &Machine, api: &str, event: sys::aclrtEvent) -> Result<u64, aclError> {
    if event.is_null() {
        return Err(fail(api, sys::ACL_ERROR_INVALID_PARAM, "event is null"));
    }
    let h = event as usize as u64;
    if m.events.contains_key(&h) {
        Ok(h)
    } else {
        Err(fail(api, sys::ACL_ERROR_RT_PARAM_INVALID, format!("{h:#x} is not a live event")))
    }
}

unsafe extern "C" fn destroy_event(event: sys::aclrtEvent) -> aclError {
    entry!("aclrtDestroyEvent", {
        machine::with(|m| {
            let h = match live(m, "aclrtDestroyEvent", event) {
                Ok(h) => h,
                Err(c) => return c,
            };
            let e = m.events.remove(&h).expect("checked live");
            for (stream, seq) in e.waiters {
                m.violations.push(format!(
                    "aclrtDestroyEvent({h:#x}) while a wait on it queued on stream {stream:#x} (task {seq}) has not \
                     run (the waits on an event must have passed before it is destroyed)"
                ));
            }
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn record_event(event: sys::aclrtEvent, stream: sys::aclrtStream) -> aclError {
    entry!("aclrtRecordEvent", {
        machine::with(|m| {
            let h = match live(m, "aclrtRecordEvent", event) {
                Ok(h) => h,
                Err(c) => return c,
            };
            let s = match resolve_stream(m, "aclrtRecordEvent", stream) {
                Ok(s) => s,
                Err(c) => return c,
            };
            if m.streams[&s].device != m.events[&h].device {
                return fail(
                    "aclrtRecordEvent",
                    sys::ACL_ERROR_RT_STREAM_CONTEXT,
                    "the event and the stream belong to different devices",
                );
            }
            let seq = m.enqueue(s, Task::Record { event: h }, &[], "aclrtRecordEvent");
            let clock = m.streams[&s].clock.clone();
            m.sync.records += 1;
            if let Some(e) = m.events.get_mut(&h) {
                e.record = Some(Record { stream: s, seq, clock, done_ms: None });
            }
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn reset_event(event: sys::aclrtEvent, stream: sys::aclrtStream) -> aclError {
    entry!("aclrtResetEvent", {
        machine::with(|m| {
            let h = match live(m, "aclrtResetEvent", event) {
                Ok(h) => h,
                Err(c) => return c,
            };
            if let Err(c) = resolve_stream(m, "aclrtResetEvent", stream) {
                return c;
            }
            if let Some(e) = m.events.get_mut(&h) {
                e.record = None;
            }
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn query_event_status(
    event: sys::aclrtEvent,
    status: *mut sys::aclrtEventRecordedStatus,
) -> aclError {
    entry!("aclrtQueryEventStatus", {
        if status.is_null() {
            return fail("aclrtQueryEventStatus", sys::ACL_ERROR_INVALID_PARAM, "status is null");
        }
        machine::with(|m| {
            let h = match live(m, "aclrtQueryEventStatus", event) {
                Ok(h) => h,
                Err(c) => return c,
            };
            if let Err(e) = m.complete_event(h) {
                return fail("aclrtQueryEventStatus", sys::ACL_ERROR_RT_DEVICE_MEM_ERROR, e);
            }
            // SAFETY: checked non-null; the caller passes a writable status.
            unsafe { *status = sys::ACL_EVENT_RECORDED_STATUS_COMPLETE };
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn query_event_wait_status(
    event: sys::aclrtEvent,
    status: *mut sys::aclrtEventWaitStatus,
) -> aclError {
    entry!("aclrtQueryEventWaitStatus", {
        if status.is_null() {
            return fail("aclrtQueryEventWaitStatus", sys::ACL_ERROR_INVALID_PARAM, "status is null");
        }
        machine::with(|m| {
            let h = match live(m, "aclrtQueryEventWaitStatus", event) {
                Ok(h) => h,
                Err(c) => return c,
            };
            // The device makes progress: every queued wait on the event runs.
            let waiters = m.events[&h].waiters.clone();
            for (stream, seq) in waiters {
                if let Err(e) = m.run_until(stream, seq) {
                    return fail("aclrtQueryEventWaitStatus", sys::ACL_ERROR_RT_DEVICE_MEM_ERROR, e);
                }
            }
            let done = m.events.get(&h).is_none_or(|e| e.waiters.is_empty());
            // SAFETY: checked non-null; the caller passes a writable status.
            unsafe {
                *status = if done { sys::ACL_EVENT_WAIT_STATUS_COMPLETE } else { sys::ACL_EVENT_WAIT_STATUS_NOT_READY }
            };
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn synchronize_event(event: sys::aclrtEvent) -> aclError {
    entry!("aclrtSynchronizeEvent", {
        machine::with(|m| {
            let h = match live(m, "aclrtSynchronizeEvent", event) {
                Ok(h) => h,
                Err(c) => return c,
            };
            m.sync.host_syncs += 1;
            match m.complete_event(h) {
                Ok(()) => sys::ACL_SUCCESS,
                Err(e) => fail("aclrtSynchronizeEvent", sys::ACL_ERROR_RT_DEVICE_MEM_ERROR, e),
            }
        })
    })
}

unsafe extern "C" fn event_elapsed_time(ms: *mut f32, start: sys::aclrtEvent, end: sys::aclrtEvent) -> aclError {
    entry!("aclrtEventElapsedTime", {
        if ms.is_null() {
            return fail("aclrtEventElapsedTime", sys::ACL_ERROR_INVALID_PARAM, "ms is null");
        }
        machine::with(|m| {
            let mut times = [0f64; 2];
            for (slot, event) in times.iter_mut().zip([start, end]) {
                let h = match live(m, "aclrtEventElapsedTime", event) {
                    Ok(h) => h,
                    Err(c) => return c,
                };
                if m.events[&h].flags & sys::ACL_EVENT_TIME_LINE as u32 == 0 {
                    return fail(
                        "aclrtEventElapsedTime",
                        sys::ACL_ERROR_INVALID_PARAM,
                        format!("event {h:#x} was created without ACL_EVENT_TIME_LINE"),
                    );
                }
                match m.events[&h].record.as_ref().and_then(|r| r.done_ms) {
                    Some(t) => *slot = t,
                    None => {
                        return fail(
                            "aclrtEventElapsedTime",
                            sys::ACL_ERROR_INVALID_PARAM,
                            format!("event {h:#x} is not recorded or not complete; synchronize it first"),
                        );
                    }
                }
            }
            // SAFETY: checked non-null.
            unsafe { *ms = (times[1] - times[0]) as f32 };
            sys::ACL_SUCCESS
        })
    })
}

unsafe extern "C" fn stream_wait_event(stream: sys::aclrtStream, event: sys::aclrtEvent) -> aclError {
    entry!("aclrtStreamWaitEvent", {
        machine::with(|m| {
            let s = match resolve_stream(m, "aclrtStreamWaitEvent", stream) {
                Ok(s) => s,
                Err(c) => return c,
            };
            let h = match live(m, "aclrtStreamWaitEvent", event) {
                Ok(h) => h,
                Err(c) => return c,
            };
            let Some((target, clock)) = m.events[&h].record.as_ref().map(|r| ((r.stream, r.seq), r.clock.clone()))
            else {
                return sys::ACL_SUCCESS; // never recorded: nothing to wait for
            };
            let seq = m.enqueue(s, Task::Wait { event: h, target }, &[], "aclrtStreamWaitEvent");
            if let Some(st) = m.streams.get_mut(&s) {
                sanitizer::join(&mut st.clock, &clock);
            }
            if let Some(e) = m.events.get_mut(&h) {
                e.waiters.push((s, seq));
            }
            m.sync.stream_waits += 1;
            sys::ACL_SUCCESS
        })
    })
}
