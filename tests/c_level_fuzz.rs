//! Bad input at the C level: the simulated `aclnnConvertWeightToINT4Pack` and the simulated
//! runtime's memory functions driven through the raw function table with arbitrary descriptors,
//! pointers, sizes and kinds. Only documented status codes may come back, a successful pack
//! writes exactly the reference bytes and nothing else (guard buffers around it stay intact),
//! a failed call changes nothing, and no copy ever touches memory outside a live allocation.
//!
//! Every descriptor and buffer a case creates is owned by an RAII guard, so a failing case
//! (and proptest's shrinking) leaves the simulator clean.

#![cfg(feature = "sim")]

mod common;

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use aclnn::kernels::{self, GroupOffset, NzGeometry};
use aclnn::ops::int4pack::{PackLayout, PackOptions, WeightKind, reference_pack_int4};
use aclnn::sys::{self, Api};
use aclnn::{ChipFamily, DType, TensorDesc};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

/// Where the simulator's device address space starts (`sim/machine.rs`: above every user-space
/// host address). Fuzzed "device" pointers never go below it, so the simulator never mistakes
/// one for host memory and dereferences it.
const SIM_DEVICE_BASE: u64 = 0x0100_0000_0000_0000;

const GUARD_BYTES: usize = 4096;
const GUARD_FILL: u8 = 0xC3;
const PACK_FILL: u8 = 0x5A;
const MIB: usize = 1 << 20;

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Runs a proptest with `cases` cases; panics inside a case become failures (and are shrunk).
fn run<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: Clone + std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let outcome = runner.run(&strategy, |v| match catch_unwind(AssertUnwindSafe(|| test(v))) {
        Ok(r) => r,
        Err(p) => Err(TestCaseError::fail(format!("panicked: {}", panic_text(&*p)))),
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// RAII guards over raw handles
// ---------------------------------------------------------------------------------------------

/// Device memory from the raw `aclrtMalloc`, freed on drop.
struct DevMem<'a> {
    api: &'a Api,
    ptr: u64,
    size: usize,
}

impl<'a> DevMem<'a> {
    fn new(api: &'a Api, size: usize) -> DevMem<'a> {
        let f = api.aclrtMalloc().expect("aclrtMalloc");
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; non-zero size.
        let code = unsafe { f(&mut ptr, size, sys::ACL_MEM_MALLOC_HUGE_FIRST) };
        assert_eq!(code, 0, "aclrtMalloc({size})");
        DevMem { api, ptr: ptr as usize as u64, size }
    }

    fn filled(api: &'a Api, bytes: &[u8]) -> DevMem<'a> {
        let m = DevMem::new(api, bytes.len().max(1));
        write(api, m.ptr, bytes);
        m
    }

    fn read(&self) -> Vec<u8> {
        read(self.api, self.ptr, self.size)
    }
}

impl Drop for DevMem<'_> {
    fn drop(&mut self) {
        if let Ok(f) = self.api.aclrtFree() {
            // SAFETY: allocated by `new`, freed once.
            let _ = unsafe { f(self.ptr as usize as *mut c_void) };
        }
    }
}

fn write(api: &Api, dst: u64, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let f = api.aclrtMemcpy().expect("aclrtMemcpy");
    // SAFETY: the host side is a live slice of `bytes.len()` bytes.
    let code = unsafe {
        f(dst as usize as *mut c_void, bytes.len(), bytes.as_ptr().cast(), bytes.len(), sys::ACL_MEMCPY_HOST_TO_DEVICE)
    };
    assert_eq!(code, 0, "upload of {} bytes to {dst:#x}", bytes.len());
}

fn read(api: &Api, src: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    if len == 0 {
        return out;
    }
    let f = api.aclrtMemcpy().expect("aclrtMemcpy");
    // SAFETY: the host side is a live buffer of `len` bytes.
    let code =
        unsafe { f(out.as_mut_ptr().cast(), len, src as usize as *const c_void, len, sys::ACL_MEMCPY_DEVICE_TO_HOST) };
    assert_eq!(code, 0, "download of {len} bytes from {src:#x}");
    out
}

/// A descriptor from the raw `aclCreateTensor`, destroyed on drop (null stays null).
struct Desc<'a> {
    api: &'a Api,
    ptr: *mut sys::aclTensor,
}

impl Drop for Desc<'_> {
    fn drop(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        if let Ok(f) = self.api.aclDestroyTensor() {
            // SAFETY: created by aclCreateTensor, destroyed once.
            let _ = unsafe { f(self.ptr) };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4a. Descriptors for aclnnConvertWeightToINT4Pack
// ---------------------------------------------------------------------------------------------

/// Which address a descriptor's `tensorData` holds.
#[derive(Clone, Copy, Debug)]
enum Data {
    Null,
    /// The base of its own buffer.
    Base,
    /// Inside its own buffer, at `(shift % size)` bytes.
    Shifted(usize),
    /// An allocation that was freed.
    Freed,
    /// Somewhere in the device address space, probably unmapped.
    Wild(u64),
}

/// Which handle is passed to the operator.
#[derive(Clone, Copy, Debug)]
enum Handle {
    Real,
    Null,
    /// A non-null pointer that is not a descriptor (the simulator checks its registry first).
    Bogus,
}

#[derive(Clone, Debug)]
struct TensorSpec {
    view: Vec<i64>,
    /// `None`: pass null strides (contiguous). Resized to the view rank when used.
    strides: Option<Vec<i64>>,
    offset: i64,
    dtype: i32,
    format: i32,
    storage: Vec<i64>,
    /// Pass a null `viewDims` with a non-zero count (aclCreateTensor then returns null).
    null_view: bool,
    data: Data,
    handle: Handle,
}

/// How a buffer's size relates to what the descriptor needs.
#[derive(Clone, Copy, Debug)]
enum Size {
    Exact,
    Smaller(u8),
    Larger(u16),
    Tiny(u8),
}

#[derive(Clone, Debug)]
struct OpCase {
    weight: TensorSpec,
    pack: TensorSpec,
    weight_size: Size,
    pack_size: Size,
    seed: u64,
    small_values: bool,
}

#[derive(Clone, Debug)]
enum Mutation {
    Dtype(bool, i32),
    Format(bool, i32),
    View(bool, Vec<i64>),
    Dim(bool, usize, i64),
    Strides(bool, Vec<i64>),
    Offset(bool, i64),
    Storage(bool, Vec<i64>),
    StorageDim(usize, i64),
    Data(bool, Data),
    Handle(bool, Handle),
    NullView(bool),
    WeightSize(Size),
    PackSize(Size),
}

fn wild_dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => 1i64..130,
        2 => -3i64..=0,
        1 => prop::sample::select(vec![1i64 << 40, 1 << 62, i64::MAX, i64::MIN, -(1 << 40)]),
        1 => any::<i64>(),
    ]
}

fn dims(max_rank: usize) -> impl Strategy<Value = Vec<i64>> {
    prop::collection::vec(wild_dim(), 0..=max_rank)
}

fn data_choice() -> impl Strategy<Value = Data> {
    prop_oneof![
        Just(Data::Null),
        Just(Data::Base),
        any::<usize>().prop_map(Data::Shifted),
        Just(Data::Freed),
        (0u64..1 << 46).prop_map(Data::Wild),
        Just(Data::Wild(u64::MAX - SIM_DEVICE_BASE)),
    ]
}

fn size_choice() -> impl Strategy<Value = Size> {
    prop_oneof![
        Just(Size::Exact),
        any::<u8>().prop_map(Size::Smaller),
        any::<u16>().prop_map(Size::Larger),
        any::<u8>().prop_map(Size::Tiny),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let side = any::<bool>;
    prop_oneof![
        (side(), -2i32..45).prop_map(|(w, d)| Mutation::Dtype(w, d)),
        (side(), -2i32..56).prop_map(|(w, f)| Mutation::Format(w, f)),
        (side(), dims(10)).prop_map(|(w, v)| Mutation::View(w, v)),
        (side(), 0usize..4, wild_dim()).prop_map(|(w, i, d)| Mutation::Dim(w, i, d)),
        (side(), prop::collection::vec(prop_oneof![-2i64..200, any::<i64>()], 0..10))
            .prop_map(|(w, s)| Mutation::Strides(w, s)),
        (side(), prop_oneof![-5i64..5, any::<i64>()]).prop_map(|(w, o)| Mutation::Offset(w, o)),
        (side(), dims(10)).prop_map(|(w, s)| Mutation::Storage(w, s)),
        (0usize..5, wild_dim()).prop_map(|(i, d)| Mutation::StorageDim(i, d)),
        (side(), data_choice()).prop_map(|(w, d)| Mutation::Data(w, d)),
        (side(), prop_oneof![Just(Handle::Null), Just(Handle::Bogus)]).prop_map(|(w, h)| Mutation::Handle(w, h)),
        side().prop_map(Mutation::NullView),
        size_choice().prop_map(Mutation::WeightSize),
        size_choice().prop_map(Mutation::PackSize),
    ]
}

/// A well-formed request (what `aclnn` itself would build), then 0–3 arbitrary mutations.
fn op_case() -> impl Strategy<Value = OpCase> {
    let base = (
        prop::option::of(1i64..4),
        prop_oneof![1i64..40, (1i64..4).prop_map(|x| x * 16)],
        (1i64..12).prop_map(|x| x * 8),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    );
    (base, prop::collection::vec(mutation(), 0..=3), any::<u64>(), any::<bool>()).prop_map(
        |((groups, k, n, fp4, four_bit, nz), mutations, seed, small_values)| {
            let mut view = vec![k, n];
            if let Some(g) = groups {
                view.insert(0, g);
            }
            let (wdtype, pdtype) = match (fp4, four_bit) {
                (false, true) => (sys::ACL_INT32, sys::ACL_INT4),
                (false, false) => (sys::ACL_INT32, sys::ACL_INT32),
                (true, true) => (sys::ACL_FLOAT, sys::ACL_FLOAT4_E2M1),
                (true, false) => (sys::ACL_FLOAT, sys::ACL_FLOAT),
            };
            let pn = if four_bit { n } else { n / 8 };
            let mut pview = view.clone();
            *pview.last_mut().expect("rank >= 2") = pn;
            let pstorage = if nz {
                let container = if four_bit { aclnn::Container::FourBit } else { aclnn::Container::ThirtyTwoBit };
                let mut s = groups.map(|g| vec![g]).unwrap_or_default();
                s.extend(ChipFamily::A2A3.nz_storage_shape(container, k, pn));
                s
            } else {
                pview.clone()
            };
            let weight = TensorSpec {
                view: view.clone(),
                strides: None,
                offset: 0,
                dtype: wdtype,
                format: sys::ACL_FORMAT_ND,
                storage: view,
                null_view: false,
                data: Data::Base,
                handle: Handle::Real,
            };
            let pack = TensorSpec {
                view: pview,
                strides: None,
                offset: 0,
                dtype: pdtype,
                format: if nz { sys::ACL_FORMAT_FRACTAL_NZ } else { sys::ACL_FORMAT_ND },
                storage: pstorage,
                null_view: false,
                data: Data::Base,
                handle: Handle::Real,
            };
            let mut case =
                OpCase { weight, pack, weight_size: Size::Exact, pack_size: Size::Exact, seed, small_values };
            for m in mutations {
                apply(&mut case, m);
            }
            case
        },
    )
}

fn side_of(case: &mut OpCase, weight: bool) -> &mut TensorSpec {
    if weight { &mut case.weight } else { &mut case.pack }
}

fn apply(case: &mut OpCase, m: Mutation) {
    let spec = side_of;
    match m {
        Mutation::Dtype(w, d) => spec(case, w).dtype = d,
        Mutation::Format(w, f) => spec(case, w).format = f,
        Mutation::View(w, v) => spec(case, w).view = v,
        Mutation::Dim(w, i, d) => {
            let s = spec(case, w);
            if !s.view.is_empty() {
                let n = s.view.len();
                s.view[i % n] = d;
            }
        }
        Mutation::Strides(w, st) => spec(case, w).strides = Some(st),
        Mutation::Offset(w, o) => spec(case, w).offset = o,
        Mutation::Storage(w, st) => spec(case, w).storage = st,
        Mutation::StorageDim(i, d) => {
            let s = &mut case.pack.storage;
            if !s.is_empty() {
                let n = s.len();
                s[i % n] = d;
            }
        }
        Mutation::Data(w, d) => spec(case, w).data = d,
        Mutation::Handle(w, h) => spec(case, w).handle = h,
        Mutation::NullView(w) => spec(case, w).null_view = true,
        Mutation::WeightSize(s) => case.weight_size = s,
        Mutation::PackSize(s) => case.pack_size = s,
    }
}

/// Bytes a buffer gets: the descriptor's natural size adjusted by `size`, within [1, 1 MiB].
fn buffer_size(natural: Option<u64>, size: Size) -> usize {
    let natural = natural.unwrap_or(4096).min(MIB as u64) as usize;
    let bytes = match size {
        Size::Exact => natural,
        Size::Smaller(x) => natural.saturating_sub(1 + usize::from(x) % natural.max(1)),
        Size::Larger(x) => natural + usize::from(x),
        Size::Tiny(x) => usize::from(x) % 64,
    };
    bytes.clamp(1, MIB)
}

fn checked_elements(view: &[i64]) -> Option<u64> {
    view.iter().try_fold(1u64, |acc, d| u64::try_from(*d).ok().and_then(|d| acc.checked_mul(d)))
}

/// The 16 FP4 E2M1 values, in code order.
const FP4_VALUES: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// Creates the descriptor of `spec` over `mem` (or another address, per `spec.data`).
fn create<'a>(api: &'a Api, spec: &TensorSpec, mem: &DevMem<'_>, freed: u64) -> (Desc<'a>, u64) {
    let data = match spec.data {
        Data::Null => 0,
        Data::Base => mem.ptr,
        Data::Shifted(s) => mem.ptr + (s % mem.size) as u64,
        Data::Freed => freed,
        Data::Wild(off) => SIM_DEVICE_BASE.saturating_add(off),
    };
    let strides = spec.strides.as_ref().map(|s| {
        let mut s = s.clone();
        s.resize(spec.view.len(), 1);
        s
    });
    let f = api.aclCreateTensor().expect("aclCreateTensor");
    let view_ptr = if spec.null_view && !spec.view.is_empty() { std::ptr::null() } else { spec.view.as_ptr() };
    // SAFETY: every array is owned here and valid for the count passed with it (strides have one
    // entry per view dim); a null view array comes with a count the simulator checks first.
    let ptr = unsafe {
        f(
            view_ptr,
            spec.view.len() as u64,
            spec.dtype,
            strides.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            spec.offset,
            spec.format,
            spec.storage.as_ptr(),
            spec.storage.len() as u64,
            data as usize as *mut c_void,
        )
    };
    (Desc { api, ptr }, data)
}

fn handle(desc: &Desc<'_>, h: Handle) -> *mut sys::aclTensor {
    match h {
        Handle::Real => desc.ptr,
        Handle::Null => std::ptr::null_mut(),
        Handle::Bogus => 0x40 as *mut sys::aclTensor,
    }
}

/// The bytes the operator must write for a successful call (`int4pack.md` 1.5), computed here
/// from the weight's source bytes: nibble codes, two per byte, low index in the low nibble,
/// then FRACTAL_NZ with CANN's unpadded group offsets.
fn expected_output(w: &TensorSpec, p: &TensorSpec, source: &[u8]) -> Vec<u8> {
    let words: Vec<u32> = source.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let code = |v: u32| -> u8 {
        if w.dtype == sys::ACL_FLOAT {
            // int4pack.md 1.5.3: keep sign, exponent and the top mantissa bit, look the result up
            // among the 16 E2M1 values' bit patterns; anything else is code 0.
            let masked = v & 0xFFC0_0000;
            FP4_VALUES.iter().position(|x| x.to_bits() == masked).map_or(0, |p| p as u8)
        } else {
            (v & 0xF) as u8
        }
    };
    let nd: Vec<u8> = words.chunks_exact(2).map(|pair| code(pair[0]) | (code(pair[1]) << 4)).collect();
    if w.dtype == sys::ACL_INT32 {
        // Cross-check with the crate's reference on the same input.
        let ints: Vec<i32> = words.iter().map(|v| *v as i32).collect();
        let shape = w.view.clone();
        let nz = (p.format == sys::ACL_FORMAT_FRACTAL_NZ).then(|| geometry(w));
        let layout = PackLayout {
            kind: WeightKind::Int4,
            options: PackOptions::default(),
            weight_shape: shape.clone(),
            desc: TensorDesc::nd(DType::Int4, &shape),
            bytes: 0,
            nz,
        };
        let reference = reference_pack_int4(&ints, &layout).expect("reference");
        let mine = lay_out(&nd, w, p);
        assert_eq!(mine, reference, "own packing disagrees with reference_pack_int4");
        return mine;
    }
    lay_out(&nd, w, p)
}

fn geometry(w: &TensorSpec) -> NzGeometry {
    let r = w.view.len();
    let groups = if r == 3 { w.view[0] as usize } else { 1 };
    NzGeometry::new(groups, w.view[r - 2] as usize, (w.view[r - 1] / 2) as usize, 32)
}

fn lay_out(nd: &[u8], w: &TensorSpec, p: &TensorSpec) -> Vec<u8> {
    if p.format != sys::ACL_FORMAT_FRACTAL_NZ {
        return nd.to_vec();
    }
    let geom = geometry(w);
    let mut out = vec![0u8; geom.total_bytes()];
    kernels::nd_to_nz(nd, geom, GroupOffset::Unpadded, &mut out).expect("NZ layout");
    out
}

fn check_op_case(api: &Api, case: &OpCase) -> Result<(), TestCaseError> {
    let (w, p) = (&case.weight, &case.pack);
    let mut rng = fastrand::Rng::with_seed(case.seed);

    // Buffers: weight; guard, pack, guard (allocated in address order); one freed allocation.
    let w_natural = checked_elements(&w.view).and_then(|e| e.checked_mul(4));
    let w_size = buffer_size(w_natural, case.weight_size);
    let weight_bytes: Vec<u8> = (0..w_size.div_ceil(4))
        .flat_map(|_| {
            let v: u32 = if w.dtype == sys::ACL_FLOAT {
                FP4_VALUES[rng.usize(..16)].to_bits()
            } else if case.small_values {
                rng.i32(-8..=7) as u32
            } else {
                rng.u32(..)
            };
            v.to_le_bytes()
        })
        .take(w_size)
        .collect();
    let weight_mem = DevMem::filled(api, &weight_bytes);
    let p_natural = if p.format == sys::ACL_FORMAT_FRACTAL_NZ {
        checked_elements(&p.storage).and_then(|e| e.checked_mul(4))
    } else {
        checked_elements(&w.view).map(|e| e / 2)
    };
    let p_size = buffer_size(p_natural, case.pack_size);
    let guard_before = DevMem::filled(api, &[GUARD_FILL; GUARD_BYTES]);
    let pack_mem = DevMem::filled(api, &vec![PACK_FILL; p_size]);
    let guard_after = DevMem::filled(api, &[GUARD_FILL; GUARD_BYTES]);
    let freed = DevMem::new(api, 256).ptr; // freed at once by the guard's drop

    let (wdesc, wdata) = create(api, w, &weight_mem, freed);
    let (pdesc, pdata) = create(api, p, &pack_mem, freed);
    let phase1 = api.aclnnConvertWeightToINT4PackGetWorkspaceSize().expect("phase 1");
    let phase2 = api.aclnnConvertWeightToINT4Pack().expect("phase 2");
    let mut workspace_size = 0u64;
    let mut executor: *mut sys::aclOpExecutor = std::ptr::null_mut();
    // SAFETY: the handles are live descriptors, null, or a bogus pointer the simulator rejects
    // without dereferencing; the out-pointers are valid.
    let code =
        unsafe { phase1(handle(&wdesc, w.handle), handle(&pdesc, p.handle), &mut workspace_size, &mut executor) };
    let allowed = [0, sys::ACLNN_ERR_PARAM_NULLPTR, sys::ACLNN_ERR_PARAM_INVALID, sys::ACLNN_ERR_RUNTIME_ERROR];
    prop_assert!(allowed.contains(&code), "phase 1 returned {code}");
    // SAFETY: phase 2 of the same operator with what phase 1 left (it ignores its arguments).
    let code2 = unsafe { phase2(std::ptr::null_mut(), workspace_size, executor, std::ptr::null_mut()) };
    prop_assert!(allowed.contains(&code2), "phase 2 returned {code2}");

    // The operator never writes its inputs or anything around its output.
    prop_assert_eq!(weight_mem.read(), weight_bytes, "the weight buffer changed");
    prop_assert!(guard_before.read().iter().all(|b| *b == GUARD_FILL), "guard before the pack buffer changed");
    prop_assert!(guard_after.read().iter().all(|b| *b == GUARD_FILL), "guard after the pack buffer changed");
    let after = pack_mem.read();
    let mut expected = vec![PACK_FILL; p_size];
    if code == 0 {
        // Success needs a packable weight: rank 2-3, dims >= 0, last dim even.
        let elements = checked_elements(&w.view).expect("success with a negative or huge weight shape");
        let bytes_in = elements as usize * 4;
        if bytes_in > 0 {
            prop_assert!(wdata >= weight_mem.ptr && wdata + bytes_in as u64 <= weight_mem.ptr + w_size as u64 + 64);
        }
        // What the weight's base address holds, read back through the runtime (this also proves
        // the operator's read lay inside a live allocation).
        let source = read(api, wdata, bytes_in);
        let out = expected_output(w, p, &source);
        if !out.is_empty() {
            prop_assert!(
                pdata >= pack_mem.ptr && pdata - pack_mem.ptr + out.len() as u64 <= p_size as u64 + 64,
                "success with {} bytes written at {pdata:#x}, outside the pack buffer {:#x}+{p_size}",
                out.len(),
                pack_mem.ptr
            );
            let shift = (pdata - pack_mem.ptr) as usize;
            let end = (shift + out.len()).min(p_size);
            expected[shift..end].copy_from_slice(&out[..end - shift]);
        }
    }
    prop_assert!(after == expected, "pack buffer (code {code}) differs from the expected bytes");

    drop((wdesc, pdesc));
    drop((weight_mem, guard_before, pack_mem, guard_after));
    let stats = aclnn::sim::stats();
    prop_assert!(stats.violations.is_empty(), "violations: {:?}", stats.violations);
    prop_assert_eq!(stats.live_tensors, 0);
    prop_assert_eq!(stats.live_allocations, 0);
    prop_assert_eq!(stats.live_executors, 0);
    Ok(())
}

#[test]
fn arbitrary_descriptors_give_documented_codes_and_exact_bytes() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    let started = Instant::now();
    let tally = std::sync::Mutex::new(std::collections::BTreeMap::<i32, usize>::new());
    {
        let device = h.runtime.device(0).expect("device 0");
        let api = h.runtime.api();
        run(128, op_case(), |case| {
            device.bind().expect("bind");
            check_op_case(api, &case)
        });
        // Outcome spread of a fixed sample (the run above does not expose codes).
        let mut runner = TestRunner::deterministic();
        for _ in 0..128 {
            let case = op_case().new_tree(&mut runner).expect("case").current();
            device.bind().expect("bind");
            *tally.lock().unwrap().entry(outcome_code(api, &case)).or_default() += 1;
        }
    }
    let tally = tally.into_inner().unwrap();
    println!("C-level descriptor fuzz: 128 cases in {:.2?}; outcome spread {tally:?}", started.elapsed());
    assert!(tally.get(&0).copied().unwrap_or(0) >= 10, "too few successes: {tally:?}");
    assert!(tally.len() >= 4, "every documented code should occur: {tally:?}");
    let (_, violations) = aclnn::sim::take_reports();
    assert!(violations.is_empty(), "{violations:?}");
    h.assert_clean();
}

