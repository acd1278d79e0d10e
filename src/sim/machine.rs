//! The simulated machine: devices, device memory, contexts, streams, tensors and counters.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use aclnn_sys as sys;

use super::sanitizer::{self, Access, Clock, Epoch, HOST, History};
use super::tensor::{SimArg, SimTensor};
use super::{SimConfig, SimError};

/// First simulated device address. Above every user-space address on x86-64 and aarch64, so a
/// host pointer can never be mistaken for device memory and vice versa.
pub(crate) const DEVICE_BASE: u64 = 0x0100_0000_0000_0000;
/// Address space per device.
const DEVICE_SPAN: u64 = 1 << 44;
/// Padding the runtime adds to every allocation before rounding (abi.md 5.6).
const ALLOC_PADDING: u64 = 32;
/// Allocation granularity and alignment.
const ALLOC_ALIGN: u64 = 32;
/// First context / stream handle; handles are never reused.
const HANDLE_BASE: u64 = 0x5A00_0000;

/// Bytes moved, per copy kind (both synchronous and stream-ordered copies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyCounters {
    /// Host to device bytes.
    pub host_to_device: u64,
    /// Device to host bytes.
    pub device_to_host: u64,
    /// Device to device bytes.
    pub device_to_device: u64,
    /// Host to host bytes.
    pub host_to_host: u64,
    /// Number of copy operations performed.
    pub copies: u64,
}

/// Resources found alive when a device was reset, a context destroyed or ACL finalized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeakReport {
    /// What released them: e.g. `aclrtResetDevice(0)`.
    pub at: String,
    /// Device allocations still live (address, requested bytes).
    pub allocations: Vec<(u64, u64)>,
    /// Streams still live.
    pub streams: usize,
    /// Contexts created with `aclrtCreateContext` and not destroyed.
    pub contexts: usize,
    /// Tensor descriptors not destroyed (reported by `aclFinalize`).
    pub tensors: usize,
    /// Pinned host buffers not freed (reported by `aclFinalize`).
    pub host_buffers: usize,
    /// Events not destroyed.
    pub events: usize,
}

/// A snapshot of the machine, for tests and benchmarks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SimStats {
    /// Live device allocations.
    pub live_allocations: usize,
    /// Bytes of live device allocations, as requested.
    pub live_bytes: u64,
    /// Live streams created with `aclrtCreateStream`.
    pub live_streams: usize,
    /// Live user contexts.
    pub live_contexts: usize,
    /// Live tensor descriptors.
    pub live_tensors: usize,
    /// Live scalars, int/float/bool arrays and tensor lists.
    pub live_descriptors: usize,
    /// Live pinned host buffers.
    pub live_host_buffers: usize,
    /// Operator executors from phase 1 never launched nor destroyed.
    pub live_executors: usize,
    /// Live events.
    pub live_events: usize,
    /// Devices currently held by `aclrtSetDevice`.
    pub devices_in_use: usize,
    /// Bytes moved per copy kind since the last [`reset_counters`].
    pub copies: CopyCounters,
    /// Host synchronisations and device-side waits since the last [`reset_counters`].
    pub sync: SyncCounters,
    /// The host's position on the modelled timeline, in ms (see [`crate::sim`]'s timing model).
    pub host_ms: f64,
    /// Leak reports since the last [`take_reports`].
    pub leaks: Vec<LeakReport>,
    /// Misuse the real runtime would not report but that corrupts data (freeing memory that
    /// queued work still touches, destroying a stream with pending work, ...).
    pub violations: Vec<String>,
}

pub(crate) struct Allocation {
    pub device: u32,
    pub size: u64,
    pub data: DeviceBytes,
}

/// Allocations up to this size are filled with a garbage pattern at allocation time; larger
/// ones are reserved lazily (address space only) and read as zero until written.
const EAGER_FILL_LIMIT: u64 = 64 << 20;

/// Host memory behind one simulated device allocation.
///
/// Small allocations are filled with `0xA5` (real device memory holds garbage, and a fixed
/// pattern makes reads of never-written memory visible in tests). Large ones are an anonymous
/// mapping without swap reservation, so pages appear only on first touch and a 40 GiB
/// allocation on a 24 GiB host costs nothing until it is written.
pub(crate) enum DeviceBytes {
    Filled(Vec<u8>),
    Lazy(memmap2::MmapMut),
}

impl DeviceBytes {
    /// Backs `len` bytes, or `None` when the host cannot (never aborts the process).
    fn new(len: u64) -> Option<DeviceBytes> {
        let len_usize = usize::try_from(len).ok()?;
        if len <= EAGER_FILL_LIMIT {
            let mut bytes = Vec::new();
            bytes.try_reserve_exact(len_usize).ok()?;
            bytes.resize(len_usize, 0xA5);
            return Some(DeviceBytes::Filled(bytes));
        }
        memmap2::MmapOptions::new().len(len_usize).no_reserve_swap().map_anon().ok().map(DeviceBytes::Lazy)
    }
}

