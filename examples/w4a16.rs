//! W4A16 end to end, the seed scenario of `torch_npu.npu_weight_quant_batchmatmul`:
//! pack int4 weights with `aclnnConvertWeightToINT4Pack`, multiply with
//! `aclnnWeightQuantBatchMatmulV2`, and compare with the CPU golden
//! `f32(x) @ f32((f16(w) + offset) * scale)` (rtol 1e-3 after rounding to f16).
//!
//! ```text
//! cargo run --example w4a16                      # simulated device
//! ACLNN_BACKEND=cann cargo run --example w4a16   # a real Atlas A2/A3
//! ```

use std::process::ExitCode;

use aclnn::Runtime;
use aclnn::ops::int4pack::PackOptions;
use aclnn::ops::wqbmm::HostW4A16;

/// Tolerance of the comparison, relative (absolute below 1), after rounding to fp16.
const RTOL: f32 = 1e-3;

fn run() -> aclnn::Result<f32> {
    let runtime = Runtime::from_env()?;
    let stream = runtime.device(0)?.new_stream()?;
    let (m, k, n) = (128, 64, 32);
    println!(
        "W4A16 on {} ({}), m={m} k={k} n={n}, int32-packed ND weight:",
        runtime.backend_name(),
        runtime.soc_name()?
    );
    let mut worst = 0f32;
    for (transposed, group_size) in [(false, 0), (true, 0), (false, 32), (true, 32)] {
        let problem = HostW4A16::seeded(m, k, n, group_size, 2024 + group_size as u64);
        let (y, workspace) = problem.run_on(&stream, PackOptions::default(), transposed)?;
        let error = HostW4A16::max_error(&y, &problem.golden()?);
        let scales = if group_size > 0 { format!("group {group_size}") } else { "per-channel".into() };
        println!(
            "  trans_weight={transposed:<5} {scales:<11} scale+offset: workspace {workspace:>5} B, max error {error:.2e}"
        );
        worst = worst.max(error);
    }
    Ok(worst)
}

fn main() -> ExitCode {
    match run() {
        Ok(worst) if worst <= RTOL => {
            println!("all results match the golden (max error {worst:.2e} <= {RTOL:.0e})");
            ExitCode::SUCCESS
        }
        Ok(worst) => {
            eprintln!("error: max error {worst:.2e} exceeds {RTOL:.0e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
