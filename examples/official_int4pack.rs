//! ops-nn's INT4Pack example program (`test_aclnn_convert_weight_to_int4_pack.cpp`), call for
//! call, in safe Rust: m = 16, k = 72, n = 17; x, weight and scale all ones; the weight stored
//! transposed as (n, k) int32 and packed to INT4 FRACTAL_NZ; the packed tensor re-initialised
//! (`aclInitTensor`) as the transposed (k, n) view; x and the scale cast to fp16 (`aclnnCast`);
//! `aclnnWeightQuantBatchMatmulV2`; y cast back to fp32. Every element is 72.0.
//!
//! `cargo run --example official_int4pack` (simulated device) or with `ACLNN_BACKEND=cann`.

use std::error::Error;

use aclnn::Runtime;
use aclnn::selftest::{EXPECTED, N, official_int4pack_w4a16};

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = Runtime::from_env()?;
    println!("backend: {}", runtime.backend_name());
    // The calls themselves are in src/selftest.rs (`aclnn::selftest`), shared with the tests.
    let y = official_int4pack_w4a16(&runtime, 16)?;
    for row in y.chunks(N as usize).take(2) {
        println!("y row: {row:?}");
    }
    if let Some((i, v)) = y.iter().enumerate().find(|(_, v)| **v != EXPECTED) {
        return Err(format!("y[{i}] = {v}, expected {EXPECTED:.1}").into());
    }
    println!("all {} elements of y are {EXPECTED:.1}, as the official example expects", y.len());
    Ok(())
}