impl std::ops::Deref for DeviceBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            DeviceBytes::Filled(bytes) => bytes,
            DeviceBytes::Lazy(map) => map,
        }
    }
}

impl std::ops::DerefMut for DeviceBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            DeviceBytes::Filled(bytes) => bytes,
            DeviceBytes::Lazy(map) => map,
        }
    }
}

/// A live `aclrtMallocHost` buffer. `id` tells a buffer from a later one at the same address.
pub(crate) struct HostBuffer {
    pub layout: std::alloc::Layout,
    pub id: u64,
}

pub(crate) struct Context {
    pub device: u32,
    pub user: bool,
    pub default_stream: u64,
}

pub(crate) struct Stream {
    pub context: u64,
    pub device: u32,
    pub user: bool,
    pub queue: VecDeque<Queued>,
    /// Sequence number of the last task queued (tasks are numbered from 1 per stream).
    pub seq: u64,
    /// Sequence number of the last task run.
    pub executed: u64,
    /// What this stream's next task is ordered after (see `sanitizer`).
    pub clock: Clock,
    /// Device timeline: when the last task run on this stream finished, in ms.
    pub time_ms: f64,
}

impl Stream {
    pub fn new(context: u64, device: u32, user: bool) -> Stream {
        Stream { context, device, user, queue: VecDeque::new(), seq: 0, executed: 0, clock: Clock::new(), time_ms: 0.0 }
    }
}

/// A task in a stream's queue.
pub(crate) struct Queued {
    pub seq: u64,
    /// Host time at which it was queued: it cannot start earlier.
    pub not_before: f64,
    pub task: Task,
}

/// A simulated device kernel: runs on the machine when its stream is synchronized.
pub(crate) type KernelFn = Box<dyn FnOnce(&mut Machine) -> Result<(), String> + Send>;

/// Work queued on a stream; run when the stream (or an event after it) is synchronized.
pub(crate) enum Task {
    /// `aclrtMemcpyAsync`. `host` names the pinned buffer (base, id) a host side lay in when the
    /// copy was queued, so that a copy into a buffer freed since is caught, never performed.
    Copy { dst: u64, src: u64, count: u64, kind: sys::aclrtMemcpyKind, host: Option<(u64, u64)> },
    /// An operator launch with a modelled duration.
    Kernel { name: &'static str, cost_ms: f64, run: KernelFn },
    /// `aclrtRecordEvent`.
    Record { event: u64 },
    /// `aclrtStreamWaitEvent`: runs the recording stream up to the record `(stream, seq)` first.
    Wait { event: u64, target: (u64, u64) },
}

/// A simulated `aclrtEvent`.
pub(crate) struct SimEvent {
    pub device: u32,
    pub flags: u32,
    pub record: Option<Record>,
    /// Queued `Wait` tasks on this event that have not run: (stream, seq).
    pub waiters: Vec<(u64, u64)>,
}

/// The last `aclrtRecordEvent` of an event.
pub(crate) struct Record {
    pub stream: u64,
    pub seq: u64,
    /// The recording stream's clock at the record.
    pub clock: Clock,
    /// When the record ran on the device timeline; `None` while it is queued.
    pub done_ms: Option<f64>,
}

/// Host-side synchronisation, counted: what a pipeline costs the host.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SyncCounters {
    /// Blocking host waits: `aclrtSynchronizeStream`, `aclrtSynchronizeDevice`,
    /// `aclrtSynchronizeEvent`.
    pub host_syncs: u64,
    /// Device-side waits queued with `aclrtStreamWaitEvent` (no host block).
    pub stream_waits: u64,
    /// Events recorded.
    pub records: u64,
}

#[derive(Default)]
pub(crate) struct Device {
    pub set_count: u32,
    pub used: u64,
    pub next_offset: u64,
    pub default_context: Option<u64>,
}

pub(crate) struct Machine {
    pub config: SimConfig,
    pub soc_cstr: &'static std::ffi::CStr,
    pub initialized: bool,
    pub devices: Vec<Device>,
    pub allocations: BTreeMap<u64, Allocation>,
    pub freed: BTreeMap<u64, u64>,
    pub host_buffers: BTreeMap<u64, HostBuffer>,
    pub contexts: HashMap<u64, Context>,
    pub streams: HashMap<u64, Stream>,
    /// Tensor descriptors by handle, kept inside the machine (behind its lock).
    pub tensors: HashMap<u64, SimTensor>,
    /// Scalars, arrays and tensor lists by handle.
    pub args: HashMap<u64, SimArg>,
    pub events: HashMap<u64, SimEvent>,
    /// Executors handed out by phase 1 and not yet launched or destroyed, by handle.
    pub executors: HashMap<u64, Box<dyn std::any::Any + Send>>,
    pub next_handle: u64,
    pub counters: CopyCounters,
    pub sync: SyncCounters,
    pub leaks: Vec<LeakReport>,
    pub violations: Vec<String>,
    /// What the host has seen finish (see `sanitizer`).
    pub host_clock: Clock,
    /// Access history per allocation (device base address or pinned host base address).
    pub history: HashMap<u64, History>,
    /// Host timeline in ms: advanced by synchronous copies and by waiting for the device.
    pub host_ms: f64,
}