/// Phase 1's code for `case` (same set-up as `check_op_case`, without the checks).
fn outcome_code(api: &Api, case: &OpCase) -> i32 {
    let (w, p) = (&case.weight, &case.pack);
    let w_size = buffer_size(checked_elements(&w.view).and_then(|e| e.checked_mul(4)), case.weight_size);
    let weight_mem = DevMem::filled(api, &vec![0u8; w_size]);
    let p_natural = if p.format == sys::ACL_FORMAT_FRACTAL_NZ {
        checked_elements(&p.storage).and_then(|e| e.checked_mul(4))
    } else {
        checked_elements(&w.view).map(|e| e / 2)
    };
    let pack_mem = DevMem::new(api, buffer_size(p_natural, case.pack_size));
    let freed = DevMem::new(api, 256).ptr;
    let (wdesc, _) = create(api, w, &weight_mem, freed);
    let (pdesc, _) = create(api, p, &pack_mem, freed);
    let phase1 = api.aclnnConvertWeightToINT4PackGetWorkspaceSize().expect("phase 1");
    let (mut ws, mut ex) = (0u64, std::ptr::null_mut());
    // SAFETY: as in `check_op_case`.
    unsafe { phase1(handle(&wdesc, w.handle), handle(&pdesc, p.handle), &mut ws, &mut ex) }
}

