//! Benchmark table for the host INT4 / FP4 packing kernels (`aclnn::kernels`).
//!
//! For each weight size it prints one table: the read floor, a `memcpy` of the input, the
//! CANN-style scalar host loop (`kernels::reference`), and every kernel of ours, each with its
//! median time over at least 7 runs and its ratio to the read floor with the same number of
//! threads. The floor is the fastest read-only pass over the `int32` input this CPU manages (the
//! best of rayon and OS threads, scalar and the widest SIMD with 1-8 streams per thread; the
//! all-threads floor is never slower than the one-thread floor), and for flushed inputs it is
//! re-timed alternately with each kernel, so both sides of a ratio see the same machine. The input is flushed
//! from the cache before every run (a buffer larger than the last-level cache is written and
//! read). After each table, the range check's cost: every checked kernel timed alternately with
//! its unchecked twin. It ends with the simulator's copy counters (bytes moved per weight by the
//! operator path against the host fast path) and the host path end to end.
//!
//! ```text
//! cargo run --example bench_pack                      # quick mode (small sizes, a few seconds)
//! cargo run --release --example bench_pack -- --full  # 64x64, 4096x11008 and 8192x28672
//! ```
//!
//! Options: `--full`, `--runs N` (default 7), `--size KxN` (repeatable, replaces the sizes).

use std::hint::black_box;
use std::time::{Duration, Instant};

use aclnn::kernels::{self, GroupOffset, NzGeometry};
use aclnn::ops::int4pack::{self, PackOptions};
use aclnn::{Backend, DType, DeviceBuffer, Format, Runtime, Tensor, TensorDesc};
use rayon::prelude::*;

type BoxError = Box<dyn std::error::Error>;

struct Options {
    full: bool,
    runs: usize,
    sizes: Vec<(usize, usize)>,
}

fn parse_args() -> Result<Options, BoxError> {
    let mut opts = Options { full: false, runs: 7, sizes: Vec::new() };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--full" => opts.full = true,
            "--runs" => opts.runs = args.next().ok_or("--runs needs a value")?.parse()?,
            "--size" => {
                let s = args.next().ok_or("--size needs KxN")?;
                let (k, n) = s.split_once('x').ok_or("--size needs KxN")?;
                opts.sizes.push((k.parse()?, n.parse()?));
            }
            other => return Err(format!("unknown argument {other:?} (use --full, --runs N, --size KxN)").into()),
        }
    }
    opts.runs = opts.runs.max(7);
    if opts.sizes.is_empty() {
        opts.sizes = if opts.full { vec![(64, 64), (4096, 11008), (8192, 28672)] } else { vec![(64, 64), (256, 2048)] };
    }
    Ok(opts)
}

/// Evicts the benchmark data from the caches by writing and reading a buffer larger than the LLC.
struct Flusher {
    buf: Vec<u64>,
    round: u64,
}

impl Flusher {
    fn new() -> Self {
        let bytes = (kernels::last_level_cache_bytes() * 3 / 2).max(64 << 20);
        Flusher { buf: vec![1; bytes / 8], round: 0 }
    }

    fn flush(&mut self) {
        self.round += 1;
        let r = self.round;
        let sum: u64 = self
            .buf
            .par_chunks_mut(1 << 16)
            .map(|c| {
                let mut s = 0u64;
                for line in c.chunks_mut(8) {
                    line[0] = line[0].wrapping_add(r);
                    s = s.wrapping_add(line[0]);
                }
                s
            })
            .sum();
        black_box(sum);
    }
}

/// Median of `runs` timings of `f`, each after a cache flush; `f` runs in `pool` if given.
fn measure(
    runs: usize,
    flusher: &mut Flusher,
    pool: Option<&rayon::ThreadPool>,
    f: &mut (dyn FnMut() + Send),
) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            flusher.flush();
            match pool {
                Some(p) => p.install(|| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                }),
                None => {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                }
            }
        })
        .collect();
    times.sort();
    times[runs / 2]
}