static MACHINE: Mutex<Option<Machine>> = Mutex::new(None);

/// SoC names handed out by `aclrtGetSocName` must outlive any reconfiguration: each distinct
/// name is leaked once.
fn intern(name: &str) -> &'static std::ffi::CStr {
    static NAMES: Mutex<Vec<&'static std::ffi::CStr>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.iter().find(|n| n.to_bytes() == name.as_bytes()) {
        return n;
    }
    let c = std::ffi::CString::new(name.replace('\0', "")).unwrap_or_default();
    let leaked: &'static std::ffi::CStr = Box::leak(c.into_boxed_c_str());
    names.push(leaked);
    leaked
}

thread_local! {
    /// The calling thread's current context handle (0 = none).
    static CURRENT: Cell<u64> = const { Cell::new(0) };
}

pub(crate) fn current_context() -> u64 {
    CURRENT.with(|c| c.get())
}

pub(crate) fn set_current_context(handle: u64) {
    CURRENT.with(|c| c.set(handle));
}

/// Modelled bandwidths (bytes per ms) of the timing model.
const PCIE_BYTES_PER_MS: f64 = 25.0e6;
const HBM_BYTES_PER_MS: f64 = 800.0e6;
const HOST_BYTES_PER_MS: f64 = 10.0e6;

/// Modelled duration of a copy of `count` bytes of `kind`.
fn copy_ms(count: u64, dst: u64, src: u64) -> f64 {
    let rate = match (Machine::is_device_address(dst), Machine::is_device_address(src)) {
        (true, true) => HBM_BYTES_PER_MS,
        (false, false) => HOST_BYTES_PER_MS,
        _ => PCIE_BYTES_PER_MS,
    };
    count as f64 / rate
}

impl Machine {
    fn new(config: SimConfig) -> Machine {
        let soc_cstr = intern(&config.soc_name);
        let devices = (0..config.device_count).map(|_| Device::default()).collect();
        Machine {
            config,
            soc_cstr,
            initialized: false,
            devices,
            allocations: BTreeMap::new(),
            freed: BTreeMap::new(),
            host_buffers: BTreeMap::new(),
            contexts: HashMap::new(),
            streams: HashMap::new(),
            tensors: HashMap::new(),
            args: HashMap::new(),
            events: HashMap::new(),
            executors: HashMap::new(),
            next_handle: HANDLE_BASE,
            counters: CopyCounters::default(),
            sync: SyncCounters::default(),
            leaks: Vec::new(),
            violations: Vec::new(),
            host_clock: Clock::new(),
            history: HashMap::new(),
            host_ms: 0.0,
        }
    }

    fn is_idle(&self) -> bool {
        self.devices.iter().all(|d| d.set_count == 0)
            && self.allocations.is_empty()
            && self.streams.is_empty()
            && self.contexts.is_empty()
            && self.events.is_empty()
    }

    pub fn new_handle(&mut self) -> u64 {
        self.next_handle += 0x40;
        self.next_handle
    }

    /// The thread's current context, if it is alive.
    pub fn context(&self) -> Option<(u64, &Context)> {
        let h = current_context();
        self.contexts.get(&h).map(|c| (h, c))
    }

    /// Whether `addr` lies in the simulated device address space.
    pub fn is_device_address(addr: u64) -> bool {
        addr >= DEVICE_BASE
    }

    /// The live allocation containing `[addr, addr + len)`, with the offset of `addr` in it.
    /// Accesses may reach into the allocation's padding, as on the real runtime.
    pub fn locate(&self, addr: u64, len: u64) -> Result<(u64, u64), String> {
        let Some((&base, alloc)) = self.allocations.range(..=addr).next_back() else {
            return Err(self.describe_bad_address(addr));
        };
        let capacity = alloc.data.len() as u64;
        if addr - base >= capacity {
            return Err(self.describe_bad_address(addr));
        }
        let end = addr.checked_add(len).ok_or("address range overflows")?;
        if end - base > capacity {
            return Err(format!(
                "access of {len} bytes at {addr:#x} overruns the allocation at {base:#x} \
                 ({} bytes requested, {capacity} usable)",
                alloc.size
            ));
        }
        Ok((base, addr - base))
    }

