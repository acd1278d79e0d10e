//! Stream-ordered access to memory: every device buffer, workspace and pinned host buffer has a
//! [`Tracker`] that remembers the marks (events) of the work queued on it, so that
//!
//! * work queued on another stream first waits for them on the device (no host block),
//! * the host waits for them before it reads, writes or frees the memory,
//! * and nothing is freed while a mark cannot be confirmed complete (fail closed).
//!
//! A tracker holds the mark of the last write and the marks of the reads since (at most one per
//! stream: a later mark on a stream covers the earlier ones). Waiting, queuing the work and
//! recording the new mark happen under the trackers' locks, so concurrent users of one buffer
//! (shared reads from several threads) never lose a mark.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::Result;
use crate::event::Event;
use crate::stream::Stream;

/// How queued work uses a piece of memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads only.
    Read,
    /// Writes (and maybe reads).
    Write,
}

/// The end of some work queued on a stream: an event recorded after it or, if the event could
/// not be created or recorded, the stream itself (waiting then means synchronizing the stream).
pub(crate) struct Mark {
    stream: Arc<Stream>,
    event: Option<Event>,
}

impl Mark {
    /// Marks the current end of `stream`'s queue.
    fn record(stream: &Arc<Stream>) -> Mark {
        let event = Event::new(stream.device()).ok().filter(|e| e.record(stream).is_ok());
        Mark { stream: stream.clone(), event }
    }

    fn on(&self, stream: &Stream) -> bool {
        self.stream.raw() == stream.raw()
    }

    /// Makes `stream` wait for this mark on the device; a stream mark is waited for on the host.
    fn wait_on_device(&self, stream: &Stream) -> Result<()> {
        match &self.event {
            Some(event) => stream.wait_event(event),
            None => self.stream.synchronize(),
        }
    }

    /// Blocks the host until the marked work has run.
    fn wait_on_host(&self) -> Result<()> {
        match &self.event {
            Some(event) => event.synchronize(),
            None => self.stream.synchronize(),
        }
    }
}

/// The marks of one piece of memory.
#[derive(Default)]
pub(crate) struct Tracker {
    marks: Mutex<Marks>,
}

#[derive(Default)]
struct Marks {
    write: Option<Arc<Mark>>,
    reads: Vec<Arc<Mark>>,
}

impl Marks {
    /// What an access of kind `access` must be ordered after.
    fn pending(&self, access: Access) -> Vec<Arc<Mark>> {
        let mut out: Vec<Arc<Mark>> = self.write.iter().cloned().collect();
        if access == Access::Write {
            out.extend(self.reads.iter().cloned());
        }
        out
    }

    fn add(&mut self, mark: &Arc<Mark>, access: Access) {
        match access {
            Access::Write => {
                self.write = Some(mark.clone());
                self.reads.clear();
            }
            Access::Read => {
                self.reads.retain(|m| !m.on(&mark.stream));
                self.reads.push(mark.clone());
            }
        }
    }

    /// Forgets marks the host has seen complete.
    fn completed(&mut self, access: Access) {
        self.write = None;
        if access == Access::Write {
            self.reads.clear();
        }
    }
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits on the host for every queued use of the memory, before it is freed. An error means
    /// the memory may still be in use: the caller must leak it, not free it.
    pub(crate) fn wait_all_on_host(&self) -> Result<()> {
        host_access(&[(self, Access::Write)], || Ok(()))
    }
}

/// Locks `operands` in address order (so two threads locking the same trackers cannot
/// deadlock), merging repeats of one tracker (a write wins over a read).
fn lock_all<'t>(operands: &[(&'t Tracker, Access)]) -> Vec<(MutexGuard<'t, Marks>, Access)> {
    let mut ops: Vec<(&Tracker, Access)> = operands.to_vec();
    ops.sort_by_key(|(t, _)| *t as *const Tracker as usize);
    let mut merged: Vec<(&Tracker, Access)> = Vec::with_capacity(ops.len());
    for (t, a) in ops {
        match merged.last_mut() {
            Some((last, access)) if std::ptr::eq(*last, t) => {
                if a == Access::Write {
                    *access = Access::Write;
                }
            }
            _ => merged.push((t, a)),
        }
    }
    merged.into_iter().map(|(t, a)| (t.lock(), a)).collect()
}

/// Queues `work` on `stream` as an access to `operands`: `stream` first waits (on the device)
/// for every conflicting use of them queued on other streams, then `work` queues its calls,
/// then a mark recorded after them is remembered by every operand. If a wait fails, nothing is
/// queued. If `work` fails, its mark is still remembered (it may have queued part of its work).
pub(crate) fn enqueue<R>(
    stream: &Arc<Stream>,
    operands: &[(&Tracker, Access)],
    work: impl FnOnce() -> Result<R>,
) -> Result<R> {
    let mut locked = lock_all(operands);
    let mut waited: Vec<*const Mark> = Vec::new();
    for (marks, access) in &locked {
        for mark in marks.pending(*access) {
            let key = Arc::as_ptr(&mark);
            if !mark.on(stream) && !waited.contains(&key) {
                mark.wait_on_device(stream)?;
                waited.push(key);
            }
        }
    }
    let result = work();
    let mark = Arc::new(Mark::record(stream));
    for (marks, access) in &mut locked {
        marks.add(&mark, *access);
    }
    result
}

/// Runs `work` on the host as an access to `operands`, after every conflicting queued use of
/// them has finished (host waits).
pub(crate) fn host_access<R>(operands: &[(&Tracker, Access)], work: impl FnOnce() -> Result<R>) -> Result<R> {
    let mut locked = lock_all(operands);
    let mut waited: Vec<*const Mark> = Vec::new();
    for (marks, access) in &mut locked {
        for mark in marks.pending(*access) {
            let key = Arc::as_ptr(&mark);
            if !waited.contains(&key) {
                mark.wait_on_host()?;
                waited.push(key);
            }
        }
        marks.completed(*access);
    }
    work()
}