/// One timed call of `f`, in `pool` if given.
fn time_once(pool: Option<&rayon::ThreadPool>, f: &mut (dyn FnMut() + Send)) -> Duration {
    let mut run = || {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    match pool {
        Some(p) => p.install(run),
        None => run(),
    }
}

/// Medians of `f` and of the floor, timed alternately (each after a cache flush): the ratio of
/// the two is measured under the same conditions. Each rep's floor is the fastest of `floors`
/// (the best few ways of doing the floor's work), so a floor cannot lose to a kernel by one
/// variant's bad luck.
fn measure_pair(
    runs: usize,
    flusher: &mut Flusher,
    pool: Option<&rayon::ThreadPool>,
    floors_fns: &mut [Box<dyn FnMut() + Send + '_>],
    f: &mut (dyn FnMut() + Send),
) -> (Duration, Duration) {
    let (mut times, mut floors) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let best = floors_fns
            .iter_mut()
            .map(|floor| {
                flusher.flush();
                time_once(pool, &mut **floor)
            })
            .min()
            .expect("at least one floor");
        floors.push(best);
        flusher.flush();
        times.push(time_once(pool, f));
    }
    times.sort();
    floors.sort();
    (times[runs / 2], floors[runs / 2])
}

/// Median over `runs` batches of the time of one call of `f` (hot cache; for tiny inputs); the
/// whole measurement runs in `pool` if given.
fn measure_hot(runs: usize, pool: Option<&rayon::ThreadPool>, f: &mut (dyn FnMut() + Send)) -> Duration {
    match pool {
        Some(p) => p.install(|| measure_hot_here(runs, f)),
        None => measure_hot_here(runs, f),
    }
}

fn measure_hot_here(runs: usize, f: &mut (dyn FnMut() + Send)) -> Duration {
    // Calibrate the batch so that it lasts about 4 ms.
    let t = Instant::now();
    let mut calls = 0u32;
    while t.elapsed() < Duration::from_millis(2) {
        f();
        calls += 1;
    }
    let batch = (calls * 2).max(1);
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                f();
            }
            t.elapsed() / batch
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn xorshift(seed: u64, n: usize) -> impl Iterator<Item = u64> {
    let mut s = seed | 1;
    (0..n).map(move |_| {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// In-range int4 values, generated in parallel.
fn int_input(n: usize) -> Vec<i32> {
    let mut v = vec![0i32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        for (x, r) in c.iter_mut().zip(xorshift(i as u64 + 1, usize::MAX)) {
            *x = (r >> 60) as i32 - 8;
        }
    });
    v
}

/// Finite FP4-range values (exact codes and arbitrary values in [-6, 6]).
fn float_input(n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        for (x, r) in c.iter_mut().zip(xorshift(i as u64 + 7, usize::MAX)) {
            *x = if r & 1 == 0 {
                kernels::fp4_value((r >> 60) as u8)
            } else {
                (r >> 40) as f32 / (1u64 << 24) as f32 * 12.0 - 6.0
            };
        }
    });
    v
}

/// A host loop written like CANN's: one element at a time, the destination byte and nibble
/// found by div/mod of the element index, read-modify-write of the output byte, and (for NZ) a
/// second pass that scatters every byte with div/mod, into a zeroed buffer. `black_box` on the
/// index keeps LLVM from turning it into the vectorised kernel it is compared against.
fn cann_style_pack(src: &[i32], nd: &mut [u8], nz: Option<(NzGeometry, &mut [u8])>) {
    nd.fill(0);
    for i in 0..src.len() {
        let i = black_box(i);
        let code = (src[i] & 0xF) as u8;
        nd[i / 2] |= code << ((i % 2) * 4);
    }
    if let Some((g, out)) = nz {
        out.fill(0);
        let (kk, nb, c0) = (g.rows, g.row_bytes, g.c0);
        let k1 = kk.div_ceil(16);
        for (src_idx, &b) in nd.iter().enumerate() {
            let src_idx = black_box(src_idx);
            let (r, c) = (src_idx / nb, src_idx % nb);
            out[(c / c0) * (k1 * 16 * c0) + (r / 16) * (16 * c0) + (r % 16) * c0 + c % c0] = b;
        }
    }
}

/// CANN-style FP4 loop: the masked bits looked up in a map per element.
fn cann_style_pack_fp4(src: &[f32], nd: &mut [u8]) {
    use std::collections::HashMap;
    let table: HashMap<u32, u8> = (0u8..16).map(|c| (kernels::fp4_value(c).to_bits() & 0xFFC0_0000, c)).collect();
    nd.fill(0);
    for (i, x) in src.iter().enumerate() {
        let code = table.get(&(x.to_bits() & 0xFFC0_0000)).copied().unwrap_or(0);
        nd[i / 2] |= code << ((i % 2) * 4);
    }
}

fn read_floor_par(src: &[i32]) -> u32 {
    src.par_chunks(1 << 16).map(read_floor_serial).reduce(|| 0, |a, b| a ^ b)
}

fn read_floor_serial(src: &[i32]) -> u32 {
    src.iter().fold(0u32, |a, &x| a ^ x as u32)
}

/// XOR of `src` read as `S` interleaved streams of 16 lanes (several loads in flight per
/// thread, no dependency chain between them).
#[inline(always)]
fn xor_streams<const S: usize>(src: &[i32]) -> u32 {
    let part = src.len() / (16 * S) * 16;
    let mut acc = [[0u32; 16]; S];
    for i in (0..part).step_by(16) {
        for (s, acc) in acc.iter_mut().enumerate() {
            let block = &src[s * part + i..s * part + i + 16];
            for l in 0..16 {
                acc[l] ^= block[l] as u32;
            }
        }
    }
    let lanes = acc.iter().flatten().fold(0, |x, y| x ^ y);
    src[S * part..].iter().fold(lanes, |x, &y| x ^ y as u32)
}

/// The best of 1, 2, 4 and 8 streams, compiled for one instruction set.
macro_rules! widest {
    ($name:ident, $feature:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        fn $name(src: &[i32], streams: usize) -> u32 {
            match streams {
                1 => xor_streams::<1>(src),
                2 => xor_streams::<2>(src),
                4 => xor_streams::<4>(src),
                _ => xor_streams::<8>(src),
            }
        }
    };
}
widest!(xor_avx512, "avx512f");
widest!(xor_avx2, "avx2");

/// Reads with the widest SIMD this CPU has and `streams` streams per thread.
fn wide_read(src: &[i32], streams: usize) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked just above).
            return unsafe { xor_avx512(src, streams) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            return unsafe { xor_avx2(src, streams) };
        }
    }
    match streams {
        1 => xor_streams::<1>(src),
        2 => xor_streams::<2>(src),
        4 => xor_streams::<4>(src),
        _ => xor_streams::<8>(src),
    }
}