    fn describe_bad_address(&self, addr: u64) -> String {
        if let Some((&base, &size)) = self.freed.range(..=addr).next_back()
            && addr - base < size.max(1) + ALLOC_PADDING
        {
            return format!("address {addr:#x} belongs to an allocation at {base:#x} that was already freed");
        }
        format!("address {addr:#x} is not inside any live device allocation")
    }

    /// The live pinned host buffer holding `addr`: (base, id).
    pub fn host_buffer_at(&self, addr: u64) -> Option<(u64, u64)> {
        let (&base, buf) = self.host_buffers.range(..=addr).next_back()?;
        (addr - base < buf.layout.size() as u64).then_some((base, buf.id))
    }

    /// The tracked memory `addr` lies in (a device allocation or a pinned host buffer): its key
    /// in `history` and a name for messages.
    fn memory_key(&self, addr: u64) -> Option<(u64, String)> {
        if Self::is_device_address(addr) {
            let (base, _) = self.locate(addr, 0).ok()?;
            Some((base, format!("device memory at {base:#x}")))
        } else {
            let (base, _) = self.host_buffer_at(addr)?;
            Some((base, format!("pinned host memory at {base:#x}")))
        }
    }

    /// Records an access by `agent` (at `seq`, ordered after `clock`) and reports conflicts.
    fn track(&mut self, agent: u64, seq: u64, clock: &Clock, addr: u64, access: Access, api: &'static str) {
        let Some((key, what)) = self.memory_key(addr) else { return };
        let epoch = Epoch { agent, seq, api, access };
        let conflicts = self.history.entry(key).or_default().access(epoch, clock, &what);
        self.violations.extend(conflicts);
    }

    /// A synchronous access by the host (`aclrtMemcpy`, `aclrtMemset`, operators' own copies).
    pub fn host_access(&mut self, addr: u64, access: Access, api: &'static str) {
        let seq = self.host_clock.get(&HOST).copied().unwrap_or(0) + 1;
        self.host_clock.insert(HOST, seq);
        let clock = self.host_clock.clone();
        self.track(HOST, seq, &clock, addr, access, api);
    }

    /// Queues `task` on `stream` and checks its accesses `(address, kind)` against every earlier
    /// access of the same memory. Returns the task's sequence number.
    pub fn enqueue(&mut self, stream: u64, task: Task, accesses: &[(u64, Access)], api: &'static str) -> u64 {
        let host = self.host_clock.clone();
        let not_before = self.host_ms;
        let Some(s) = self.streams.get_mut(&stream) else { return 0 };
        sanitizer::join(&mut s.clock, &host);
        s.seq += 1;
        let seq = s.seq;
        s.clock.insert(stream, seq);
        let clock = s.clock.clone();
        s.queue.push_back(Queued { seq, not_before, task });
        for (addr, access) in accesses {
            self.track(stream, seq, &clock, *addr, *access, api);
        }
        seq
    }

    /// Checks that every access to the memory at `key` has finished as far as the host knows,
    /// before `api` releases it; forgets its history.
    fn release_history(&mut self, key: u64, what: &str, api: &str) {
        let Some(history) = self.history.remove(&key) else { return };
        for e in history.unfinished(&self.host_clock) {
            self.violations.push(format!(
                "{api} releases {what} while {} queued on {} may still use it (synchronize that stream, or an \
                 event recorded after the work, before freeing)",
                e.api,
                sanitizer::agent_name(e.agent)
            ));
        }
    }

    pub fn bytes(&self, base: u64) -> &[u8] {
        &self.allocations[&base].data
    }

    pub fn bytes_mut(&mut self, base: u64) -> &mut [u8] {
        self.allocations.get_mut(&base).map_or(&mut [], |a| &mut a.data[..])
    }

    /// Allocates device memory on `device`; `Err(code)` on exhaustion.
    pub fn allocate(&mut self, device: u32, size: u64, padded: bool) -> Result<u64, i32> {
        let pad = if padded { ALLOC_PADDING } else { 0 };
        let oom = sys::ACL_ERROR_RT_MEMORY_ALLOCATION;
        let rounded = size.checked_add(pad).ok_or(oom)?.div_ceil(ALLOC_ALIGN) * ALLOC_ALIGN;
        let dev = &mut self.devices[device as usize];
        if dev.used.checked_add(rounded).is_none_or(|total| total > self.config.memory_per_device) {
            return Err(oom);
        }
        let addr = DEVICE_BASE + u64::from(device) * DEVICE_SPAN + dev.next_offset;
        if dev.next_offset.checked_add(rounded).is_none_or(|end| end >= DEVICE_SPAN) {
            return Err(oom);
        }
        let data = DeviceBytes::new(rounded).ok_or(oom)?;
        // Leave a gap so that an overrun never lands silently in the next allocation.
        dev.next_offset += rounded + 4096 - rounded % 4096;
        dev.used += rounded;
        self.allocations.insert(addr, Allocation { device, size, data });
        Ok(addr)
    }