// ---------------------------------------------------------------------------------------------
// 4b. aclrtMalloc / aclrtFree / aclrtMemcpy with arbitrary pointers, sizes and kinds
// ---------------------------------------------------------------------------------------------

/// A device pointer chosen relative to what the case has allocated.
#[derive(Clone, Copy, Debug)]
enum Ptr {
    Null,
    /// Base of live allocation `i % live`.
    Base(usize),
    /// Base of live allocation `i` plus `off` bytes (may run past its end).
    Inner(usize, u32),
    /// Base of live allocation `i` minus `off` bytes (kept in the device range).
    Before(usize, u16),
    /// A freed allocation.
    Freed(usize),
    /// Device range start plus an offset (probably unmapped, possibly another device's range).
    Wild(u64),
    /// The very end of the address space.
    End(u16),
}

#[derive(Clone, Copy, Debug)]
enum Side {
    /// A host buffer owned by the test, exactly `count` bytes long.
    Host,
    Dev(Ptr),
}

#[derive(Clone, Copy, Debug)]
enum Count {
    Zero,
    Small(u16),
    /// The requested size of live allocation `i` minus `back` bytes.
    Fit(usize, u8),
    /// A huge count (only used when neither side is host memory).
    Huge(u64),
}

#[derive(Clone, Copy, Debug)]
enum MemOp {
    Malloc { size: u64, policy: u32, null_out: bool },
    Free(Ptr),
    Memcpy { dst: Side, src: Side, count: Count, dest_max_delta: i8, kind: u32 },
}