/// What the write floor writes: non-zero, because all-zero lines are cheaper on some machines.
const PATTERN: i32 = 0x5A3C_0F96;

/// Writes [`PATTERN`] over `dst` with non-temporal stores where the CPU has AVX2 (no read for
/// ownership), else with `fill`.
fn write_streaming(dst: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above).
        return unsafe { stream_pattern_avx2(dst) };
    }
    dst.fill(black_box(PATTERN));
}

/// [`write_streaming`] with AVX2 `vmovntdq`.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_pattern_avx2(dst: &mut [i32]) {
    use std::arch::x86_64::*;
    // SAFETY: `align_to_mut` only reinterprets the aligned middle part as 32-byte blocks of
    // `__m256i`, for which every bit pattern of `i32`s is valid.
    let (head, middle, tail) = unsafe { dst.align_to_mut::<__m256i>() };
    head.fill(PATTERN);
    tail.fill(PATTERN);
    let value = _mm256_set1_epi32(black_box(PATTERN));
    for v in middle {
        // SAFETY: `v` is a valid, 32-byte aligned `__m256i` location, as `vmovntdq` requires.
        unsafe { _mm256_stream_si256(v, value) };
    }
    _mm_sfence();
}

/// Name of the widest SIMD [`wide_read`] uses here.
fn widest_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "AVX-512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "AVX2";
        }
    }
    "baseline SIMD"
}

/// The widest read on `threads` plain OS threads, each over one contiguous part.
fn read_floor_os_threads(src: &[i32], threads: usize, streams: usize) -> u32 {
    let part = src.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = src.chunks(part).map(|p| s.spawn(move || wide_read(p, streams))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0, |a, b| a ^ b)
    })
}

/// The widest read over rayon, one large part per worker.
fn read_floor_rayon_wide(src: &[i32], streams: usize) -> u32 {
    let part = src.len().div_ceil(rayon::current_num_threads()).max(1 << 12);
    src.par_chunks(part).map(|p| wide_read(p, streams)).reduce(|| 0, |a, b| a ^ b)
}

struct Row {
    name: String,
    threads: &'static str,
    time: Duration,
    /// The read floor of the same int32 input (none for kernels that read something else).
    floor: Option<Duration>,
}

fn print_table(k: usize, n: usize, flushed: bool, rows: &[Row]) {
    let weights = k * n;
    println!();
    println!(
        "== int32/f32 input {k} x {n} ({:.1} MiB of input, {}) ==",
        (weights * 4) as f64 / (1 << 20) as f64,
        if flushed { "input flushed from cache before each run" } else { "hot cache, batched calls" }
    );
    println!("{:<44} {:>8} {:>11} {:>9} {:>9} {:>8}", "kernel", "threads", "median", "GB/s in", "ns/wt", "x floor");
    for r in rows {
        let secs = r.time.as_secs_f64();
        let ratio = r.floor.map_or("n/a".to_string(), |f| format!("{:.2}", secs / f.as_secs_f64()));
        println!(
            "{:<44} {:>8} {:>9.3}ms {:>9.2} {:>9.3} {:>8}",
            r.name,
            r.threads,
            secs * 1e3,
            (weights * 4) as f64 / secs / 1e9,
            secs * 1e9 / weights as f64,
            ratio
        );
    }
}