    pub fn free(&mut self, addr: u64) -> Result<(), String> {
        let Some(alloc) = self.allocations.remove(&addr) else {
            return Err(self.describe_bad_address(addr));
        };
        self.devices[alloc.device as usize].used -= alloc.data.len() as u64;
        self.freed.insert(addr, alloc.size);
        self.release_history(addr, &format!("device memory at {addr:#x}"), &format!("aclrtFree({addr:#x})"));
        Ok(())
    }

    /// Registers a new pinned host buffer.
    pub fn add_host_buffer(&mut self, ptr: u64, layout: std::alloc::Layout) {
        let id = self.new_handle();
        self.history.remove(&ptr);
        self.host_buffers.insert(ptr, HostBuffer { layout, id });
    }

    /// Unregisters a pinned host buffer (the caller deallocates it), checking its history.
    pub fn remove_host_buffer(&mut self, ptr: u64) -> Option<std::alloc::Layout> {
        let buf = self.host_buffers.remove(&ptr)?;
        self.release_history(ptr, &format!("pinned host memory at {ptr:#x}"), &format!("aclrtFreeHost({ptr:#x})"));
        Some(buf.layout)
    }

    /// Runs the tasks of `stream` with sequence numbers up to `limit`, in order (and, for event
    /// waits, the recording stream's tasks up to the record). The first failure is returned;
    /// every failure is also recorded as a violation.
    pub fn run_until(&mut self, stream: u64, limit: u64) -> Result<(), String> {
        let mut result = Ok(());
        loop {
            let next = match self.streams.get_mut(&stream) {
                Some(s) if s.queue.front().is_some_and(|q| q.seq <= limit) => s.queue.pop_front(),
                _ => None,
            };
            let Some(queued) = next else { break };
            if let Err(e) = self.execute(stream, queued) {
                self.violations.push(format!("queued work on stream {stream:#x} failed: {e}"));
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }

    fn execute(&mut self, stream: u64, queued: Queued) -> Result<(), String> {
        let Queued { seq, not_before, task } = queued;
        let start = self.streams.get(&stream).map_or(0.0, |s| s.time_ms.max(not_before));
        let mut end = start;
        let mut result = Ok(());
        match task {
            Task::Copy { dst, src, count, kind, host } => {
                end += copy_ms(count, dst, src);
                if let Some((base, id)) = host
                    && self.host_buffers.get(&base).map(|b| b.id) != Some(id)
                {
                    self.violations.push(format!(
                        "queued aclrtMemcpyAsync of {count} bytes touches pinned host memory at {base:#x} that was \
                         freed after the copy was queued (the copy was not performed)"
                    ));
                } else {
                    // SAFETY: the host side is a live pinned buffer (the same one as when the copy
                    // was queued, checked above) or pageable memory that the caller of
                    // aclrtMemcpyAsync keeps valid until the stream is synchronized, as the C API
                    // requires.
                    result = unsafe { self.copy(dst, src, count, kind) };
                }
            }
            Task::Kernel { name, cost_ms, run } => {
                end += cost_ms;
                result = run(self).map_err(|e| format!("{name}: {e}"));
            }
            Task::Record { event } => {
                if let Some(r) = self.events.get_mut(&event).and_then(|e| e.record.as_mut())
                    && r.stream == stream
                    && r.seq == seq
                {
                    r.done_ms = Some(start);
                }
            }
            Task::Wait { event, target: (target, target_seq) } => {
                if target != stream
                    && self.streams.get(&target).is_some_and(|t| t.executed < target_seq)
                    && let Err(e) = self.run_until(target, target_seq)
                {
                    result = Err(e);
                }
                let recorded = self
                    .events
                    .get(&event)
                    .and_then(|e| e.record.as_ref())
                    .filter(|r| r.stream == target && r.seq == target_seq)
                    .and_then(|r| r.done_ms);
                let ready = recorded.or_else(|| self.streams.get(&target).map(|t| t.time_ms)).unwrap_or(start);
                end = start.max(ready);
                if let Some(e) = self.events.get_mut(&event) {
                    e.waiters.retain(|w| *w != (stream, seq));
                }
            }
        }
        if let Some(s) = self.streams.get_mut(&stream) {
            s.executed = seq;
            s.time_ms = end;
        }
        result
    }

    /// A host wait for all of `stream`'s queued work.
    pub fn synchronize_stream(&mut self, stream: u64) -> Result<(), String> {
        self.sync.host_syncs += 1;
        let result = self.run_until(stream, u64::MAX);
        if let Some(s) = self.streams.get(&stream) {
            let (clock, time) = (s.clock.clone(), s.time_ms);
            sanitizer::join(&mut self.host_clock, &clock);
            self.host_ms = self.host_ms.max(time);
        }
        result
    }

    /// Runs an event's last record (and what it is ordered after), so that the event has
    /// completed; the host learns what the record orders after. An event never recorded is
    /// complete already.
    pub fn complete_event(&mut self, event: u64) -> Result<(), String> {
        let Some((stream, seq)) = self.events.get(&event).and_then(|e| e.record.as_ref()).map(|r| (r.stream, r.seq))
        else {
            return Ok(());
        };
        let result = if self.streams.get(&stream).is_some_and(|s| s.executed < seq) {
            self.run_until(stream, seq)
        } else {
            Ok(())
        };
        if let Some(r) = self.events.get(&event).and_then(|e| e.record.as_ref()) {
            let (clock, done) = (r.clock.clone(), r.done_ms);
            sanitizer::join(&mut self.host_clock, &clock);
            if let Some(t) = done {
                self.host_ms = self.host_ms.max(t);
            }
        }
        result
    }

    /// Validates a copy without performing it.
    pub fn check_copy(&self, dst: u64, src: u64, count: u64, kind: sys::aclrtMemcpyKind) -> Result<(), String> {
        let (dst_dev, src_dev) = copy_sides(dst, src, kind)?;
        if dst_dev {
            self.locate(dst, count)?;
        }
        if src_dev {
            self.locate(src, count)?;
        }
        Ok(())
    }

    /// Performs a checked copy.
    ///
    /// # Safety
    /// Host sides must be valid for `count` bytes.
    pub unsafe fn copy(&mut self, dst: u64, src: u64, count: u64, kind: sys::aclrtMemcpyKind) -> Result<(), String> {
        self.check_copy(dst, src, count, kind)?;
        let (dst_dev, src_dev) = copy_sides(dst, src, kind)?;
        let n = count as usize;
        match (dst_dev, src_dev) {
            (true, false) => {
                let (base, off) = self.locate(dst, count)?;
                let off = off as usize;
                // SAFETY: the caller guarantees `src` is readable for `count` bytes.
                let from = unsafe { std::slice::from_raw_parts(src as usize as *const u8, n) };
                self.bytes_mut(base)[off..off + n].copy_from_slice(from);
                self.counters.host_to_device += count;
            }
            (false, true) => {
                let (base, off) = self.locate(src, count)?;
                let off = off as usize;
                // SAFETY: the caller guarantees `dst` is writable for `count` bytes.
                let to = unsafe { std::slice::from_raw_parts_mut(dst as usize as *mut u8, n) };
                to.copy_from_slice(&self.bytes(base)[off..off + n]);
                self.counters.device_to_host += count;
            }
            (true, true) => {
                let (sb, so) = self.locate(src, count)?;
                let (db, doff) = self.locate(dst, count)?;
                let chunk = self.bytes(sb)[so as usize..so as usize + n].to_vec();
                self.bytes_mut(db)[doff as usize..doff as usize + n].copy_from_slice(&chunk);
                self.counters.device_to_device += count;
            }
            (false, false) => {
                // SAFETY: the caller guarantees both host ranges are valid; `copy` allows overlap.
                unsafe { std::ptr::copy(src as usize as *const u8, dst as usize as *mut u8, n) };
                self.counters.host_to_host += count;
            }
        }
        self.counters.copies += 1;
        Ok(())
    }

    /// A synchronous copy by the host: tracked by the sanitizer, timed, and performed.
    ///
    /// # Safety
    /// Host sides must be valid for `count` bytes.
    pub unsafe fn host_copy(
        &mut self,
        dst: u64,
        src: u64,
        count: u64,
        kind: sys::aclrtMemcpyKind,
        api: &'static str,
    ) -> Result<(), String> {
        self.check_copy(dst, src, count, kind)?;
        self.host_access(src, Access::Read, api);
        self.host_access(dst, Access::Write, api);
        self.host_ms += copy_ms(count, dst, src);
        // SAFETY: forwarded caller contract.
        unsafe { self.copy(dst, src, count, kind) }
    }

    /// Reads `len` bytes of device memory at `addr`.
    pub fn read(&self, addr: u64, len: u64) -> Result<Vec<u8>, String> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let (base, off) = self.locate(addr, len)?;
        Ok(self.bytes(base)[off as usize..(off + len) as usize].to_vec())
    }

    /// Writes `data` to device memory at `addr`.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), String> {
        if data.is_empty() {
            return Ok(());
        }
        let (base, off) = self.locate(addr, data.len() as u64)?;
        self.bytes_mut(base)[off as usize..off as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    pub fn memset(&mut self, dst: u64, value: u8, count: u64) -> Result<(), String> {
        if !Self::is_device_address(dst) {
            return Err(format!("aclrtMemset target {dst:#x} is not device memory"));
        }
        let (base, off) = self.locate(dst, count)?;
        self.host_access(dst, Access::Write, "aclrtMemset");
        self.bytes_mut(base)[off as usize..(off + count) as usize].fill(value);
        Ok(())
    }

    /// Releases everything on `device` and reports what was still alive.
    pub fn reset_device(&mut self, device: u32, at: String) {
        let mut report =
            LeakReport { at, allocations: Vec::new(), streams: 0, contexts: 0, tensors: 0, host_buffers: 0, events: 0 };
        let streams: Vec<u64> = self.streams.iter().filter(|(_, s)| s.device == device).map(|(h, _)| *h).collect();
        for h in streams {
            let s = self.streams.remove(&h).expect("listed above");
            if s.user {
                report.streams += 1;
            }
        }
        let contexts: Vec<u64> = self.contexts.iter().filter(|(_, c)| c.device == device).map(|(h, _)| *h).collect();
        for h in contexts {
            let c = self.contexts.remove(&h).expect("listed above");
            if c.user {
                report.contexts += 1;
            }
        }
        let events: Vec<u64> = self.events.iter().filter(|(_, e)| e.device == device).map(|(h, _)| *h).collect();
        report.events = events.len();
        for h in events {
            self.events.remove(&h);
        }
        let allocs: Vec<u64> =
            self.allocations.iter().filter(|(_, a)| a.device == device).map(|(addr, _)| *addr).collect();
        for addr in allocs {
            let a = self.allocations.remove(&addr).expect("listed above");
            report.allocations.push((addr, a.size));
            self.freed.insert(addr, a.size);
            self.history.remove(&addr);
        }
        let dev = &mut self.devices[device as usize];
        dev.used = 0;
        dev.default_context = None;
        dev.set_count = 0;
        if !report.allocations.is_empty() || report.streams > 0 || report.contexts > 0 || report.events > 0 {
            self.leaks.push(report);
        }
    }
}

/// Which sides of a copy are device memory, checked against the copy kind.
fn copy_sides(dst: u64, src: u64, kind: sys::aclrtMemcpyKind) -> Result<(bool, bool), String> {
    let (dd, sd) = (Machine::is_device_address(dst), Machine::is_device_address(src));
    let expected = match kind {
        sys::ACL_MEMCPY_HOST_TO_HOST => (false, false),
        sys::ACL_MEMCPY_HOST_TO_DEVICE => (true, false),
        sys::ACL_MEMCPY_DEVICE_TO_HOST => (false, true),
        sys::ACL_MEMCPY_DEVICE_TO_DEVICE => (true, true),
        sys::ACL_MEMCPY_DEFAULT => (dd, sd),
        other => return Err(format!("copy kind {other} is not supported")),
    };
    if expected != (dd, sd) {
        let side = |d: bool| if d { "device" } else { "host" };
        return Err(format!(
            "copy kind {kind} expects a {} destination and a {} source, but dst {dst:#x} is {} \
             memory and src {src:#x} is {} memory",
            side(expected.0),
            side(expected.1),
            side(dd),
            side(sd)
        ));
    }
    Ok(expected)
}

/// Locks the machine (creating it with the default configuration on first use).
pub(crate) fn lock() -> MutexGuard<'static, Option<Machine>> {
    let mut guard = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(Machine::new(SimConfig::default()));
    }
    guard
}