fn ptr() -> impl Strategy<Value = Ptr> {
    prop_oneof![
        1 => Just(Ptr::Null),
        4 => any::<usize>().prop_map(Ptr::Base),
        4 => (any::<usize>(), prop_oneof![0u32..256, any::<u32>()]).prop_map(|(i, o)| Ptr::Inner(i, o)),
        1 => (any::<usize>(), 1u16..4096).prop_map(|(i, o)| Ptr::Before(i, o)),
        2 => any::<usize>().prop_map(Ptr::Freed),
        1 => (0u64..1 << 46).prop_map(Ptr::Wild),
        1 => any::<u16>().prop_map(Ptr::End),
    ]
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![2 => Just(Side::Host), 3 => ptr().prop_map(Side::Dev)]
}

fn mem_op() -> impl Strategy<Value = MemOp> {
    let size = prop_oneof![
        4 => 1u64..16_384,
        1 => Just(0u64),
        1 => prop::sample::select(vec![
            1u64 << 40,
            i64::MAX as u64,
            (64u64 << 30) + 1,
        ]),
    ];
    let policy = prop_oneof![4 => 0u32..8, 1 => any::<u32>(), 1 => Just(0x100), 1 => Just(0x1000 | 2)];
    let count = prop_oneof![
        1 => Just(Count::Zero),
        3 => any::<u16>().prop_map(Count::Small),
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Count::Fit(i, b)),
        1 => any::<u64>().prop_map(Count::Huge),
    ];
    let kind = prop_oneof![6 => 0u32..5, 1 => 5u32..9, 1 => any::<u32>()];
    prop_oneof![
        2 => (size, policy, prop::bool::weighted(0.05))
            .prop_map(|(size, policy, null_out)| MemOp::Malloc { size, policy, null_out }),
        2 => ptr().prop_map(MemOp::Free),
        6 => (side(), side(), count, any::<i8>(), kind).prop_map(|(dst, src, count, dest_max_delta, kind)| {
            MemOp::Memcpy { dst, src, count, dest_max_delta, kind }
        }),
    ]
}