fn bench_size(k: usize, n: usize, runs: usize, flusher: &mut Flusher, one: &rayon::ThreadPool) {
    let weights = k * n;
    let ints = int_input(weights);
    let floats = float_input(weights);
    let geom = NzGeometry::new(1, k, n / 2, 32);
    let mut nd = vec![0xAAu8; weights / 2];
    let mut nz = vec![0xAAu8; geom.total_bytes()];
    let mut unpacked = vec![0i32; weights];
    let mut copy = vec![0i32; weights];
    let small = weights * 4 < (4 << 20);

    // Small inputs: hot-cache batches (thread start-up is what matters there); large: flushed.
    let mut timer = |pool: Option<&rayon::ThreadPool>, f: &mut (dyn FnMut() + Send)| {
        if small { measure_hot(runs, pool, f) } else { measure(runs, flusher, pool, f) }
    };
    // The floor is the fastest read-only pass this CPU can do: the best of several ways of
    // reading (rayon or OS threads, scalar fold or the widest SIMD with 1-8 streams per thread).
    let threads = rayon::current_num_threads();
    let isa = widest_isa();
    type Read = std::sync::Arc<dyn Fn(&[i32]) -> u32 + Send + Sync>;
    let mut reads_all: Vec<(String, Read)> = vec![("rayon, scalar fold".into(), std::sync::Arc::new(read_floor_par))];
    let mut reads_one: Vec<(String, Read)> = vec![("scalar fold".into(), std::sync::Arc::new(read_floor_serial))];
    for streams in [1, 2, 4, 8] {
        reads_all.push((
            format!("rayon, {streams} stream(s)"),
            std::sync::Arc::new(move |s| read_floor_rayon_wide(s, streams)),
        ));
        reads_all.push((
            format!("OS threads, {streams} stream(s)"),
            std::sync::Arc::new(move |s| read_floor_os_threads(s, threads, streams)),
        ));
        reads_one.push((format!("{streams} stream(s)"), std::sync::Arc::new(move |s| wide_read(s, streams))));
    }
    // The kernels' own shape: many 256 KiB pieces shared out by rayon, each read with the widest
    // SIMD in one stream.
    reads_all.push((
        "rayon, 256 KiB pieces, 1 stream".into(),
        std::sync::Arc::new(|s: &[i32]| s.par_chunks(1 << 16).map(|p| wide_read(p, 1)).reduce(|| 0, |a, b| a ^ b)),
    ));
    // The candidates, fastest first (one timing each); the three best stay in the race.
    let mut ranked = |reads: Vec<(String, Read)>, pool: Option<&rayon::ThreadPool>| {
        let mut timed: Vec<(String, Read, Duration)> = reads
            .into_iter()
            .map(|(name, read)| {
                let t = timer(pool, &mut || {
                    black_box(read(black_box(&ints)));
                });
                (name, read, t)
            })
            .collect();
        timed.sort_by_key(|(_, _, t)| *t);
        timed.truncate(3);
        timed
    };
    let top_one = ranked(reads_one, Some(one));
    let (how_one, floor_one) = (top_one[0].0.clone(), top_one[0].2);
    // Using every core can never be slower than using one: the one-thread floor bounds it.
    reads_all.push((format!("one thread, {how_one}"), top_one[0].1.clone()));
    let top_all = ranked(reads_all, None);
    let floor_all = top_all[0].2;
    let names = |top: &[(String, Read, Duration)]| top.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join(" | ");
    println!("read floor: {isa}; all threads: {}; one thread: {}", names(&top_all), names(&top_one));
    // Every kernel is timed rep by rep alternating with the floor of its thread count (flushed
    // inputs), so a slow or fast phase of the machine affects both sides of its ratio; in each
    // rep the floor is the fastest of the three best ways of reading, so one unlucky timing
    // of a read cannot make the floor slower than a kernel.
    let mut paired = |pool: Option<&rayon::ThreadPool>, f: &mut (dyn FnMut() + Send)| -> (Duration, Duration) {
        let (top, floor) = if pool.is_some() { (&top_one, floor_one) } else { (&top_all, floor_all) };
        if small {
            (measure_hot(runs, pool, f), floor)
        } else {
            let mut floors: Vec<Box<dyn FnMut() + Send + '_>> = top
                .iter()
                .map(|(_, read, _)| {
                    let read = read.clone();
                    let ints = &ints;
                    Box::new(move || {
                        black_box(read(black_box(ints)));
                    }) as Box<dyn FnMut() + Send>
                })
                .collect();
            measure_pair(runs, flusher, pool, &mut floors, f)
        }
    };
    let mut rows = Vec::new();
    let mut row = |name: &str, threads: &'static str, (time, floor): (Duration, Duration)| {
        rows.push(Row { name: name.to_string(), threads, time, floor: Some(floor) });
    };
    row("read floor (xor of all int32)", "all", (floor_all, floor_all));
    row("read floor (xor of all int32)", "1", (floor_one, floor_one));
    let t = paired(None, &mut || {
        copy.par_chunks_mut(1 << 16).zip(ints.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
    });
    row("memcpy of the int32 input", "all", t);
    let t = paired(None, &mut || cann_style_pack(black_box(&ints), &mut nd, None));
    row("CANN-style scalar host loop, ND", "1", t);
    let t = paired(None, &mut || cann_style_pack(black_box(&ints), &mut nd, Some((geom, &mut nz))));
    row("CANN-style scalar host loop, ND + NZ", "1", t);
    let t = paired(None, &mut || {
        black_box(kernels::reference::pack_int4(black_box(&ints)));
    });
    row("kernels::reference::pack_int4 (naive, vectorised)", "1", t);

    let t_nd = paired(None, &mut || kernels::pack_int4(black_box(&ints), &mut nd).unwrap());
    row("pack_int4 (ND)", "all", t_nd);
    let t = paired(None, &mut || kernels::pack_int4_checked(black_box(&ints), &mut nd).unwrap());
    row("pack_int4_checked (ND, range check)", "all", t);
    let t = paired(Some(one), &mut || kernels::pack_int4(black_box(&ints), &mut nd).unwrap());
    row("pack_int4 (ND)", "1", t);
    let t = paired(Some(one), &mut || kernels::pack_int4_checked(black_box(&ints), &mut nd).unwrap());
    row("pack_int4_checked (ND, range check)", "1", t);
    let t = paired(None, &mut || kernels::pack_int4_nz_checked(black_box(&ints), geom, &mut nz).unwrap());
    row("pack_int4_nz_checked (fused NZ, c0=32)", "all", t);
    let t = paired(Some(one), &mut || kernels::pack_int4_nz_checked(black_box(&ints), geom, &mut nz).unwrap());
    row("pack_int4_nz_checked (fused NZ, c0=32)", "1", t);
    let t = paired(None, &mut || kernels::pack_fp4(black_box(&floats), &mut nd).unwrap());
    row("pack_fp4 (ND)", "all", t);
    let t = paired(None, &mut || cann_style_pack_fp4(black_box(&floats), &mut nd));
    row("CANN-style scalar host loop, FP4 (map lookup)", "1", t);
    let t = paired(None, &mut || kernels::pack_fp4_checked(black_box(&floats), &mut nd).unwrap());
    row("pack_fp4_checked (ND, range check)", "all", t);
    let t = paired(Some(one), &mut || kernels::pack_fp4(black_box(&floats), &mut nd).unwrap());
    row("pack_fp4 (ND)", "1", t);
    let t = paired(None, &mut || kernels::pack_fp4_nz_checked(black_box(&floats), geom, &mut nz).unwrap());
    row("pack_fp4_nz_checked (fused NZ, c0=32)", "all", t);
    if kernels::simd_path() == "avx512" {
        kernels::force_avx2_path(true);
        let t = paired(None, &mut || kernels::pack_int4(black_box(&ints), &mut nd).unwrap());
        row("pack_int4 (ND), AVX2 path", "all", t);
        let t = paired(None, &mut || kernels::pack_int4_checked(black_box(&ints), &mut nd).unwrap());
        row("pack_int4_checked (ND), AVX2 path", "all", t);
        let t = paired(None, &mut || kernels::pack_int4_nz_checked(black_box(&ints), geom, &mut nz).unwrap());
        row("pack_int4_nz_checked, AVX2 path", "all", t);
        let t = paired(None, &mut || kernels::pack_fp4(black_box(&floats), &mut nd).unwrap());
        row("pack_fp4 (ND), AVX2 path", "all", t);
        kernels::force_avx2_path(false);
    }
    kernels::force_plain_path(true);
    let t = paired(None, &mut || kernels::pack_int4(black_box(&ints), &mut nd).unwrap());
    row("pack_int4 (ND), plain path (no SIMD)", "all", t);
    let t = paired(Some(one), &mut || kernels::pack_int4(black_box(&ints), &mut nd).unwrap());
    row("pack_int4 (ND), plain path (no SIMD)", "1", t);
    let t = paired(None, &mut || kernels::pack_int4_nz_checked(black_box(&ints), geom, &mut nz).unwrap());
    row("pack_int4_nz_checked, plain path", "all", t);
    let t = paired(None, &mut || kernels::pack_fp4(black_box(&floats), &mut nd).unwrap());
    row("pack_fp4 (ND), plain path", "all", t);
    kernels::force_plain_path(false);
    kernels::pack_int4(&ints, &mut nd).unwrap();
    let t_nz = paired(None, &mut || kernels::nd_to_nz(black_box(&nd), geom, GroupOffset::Padded, &mut nz).unwrap());
    // Unpacking writes 8x what it reads: its floor is the fastest write of the int32 output
    // (memset through rayon, or non-temporal SIMD stores where the CPU has them), of non-zero
    // data: this VM writes all-zero lines twice as fast as any other (75-88 against 40 GB/s
    // with non-temporal stores), which no real output is.
    let mut unpack = || kernels::unpack_int4(black_box(&nd), &mut unpacked).unwrap();
    let t = if small {
        let mut fill = || copy.par_chunks_mut(1 << 16).for_each(|c| c.fill(black_box(PATTERN)));
        let floor = measure_hot(runs, None, &mut fill);
        (measure_hot(runs, None, &mut unpack), floor)
    } else {
        let copy_cell = std::sync::Mutex::new(&mut copy);
        let fill: Box<dyn FnMut() + Send + '_> =
            Box::new(|| copy_cell.lock().unwrap().par_chunks_mut(1 << 16).for_each(|c| c.fill(black_box(PATTERN))));
        let streamed: Box<dyn FnMut() + Send + '_> =
            Box::new(|| copy_cell.lock().unwrap().par_chunks_mut(1 << 16).for_each(write_streaming));
        measure_pair(runs, flusher, None, &mut [fill, streamed], &mut unpack)
    };
    rows.push(Row {
        name: "write floor (int32 output, best of 2)".into(),
        threads: "all",
        time: t.1,
        floor: Some(t.1),
    });
    rows.push(Row {
        name: "unpack_int4 (writes int32) vs write floor".into(),
        threads: "all",
        time: t.0,
        floor: Some(t.1),
    });
    // nd_to_nz reads the packed bytes (1/8 of the int32 input): no ratio to the int32 read floor.
    rows.push(Row { name: "nd_to_nz (packed bytes only)".into(), threads: "all", time: t_nz.0, floor: None });
    print_table(k, n, !small, &rows);
    // The range check's cost: each checked kernel timed alternately with its unchecked twin
    // (each after a cache flush), three times as many reps as the table, so that both sides of
    // the ratio see the same machine.
    println!();
    println!("range check cost ({k} x {n}, checked and unchecked timed alternately, {} reps):", 3 * runs);
    println!("{:<44} {:>8} {:>11} {:>11} {:>8}", "kernel", "threads", "unchecked", "checked", "extra");
    let checks: [(&str, Option<&rayon::ThreadPool>, bool); 3] = [
        ("pack_int4_checked / pack_int4", None, false),
        ("pack_int4_checked / pack_int4", Some(one), false),
        ("pack_fp4_checked / pack_fp4", None, true),
    ];
    for (name, pool, fp4) in checks {
        let nd_cell = std::sync::Mutex::new(&mut nd);
        let (ints, floats) = (&ints, &floats);
        let unchecked = move |d: &mut [u8]| {
            if fp4 {
                kernels::pack_fp4(black_box(floats), d).unwrap()
            } else {
                kernels::pack_int4(black_box(ints), d).unwrap()
            }
        };
        let checked = move |d: &mut [u8]| {
            if fp4 {
                kernels::pack_fp4_checked(black_box(floats), d).unwrap()
            } else {
                kernels::pack_int4_checked(black_box(ints), d).unwrap()
            }
        };
        let (c, u) = if small {
            let u = measure_hot(3 * runs, pool, &mut || unchecked(&mut nd_cell.lock().unwrap()));
            (measure_hot(3 * runs, pool, &mut || checked(&mut nd_cell.lock().unwrap())), u)
        } else {
            let base: Box<dyn FnMut() + Send + '_> = Box::new(|| unchecked(&mut nd_cell.lock().unwrap()));
            measure_pair(3 * runs, flusher, pool, &mut [base], &mut || checked(&mut nd_cell.lock().unwrap()))
        };
        println!(
            "{:<44} {:>8} {:>9.3}ms {:>9.3}ms {:>+7.1}%",
            name,
            if pool.is_some() { "1" } else { "all" },
            u.as_secs_f64() * 1e3,
            c.as_secs_f64() * 1e3,
            (ratio(c, u) - 1.0) * 100.0
        );
    }
    if small {
        let n_auto = rows.iter().find(|r| r.name == "pack_int4 (ND)" && r.threads == "all").map(|r| r.time);
        let n_one = rows.iter().find(|r| r.name == "pack_int4 (ND)" && r.threads == "1").map(|r| r.time);
        if let (Some(a), Some(o)) = (n_auto, n_one) {
            println!(
                "small weight: default pack_int4 {:.0} ns vs single-thread pool {:.0} ns ({} elements < \
                 PARALLEL_THRESHOLD = {}: no thread start-up)",
                a.as_secs_f64() * 1e9,
                o.as_secs_f64() * 1e9,
                weights,
                kernels::parallel_threshold()
            );
        }
    }
}