/// Runs `f` on the locked machine.
pub(crate) fn with<R>(f: impl FnOnce(&mut Machine) -> R) -> R {
    let mut guard = lock();
    f(guard.as_mut().expect("created by lock()"))
}

pub(crate) fn configure(config: SimConfig) -> Result<(), SimError> {
    with(|m| {
        if m.config == config {
            return Ok(());
        }
        if !m.is_idle() {
            return Err(SimError::Busy { current: format!("{:?}", m.config) });
        }
        let initialized = m.initialized;
        let keep = (std::mem::take(&mut m.leaks), std::mem::take(&mut m.violations), m.counters);
        let tensors = std::mem::take(&mut m.tensors);
        let args = std::mem::take(&mut m.args);
        let executors = std::mem::take(&mut m.executors);
        let host = std::mem::take(&mut m.host_buffers);
        let (history, host_clock, next_handle) =
            (std::mem::take(&mut m.history), std::mem::take(&mut m.host_clock), m.next_handle);
        *m = Machine::new(config);
        m.initialized = initialized;
        (m.leaks, m.violations, m.counters) = keep;
        m.tensors = tensors;
        m.args = args;
        m.executors = executors;
        m.host_buffers = host;
        (m.history, m.host_clock, m.next_handle) = (history, host_clock, next_handle);
        Ok(())
    })
}