/// A live allocation and what the test knows it holds (including the runtime's padding).
struct Live {
    ptr: u64,
    size: usize,
    /// Usable bytes (requested size plus padding), probed after allocation.
    capacity: usize,
    shadow: Vec<u8>,
}

/// The case's allocations; frees whatever is still live on drop.
struct Pool<'a> {
    api: &'a Api,
    live: Vec<Live>,
    freed: Vec<u64>,
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        if let Ok(f) = self.api.aclrtFree() {
            for l in self.live.drain(..) {
                // SAFETY: a live allocation of this case, freed once.
                let _ = unsafe { f(l.ptr as usize as *mut c_void) };
            }
        }
    }
}

fn try_read(api: &Api, src: u64, len: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len];
    let f = api.aclrtMemcpy().ok()?;
    // SAFETY: the host side is a live buffer of `len` bytes.
    let code =
        unsafe { f(out.as_mut_ptr().cast(), len, src as usize as *const c_void, len, sys::ACL_MEMCPY_DEVICE_TO_HOST) };
    (code == 0).then_some(out)
}

impl Pool<'_> {
    fn resolve(&self, p: Ptr) -> u64 {
        let live = |i: usize| self.live.get(i % self.live.len().max(1));
        let anchor = self.live.first().map_or(SIM_DEVICE_BASE, |l| l.ptr);
        match p {
            Ptr::Null => 0,
            Ptr::Base(i) => live(i).map_or(anchor, |l| l.ptr),
            Ptr::Inner(i, off) => live(i).map_or(anchor, |l| l.ptr) + u64::from(off),
            Ptr::Before(i, off) => {
                live(i).map_or(anchor, |l| l.ptr).saturating_sub(u64::from(off)).max(SIM_DEVICE_BASE)
            }
            Ptr::Freed(i) => self.freed.get(i % self.freed.len().max(1)).copied().unwrap_or(anchor),
            Ptr::Wild(off) => SIM_DEVICE_BASE + off,
            Ptr::End(k) => u64::MAX - u64::from(k),
        }
    }

    /// The live allocation and offset holding `[addr, addr + len)`, if entirely inside one.
    fn locate(&self, addr: u64, len: u64) -> Option<(usize, usize)> {
        self.live.iter().enumerate().find_map(|(i, l)| {
            let off = addr.checked_sub(l.ptr)?;
            (off.checked_add(len)? <= l.capacity as u64 && off < l.capacity as u64).then_some((i, off as usize))
        })
    }

    fn verify(&self, what: &str) -> Result<(), TestCaseError> {
        for l in &self.live {
            let now = try_read(self.api, l.ptr, l.capacity).expect("live allocation readable");
            prop_assert!(now == l.shadow, "{what}: allocation {:#x} changed unexpectedly", l.ptr);
        }
        Ok(())
    }
}

