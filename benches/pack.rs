//! Criterion benchmarks of the host packing kernels: ND pack (INT4 and FP4), fused FRACTAL_NZ
//! pack and unpack, over three weight sizes. `examples/bench_pack.rs` prints the comparison
//! table against the read floor; see `docs/performance.md`.

use std::hint::black_box;

use aclnn::kernels::{self, NzGeometry};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const SIZES: [(usize, usize); 3] = [(64, 64), (1024, 4096), (4096, 11008)];

fn ints(n: usize) -> Vec<i32> {
    (0..n).map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 16) as i32 - 8).collect()
}

fn floats(n: usize) -> Vec<f32> {
    (0..n).map(|i| kernels::fp4_value((i.wrapping_mul(2_654_435_761) >> 9) as u8)).collect()
}

fn bench(c: &mut Criterion) {
    for (k, n) in SIZES {
        let weights = k * n;
        let id = format!("{k}x{n}");
        let src = ints(weights);
        let fsrc = floats(weights);
        let geom = NzGeometry::new(1, k, n / 2, 32);
        let mut nd = vec![0u8; weights / 2];
        let mut nz = vec![0u8; geom.total_bytes()];
        let mut back = vec![0i32; weights];
        let mut g = c.benchmark_group("pack");
        g.throughput(Throughput::Bytes(weights as u64 * 4));
        if weights > 1 << 20 {
            g.sample_size(10);
        }
        g.bench_function(BenchmarkId::new("int4_nd", &id), |b| {
            b.iter(|| kernels::pack_int4(black_box(&src), &mut nd).unwrap())
        });
        g.bench_function(BenchmarkId::new("int4_nd_checked", &id), |b| {
            b.iter(|| kernels::pack_int4_checked(black_box(&src), &mut nd).unwrap())
        });
        g.bench_function(BenchmarkId::new("int4_nz_checked", &id), |b| {
            b.iter(|| kernels::pack_int4_nz_checked(black_box(&src), geom, &mut nz).unwrap())
        });
        g.bench_function(BenchmarkId::new("fp4_nd", &id), |b| {
            b.iter(|| kernels::pack_fp4(black_box(&fsrc), &mut nd).unwrap())
        });
        g.bench_function(BenchmarkId::new("fp4_nz_checked", &id), |b| {
            b.iter(|| kernels::pack_fp4_nz_checked(black_box(&fsrc), geom, &mut nz).unwrap())
        });
        kernels::pack_int4(&src, &mut nd).unwrap();
        g.bench_function(BenchmarkId::new("unpack_int4", &id), |b| {
            b.iter(|| kernels::unpack_int4(black_box(&nd), &mut back).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