/// A snapshot of the simulated machine.
pub fn stats() -> SimStats {
    with(|m| SimStats {
        live_allocations: m.allocations.len(),
        live_bytes: m.allocations.values().map(|a| a.size).sum(),
        live_streams: m.streams.values().filter(|s| s.user).count(),
        live_contexts: m.contexts.values().filter(|c| c.user).count(),
        live_tensors: m.tensors.len(),
        live_descriptors: m.args.len(),
        live_host_buffers: m.host_buffers.len(),
        live_executors: m.executors.len(),
        live_events: m.events.len(),
        devices_in_use: m.devices.iter().filter(|d| d.set_count > 0).count(),
        copies: m.counters,
        sync: m.sync,
        host_ms: m.host_ms,
        leaks: m.leaks.clone(),
        violations: m.violations.clone(),
    })
}

/// Returns and clears the leak reports and violations recorded so far.
pub fn take_reports() -> (Vec<LeakReport>, Vec<String>) {
    with(|m| (std::mem::take(&mut m.leaks), std::mem::take(&mut m.violations)))
}

/// Phase 1's last step: registers `job` as a new executor and writes the out-parameters
/// (`workspace` bytes), or refuses null out-pointers as CANN does.
pub(crate) fn hand_out_job<J: std::any::Any + Send>(
    job: J,
    workspace: u64,
    workspace_size: *mut u64,
    executor: *mut *mut sys::aclOpExecutor,
) -> sys::aclnnStatus {
    if workspace_size.is_null() || executor.is_null() {
        super::errmsg::aclnn_param("workspaceSize and executor must not be null.");
        return sys::ACLNN_ERR_PARAM_NULLPTR;
    }
    let h = with(|m| {
        let h = m.new_handle();
        m.executors.insert(h, Box::new(job));
        h
    });
    // SAFETY: both checked non-null; the caller passes writable slots.
    unsafe {
        *workspace_size = workspace;
        *executor = h as usize as *mut sys::aclOpExecutor;
    }
    sys::ACLNN_SUCCESS
}