fn run_mem_ops(api: &Api, ops: &[MemOp]) -> Result<(), TestCaseError> {
    let mut pool = Pool { api, live: Vec::new(), freed: Vec::new() };
    let mut rng = fastrand::Rng::with_seed(ops.len() as u64);
    let malloc = api.aclrtMalloc().expect("aclrtMalloc");
    let free = api.aclrtFree().expect("aclrtFree");
    let memcpy = api.aclrtMemcpy().expect("aclrtMemcpy");
    const FLAGS: u32 =
        sys::ACL_MEM_TYPE_LOW_BAND_WIDTH | sys::ACL_MEM_TYPE_HIGH_BAND_WIDTH | sys::ACL_MEM_ACCESS_USER_SPACE_READONLY;
    for (step, op) in ops.iter().enumerate() {
        let what = format!("step {step} {op:?}");
        match *op {
            MemOp::Malloc { size, policy, null_out } => {
                let mut out: *mut c_void = std::ptr::null_mut();
                let out_ptr: *mut *mut c_void = if null_out { std::ptr::null_mut() } else { &mut out };
                // SAFETY: a valid out-pointer or null (checked by the runtime); sizes beyond the
                // device fail without allocating host memory for them.
                let code = unsafe { malloc(out_ptr, size as usize, policy) };
                let expected = if null_out || size == 0 || (policy & !FLAGS) > 7 {
                    sys::ACL_ERROR_INVALID_PARAM
                } else if size > 64 << 30 {
                    sys::ACL_ERROR_RT_MEMORY_ALLOCATION
                } else {
                    0
                };
                prop_assert_eq!(code, expected, "{}", what);
                if code == 0 {
                    let ptr = out as usize as u64;
                    prop_assert!(ptr >= SIM_DEVICE_BASE);
                    let size = size as usize;
                    // Probe the usable size (padding included): reads up to it work, beyond fail.
                    let capacity = (size..size + 128)
                        .take_while(|c| try_read(api, ptr, *c + 1).is_some())
                        .last()
                        .map_or(size, |c| c + 1);
                    prop_assert!(capacity < size + 64, "{}: capacity {} for {} bytes", what, capacity, size);
                    let shadow: Vec<u8> = (0..capacity).map(|_| rng.u8(..)).collect();
                    write(api, ptr, &shadow);
                    pool.live.push(Live { ptr, size, capacity, shadow });
                }
            }
            MemOp::Free(p) => {
                let addr = pool.resolve(p);
                // SAFETY: the simulator looks the address up without dereferencing it.
                let code = unsafe { free(addr as usize as *mut c_void) };
                let idx = pool.live.iter().position(|l| l.ptr == addr);
                let expected = match (addr, idx) {
                    (0, _) => sys::ACL_ERROR_INVALID_PARAM,
                    (_, Some(_)) => 0,
                    _ => sys::ACL_ERROR_RT_PARAM_INVALID,
                };
                prop_assert_eq!(code, expected, "{}", what);
                if let Some(i) = idx {
                    pool.live.remove(i);
                    pool.freed.push(addr);
                }
            }
            MemOp::Memcpy { dst, src, count, dest_max_delta, kind } => {
                let host_involved = matches!(dst, Side::Host) || matches!(src, Side::Host);
                let mut count = match count {
                    Count::Zero => 0,
                    Count::Small(n) => u64::from(n),
                    Count::Fit(i, back) => pool
                        .live
                        .get(i % pool.live.len().max(1))
                        .map_or(16, |l| (l.size as u64).saturating_sub(u64::from(back))),
                    Count::Huge(n) => n,
                };
                if host_involved {
                    count = count.min(MIB as u64);
                }
                let dest_max = count.saturating_add_signed(i64::from(dest_max_delta)) as usize;
                let mut host_dst = vec![0u8; if matches!(dst, Side::Host) { count as usize } else { 0 }];
                let host_src: Vec<u8> =
                    if matches!(src, Side::Host) { (0..count).map(|_| rng.u8(..)).collect() } else { Vec::new() };
                rng.fill(&mut host_dst);
                let host_dst_before = host_dst.clone();
                let dst_addr = match dst {
                    Side::Host => host_dst.as_mut_ptr() as usize as u64,
                    Side::Dev(p) => pool.resolve(p),
                };
                let src_addr = match src {
                    Side::Host => host_src.as_ptr() as usize as u64,
                    Side::Dev(p) => pool.resolve(p),
                };
                // SAFETY: host sides are buffers of this test, each exactly `count` bytes long;
                // device sides are device-range addresses the simulator checks before copying.
                let code = unsafe {
                    memcpy(
                        dst_addr as usize as *mut c_void,
                        dest_max,
                        src_addr as usize as *const c_void,
                        count as usize,
                        kind,
                    )
                };
                // The model: documented checks in the runtime's order.
                let is_dev = |a: u64| a >= SIM_DEVICE_BASE;
                let (dst_dev, src_dev) = (is_dev(dst_addr), is_dev(src_addr));
                let sides_ok = match kind {
                    sys::ACL_MEMCPY_HOST_TO_HOST => !dst_dev && !src_dev,
                    sys::ACL_MEMCPY_HOST_TO_DEVICE => dst_dev && !src_dev,
                    sys::ACL_MEMCPY_DEVICE_TO_HOST => !dst_dev && src_dev,
                    sys::ACL_MEMCPY_DEVICE_TO_DEVICE => dst_dev && src_dev,
                    _ => true,
                };
                let dst_loc = if dst_dev { pool.locate(dst_addr, count) } else { None };
                let src_loc = if src_dev { pool.locate(src_addr, count) } else { None };
                let expected = if count == 0 {
                    0
                } else if dst_addr == 0 || src_addr == 0 || kind > sys::ACL_MEMCPY_DEFAULT || count as usize > dest_max
                {
                    sys::ACL_ERROR_INVALID_PARAM
                } else if !sides_ok || (dst_dev && dst_loc.is_none()) || (src_dev && src_loc.is_none()) {
                    sys::ACL_ERROR_RT_PARAM_INVALID
                } else {
                    0
                };
                prop_assert_eq!(code, expected, "{} (dst {:#x}, src {:#x}, count {})", what, dst_addr, src_addr, count);
                // The effect, applied to the model.
                if code == 0 && count > 0 {
                    let n = count as usize;
                    let data = match src_loc {
                        Some((i, off)) => pool.live[i].shadow[off..off + n].to_vec(),
                        None => host_src.clone(),
                    };
                    match dst_loc {
                        Some((i, off)) => pool.live[i].shadow[off..off + n].copy_from_slice(&data),
                        None => prop_assert_eq!(&host_dst, &data, "{}: host destination", what),
                    }
                } else {
                    prop_assert_eq!(&host_dst, &host_dst_before, "{}: host destination written by a failed copy", what);
                }
                pool.verify(&what)?;
            }
        }
    }
    drop(pool);
    let stats = aclnn::sim::stats();
    prop_assert!(stats.violations.is_empty(), "violations: {:?}", stats.violations);
    prop_assert_eq!(stats.live_allocations, 0);
    Ok(())
}