/// Bytes moved between host and device per weight: operator path vs host fast path.
fn traffic(k: usize, n: usize) -> Result<(), BoxError> {
    let weights = k * n;
    let ints = int_input(weights);
    // Counting copies needs the simulator's counters, whatever ACLNN_BACKEND says.
    let runtime = Runtime::new(Backend::sim(aclnn::sim::SimConfig::default())?)?;
    println!("backend: {} (copy counts come from the simulated device)", runtime.backend_name());
    let device = runtime.device(0)?;
    let stream = device.new_stream()?;
    let shape = [k as i64, n as i64];
    println!();
    println!("== simulator copy counters, int32 weight {k} x {n}, INT32 containers ==");
    println!("{:<52} {:>12} {:>12} {:>10} {:>9}", "path", "host->dev B", "dev->host B", "other B", "B/weight");
    for format in [Format::Nd, Format::FractalNz] {
        let options = PackOptions { format, ..PackOptions::default() };
        aclnn::sim::reset_counters();
        let packed_op = {
            let buffer = DeviceBuffer::from_host(&stream, &ints)?;
            let weight = Tensor::new(&buffer, TensorDesc::nd(DType::Int32, &shape))?;
            int4pack::convert_weight_to_int4_pack(&weight, options)?
        };
        let op = aclnn::sim::stats().copies;
        aclnn::sim::reset_counters();
        let packed_host = int4pack::pack_int4_on_host(&stream, &ints, &shape, options)?;
        let host = aclnn::sim::stats().copies;
        if packed_op.to_host_bytes()? != packed_host.to_host_bytes()? {
            return Err("operator and host paths disagree".into());
        }
        for (name, c) in [
            (format!("operator (upload int32, D2H, pack, H2D), {format:?}"), op),
            (format!("host fast path (pack, upload packed), {format:?}"), host),
        ] {
            let other = c.device_to_device + c.host_to_host;
            let total = c.host_to_device + c.device_to_host + other;
            println!(
                "{:<52} {:>12} {:>12} {:>10} {:>9.2}",
                name,
                c.host_to_device,
                c.device_to_host,
                other,
                total as f64 / weights as f64
            );
        }
    }
    stream.synchronize()?;
    Ok(())
}