/// Phase 2's hold on an executor: takes the job that phase 1 stored under `executor` out of the
/// machine (it is consumed, whatever the launch's outcome), or the status and message phase 2
/// returns for a null or dead executor.
pub(crate) fn take_job<J: std::any::Any>(executor: *mut sys::aclOpExecutor) -> Result<Box<J>, sys::aclnnStatus> {
    if executor.is_null() {
        super::errmsg::aclnn_param("Expected a proper executor but got null.");
        return Err(sys::ACLNN_ERR_PARAM_NULLPTR);
    }
    let taken = with(|m| m.executors.remove(&(executor as usize as u64)));
    taken.and_then(|b| b.downcast::<J>().ok()).ok_or_else(|| {
        super::errmsg::aclnn_param("the executor is not live (already launched or destroyed?)");
        sys::ACLNN_ERR_PARAM_INVALID
    })
}

/// Everything [`discard_all`] found alive or already reported leaked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discarded {
    /// Device allocations (reported earlier or reclaimed now).
    pub allocations: usize,
    /// User streams.
    pub streams: usize,
    /// User contexts.
    pub contexts: usize,
    /// Events.
    pub events: usize,
    /// Tensor descriptors.
    pub tensors: usize,
    /// Scalars, int/float/bool arrays and tensor lists.
    pub descriptors: usize,
    /// Pinned host buffers.
    pub host_buffers: usize,
    /// Executors never launched nor destroyed.
    pub executors: usize,
    /// Devices still set (`aclrtSetDevice` without its reset).
    pub devices: usize,
}

/// Discards every object still alive, as the end of the process would, and returns what it
/// found, together with every leak report not yet taken; the machine is idle afterwards.
/// Misuse records stay for [`take_reports`]. For harnesses whose runs leak on purpose (the
/// fail-closed policy) and must start the next run from a clean machine.
pub fn discard_all() -> Discarded {
    with(|m| {
        let mut out = Discarded {
            devices: m.devices.iter().filter(|d| d.set_count > 0).count(),
            tensors: m.tensors.len(),
            descriptors: m.args.len(),
            host_buffers: m.host_buffers.len(),
            executors: m.executors.len(),
            ..Discarded::default()
        };
        for d in 0..m.devices.len() as u32 {
            m.reset_device(d, format!("discard_all (device {d})"));
        }
        for report in std::mem::take(&mut m.leaks) {
            out.allocations += report.allocations.len();
            out.streams += report.streams;
            out.contexts += report.contexts;
            out.events += report.events;
        }
        m.tensors.clear();
        m.args.clear();
        m.executors.clear();
        for (ptr, buf) in std::mem::take(&mut m.host_buffers) {
            m.history.remove(&ptr);
            // SAFETY: `ptr` was allocated by `aclrtMallocHost` with exactly `buf.layout` and is
            // owned by the machine; discarding it is the end of its life.
            unsafe { std::alloc::dealloc(ptr as usize as *mut u8, buf.layout) };
        }
        out
    })
}

/// Zeroes the copy and synchronisation counters.
pub fn reset_counters() {
    with(|m| {
        m.counters = CopyCounters::default();
        m.sync = SyncCounters::default();
    });
}