#[test]
fn raw_memory_calls_with_arbitrary_arguments_stay_inside_allocations() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    let started = Instant::now();
    {
        let device = h.runtime.device(0).expect("device 0");
        let api = h.runtime.api();
        run(96, prop::collection::vec(mem_op(), 1..24), |ops| {
            device.bind().expect("bind");
            run_mem_ops(api, &ops)
        });
    }
    println!("C-level memory fuzz: 96 cases in {:.2?}", started.elapsed());
    h.assert_clean();
}

/// `aclrtMalloc` sizes the safe layer never passes (above `isize::MAX`) must still fail with the
/// documented out-of-memory code, not the simulator's internal error.
#[test]
fn malloc_of_sizes_near_usize_max_is_out_of_memory() {
    if !common::on_sim() {
        return;
    }
    let h = common::harness();
    {
        let _device = h.runtime.device(0).expect("device 0");
        let malloc = h.runtime.api().aclrtMalloc().expect("aclrtMalloc");
        for size in [usize::MAX, usize::MAX - 31, usize::MAX - 64, (isize::MAX as usize) + 1] {
            let mut out: *mut c_void = std::ptr::null_mut();
            // SAFETY: valid out-pointer; the size cannot be satisfied.
            let code = unsafe { malloc(&mut out, size, sys::ACL_MEM_MALLOC_HUGE_FIRST) };
            assert_eq!(code, sys::ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMalloc({size:#x})");
        }
    }
    h.assert_clean();
}