/// The host path end to end on the simulated device: pack + upload (until the stream has run
/// the copies) against the pack alone into a reused buffer, each timed alternately with it.
/// Rows: the previous design (a zeroed `Vec`, the kernel, a synchronous upload), a one-off
/// `pack_int4_on_host`, and a reused `HostPacker` (chunks packed into pinned staging and
/// uploaded while the next is packed).
fn host_path(k: usize, n: usize, runs: usize, flusher: &mut Flusher) -> Result<(), BoxError> {
    let ints = int_input(k * n);
    let runtime = Runtime::new(Backend::sim(aclnn::sim::SimConfig::default())?)?;
    let device = runtime.device(0)?;
    let stream = device.new_stream()?;
    let shape = [k as i64, n as i64];
    println!();
    println!("== host path end to end, int32 weight {k} x {n} ({} backend) ==", runtime.backend_name());
    println!("(the simulator runs each upload as a host memcpy when the stream is synchronized; on a card the");
    println!(" DMA engine runs it while the host packs the next chunk)");
    println!("{:<58} {:>12} {:>9}", "path", "median", "vs pack");
    for format in [Format::Nd, Format::FractalNz] {
        let options = PackOptions { format, ..PackOptions::default() };
        let layout = int4pack::PackLayout::new(&shape, int4pack::WeightKind::Int4, options, aclnn::ChipFamily::A2A3)?;
        let mut out = vec![0u8; layout.bytes];
        let pack = |dst: &mut [u8]| match layout.nz {
            Some(geom) => kernels::pack_int4_nz_checked(black_box(&ints), geom, dst).unwrap(),
            None => kernels::pack_int4_checked(black_box(&ints), dst).unwrap(),
        };
        let mut alone = || pack(&mut out);
        let alone_t = measure(runs, flusher, None, &mut alone);
        println!("{:<58} {:>12.3?} {:>9.2}", format!("pack alone (into a reused buffer), {format:?}"), alone_t, 1.0);
        let mut packer = int4pack::HostPacker::new(&stream);
        let mut previous = || {
            let mut v = vec![0u8; layout.bytes];
            pack(&mut v);
            black_box(DeviceBuffer::from_host(&stream, &v).unwrap());
        };
        let mut one_off = || {
            let w = int4pack::pack_int4_on_host(&stream, &ints, &shape, options).unwrap();
            stream.synchronize().unwrap();
            black_box(w);
        };
        let mut reused = || {
            let w = packer.pack_int4(&ints, &shape, options).unwrap();
            stream.synchronize().unwrap();
            black_box(w);
        };
        let staged = aclnn::PinnedHostBuffer::from_slice(&device, &out)?;
        let mut upload_alone = || {
            let mut w = DeviceBuffer::<u8>::alloc(&stream, layout.bytes).unwrap();
            w.copy_from_pinned_async_on(&staged, &stream).unwrap();
            stream.synchronize().unwrap();
            black_box(w);
        };
        let rows: [(&str, &mut (dyn FnMut() + Send)); 4] = [
            ("upload alone (new device buffer, one pinned copy)", &mut upload_alone),
            ("zeroed Vec + pack + synchronous upload (previous)", &mut previous),
            ("pack_int4_on_host (one-off HostPacker)", &mut one_off),
            ("HostPacker reused (8 MiB chunks, pinned, overlapped)", &mut reused),
        ];
        for (name, f) in rows {
            let floor: Box<dyn FnMut() + Send + '_> = Box::new(|| pack(&mut out));
            let (t, floor_t) = measure_pair(runs, flusher, None, &mut [floor], f);
            println!("{:<58} {:>12.3?} {:>9.2}", format!("{name}, {format:?}"), t, ratio(t, floor_t));
        }
    }
    Ok(())
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

fn main() -> Result<(), BoxError> {
    let opts = parse_args()?;
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    println!(
        "bench_pack: {} mode, {} runs per median, {} rayon threads, LLC {} MiB, {} build",
        if opts.full { "full" } else { "quick" },
        opts.runs,
        rayon::current_num_threads(),
        kernels::last_level_cache_bytes() >> 20,
        if cfg!(debug_assertions) { "debug (numbers not meaningful)" } else { "release" }
    );
    println!("packing path: {}", kernels::simd_path());
    println!("ratios: 'all' rows against the all-cores read floor, '1' rows against the one-thread floor");
    let mut flusher = Flusher::new();
    for &(k, n) in &opts.sizes {
        bench_size(k, n, opts.runs, &mut flusher, &one);
    }
    threshold(opts.runs, &one);
    let (k, n) = if opts.full { (4096, 11008) } else { (256, 2048) };
    traffic(k, n)?;
    let &(k, n) = opts.sizes.iter().max_by_key(|(k, n)| k * n).expect("at least one size");
    host_path(k, n, opts.runs, &mut flusher)?;
    Ok(())
}

/// Where splitting across the pool starts to pay: `pack_int4` on hot inputs of growing size in a
/// one-thread pool, and split across the default pool (the threshold lowered to 1 for those two
/// columns, so every size really goes parallel) right after other parallel work (warm workers)
/// and after 20 ms of idleness (workers asleep, as between an engine's calls).
fn threshold(runs: usize, one: &rayon::ThreadPool) {
    println!();
    println!("== parallel threshold: pack_int4, hot input, median of {runs} single calls ==");
    let default = kernels::parallel_threshold();
    println!("(the kernels split at {default} elements; the pool columns force the split at every size)");
    println!("{:>10} {:>12} {:>12} {:>12}", "elements", "1 thread", "pool warm", "pool cold");
    let median = |f: &mut dyn FnMut() -> Duration| {
        let mut t: Vec<Duration> = (0..runs.max(7)).map(|_| f()).collect();
        t.sort();
        t[t.len() / 2]
    };
    for shift in 14..=24 {
        let len = 1usize << shift;
        let ints = int_input(len);
        let mut out = vec![0u8; len / 2];
        let serial = median(&mut || {
            one.install(|| {
                let t = Instant::now();
                kernels::pack_int4(black_box(&ints), &mut out).unwrap();
                t.elapsed()
            })
        });
        kernels::set_parallel_threshold(1);
        let warm = median(&mut || {
            (0..64).into_par_iter().for_each(|i| {
                black_box(i);
            });
            let t = Instant::now();
            kernels::pack_int4(black_box(&ints), &mut out).unwrap();
            t.elapsed()
        });
        let cold = median(&mut || {
            std::thread::sleep(Duration::from_millis(20));
            let t = Instant::now();
            kernels::pack_int4(black_box(&ints), &mut out).unwrap();
            t.elapsed()
        });
        kernels::set_parallel_threshold(default);
        println!("{len:>10} {:>12.2?} {:>12.2?} {:>12.2?}", serial, warm, cold);
    }
}
