//! A W4A16 mixture-of-experts layer through `aclnnGroupedMatmulV4`: 64 tokens routed at random
//! (top-1) among 8 experts, each expert's weight int4-packed into INT32 containers; the tokens
//! are sorted by expert, multiplied in one grouped matmul, put back in token order and checked
//! against a CPU golden computed token by token.
//!
//! `cargo run --example moe` (simulated device) or `ACLNN_BACKEND=cann cargo run --example moe`.

use std::error::Error;

use aclnn::Runtime;
use aclnn::ops::grouped_matmul::HostMoeW4A16;
use aclnn::ops::wqbmm::HostW4A16;

const EXPERTS: usize = 8;
const TOKENS: usize = 64;
const K: usize = 128;
const N: usize = 64;
const GROUP: usize = 32;

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = Runtime::from_env()?;
    println!("backend: {}", runtime.backend_name());
    let stream = runtime.device(0)?.new_stream()?;

    // Router: each token picks one expert.
    let mut rng = fastrand::Rng::with_seed(2026);
    let route: Vec<usize> = (0..TOKENS).map(|_| rng.usize(..EXPERTS)).collect();
    let tokens: Vec<f32> = (0..TOKENS * K).map(|_| half::f16::from_f32(rng.f32() * 2.0 - 1.0).to_f32()).collect();

    // Sort tokens by expert (stable), as an MoE layer does before the grouped matmul.
    let mut order: Vec<usize> = (0..TOKENS).collect();
    order.sort_by_key(|t| route[*t]);
    let counts: Vec<usize> = (0..EXPERTS).map(|e| route.iter().filter(|r| **r == e).count()).collect();
    let mut problem = HostMoeW4A16::seeded(&counts, K, N, GROUP, 7);
    problem.x = order.iter().flat_map(|t| tokens[t * K..(t + 1) * K].iter().copied()).collect();

    let sorted_y = problem.run_on(&stream)?;

    // Back to token order, and the golden token by token with its expert's weights.
    let mut y = vec![0f32; TOKENS * N];
    for (row, t) in order.iter().enumerate() {
        y[t * N..(t + 1) * N].copy_from_slice(&sorted_y[row * N..(row + 1) * N]);
    }
    let mut worst = 0f32;
    for t in 0..TOKENS {
        let expert = problem.expert(route[t])?;
        let single = HostW4A16 { m: 1, x: tokens[t * K..(t + 1) * K].to_vec(), ..expert };
        worst = worst.max(HostW4A16::max_error(&y[t * N..(t + 1) * N], &single.golden()?));
    }
    println!("{TOKENS} tokens over {EXPERTS} experts (rows per expert {counts:?}), W4A16 {K}x{N}, group {GROUP}");
    println!("largest relative error against the CPU golden: {worst:.2e}");
    if worst > 1e-2 {
        return Err(format!("the grouped matmul differs from the golden by {worst}").into());
    }
    println!("every token matches its expert's golden");
    Ok(())
}
