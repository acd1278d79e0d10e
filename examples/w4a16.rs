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
use std::sync::Arc;

use aclnn::ops::int4pack::{PackOptions, convert_weight_to_int4_pack};
use aclnn::ops::wqbmm::{HostW4A16, WeightQuantMatmul};
use aclnn::{DType, DeviceBuffer, Runtime, Stream, Tensor, TensorDesc, Workspace};
use half::f16;

const RTOL: f32 = 1e-3;

/// One run of the scenario: `transposed` packs the weight as `(n, k)` and hands the matmul a
/// transposed view; `group_size` 0 means per-channel scale and offset.
fn scenario(stream: &Arc<Stream>, transposed: bool, group_size: usize) -> aclnn::Result<f32> {
    let (m, k, n) = (128usize, 64usize, 32usize);
    let mut rng = fastrand::Rng::with_seed(2024 + group_size as u64 + transposed as u64);
    let groups = if group_size > 0 { k.div_ceil(group_size) } else { 1 };
    let round = |v: f32| f16::from_f32(v).to_f32();
    let problem = HostW4A16 {
        m,
        k,
        n,
        x: (0..m * k).map(|_| round(rng.f32() * 2.0 - 1.0)).collect(),
        w: (0..k * n).map(|_| rng.i32(-8..=7)).collect(),
        scale: (0..groups * n).map(|_| round(0.01 + rng.f32() * 0.09)).collect(),
        offset: (0..groups * n).map(|_| round(rng.f32() * 2.0 - 1.0)).collect(),
        group_size,
        ..HostW4A16::default()
    };
    // Pack: (k, n) as is, or its transpose (n, k).
    let (source, shape) = if transposed {
        ((0..n * k).map(|p| problem.w[(p % k) * n + p / k]).collect::<Vec<i32>>(), [n as i64, k as i64])
    } else {
        (problem.w.clone(), [k as i64, n as i64])
    };
    let wbuf = DeviceBuffer::from_host(stream, &source)?;
    let packed = convert_weight_to_int4_pack(
        &Tensor::new(&wbuf, TensorDesc::nd(DType::Int32, &shape))?,
        PackOptions::default(),
    )?;
    let weight = if transposed { packed.transposed_tensor()? } else { packed.tensor()? };

    let to_f16 = |v: &[f32]| v.iter().map(|x| f16::from_f32(*x).to_bits()).collect::<Vec<u16>>();
    let scale_shape = [groups as i64, n as i64];
    let xb = DeviceBuffer::from_host(stream, &to_f16(&problem.x))?;
    let sb = DeviceBuffer::from_host(stream, &to_f16(&problem.scale))?;
    let ob = DeviceBuffer::from_host(stream, &to_f16(&problem.offset))?;
    let x = Tensor::new(&xb, TensorDesc::nd(DType::Float16, &[m as i64, k as i64]))?;
    let scale = Tensor::new(&sb, TensorDesc::nd(DType::Float16, &scale_shape))?;
    let offset = Tensor::new(&ob, TensorDesc::nd(DType::Float16, &scale_shape))?;
    let mut yb = DeviceBuffer::<u16>::alloc(stream, m * n)?;
    let mut workspace = Workspace::new(stream);
    {
        let mut y = Tensor::new_mut(&mut yb, TensorDesc::nd(DType::Float16, &[m as i64, n as i64]))?;
        let op = WeightQuantMatmul {
            antiquant_offset: Some(&offset),
            antiquant_group_size: group_size as i32,
            ..WeightQuantMatmul::new(&x, &weight, &scale)
        };
        op.run(&mut y, stream, &mut workspace)?;
    }
    let y: Vec<f32> = yb.to_vec()?.into_iter().map(|b| f16::from_bits(b).to_f32()).collect();
    let error = HostW4A16::max_error(&y, &problem.golden());
    println!(
        "  trans_weight={transposed:<5} {:<13} packed {:?} int32 -> y ({m}, {n}) fp16, workspace {} B, max error {error:.2e}",
        if group_size > 0 { format!("group {group_size}") } else { "per-channel".to_string() },
        packed.desc().view,
        workspace.capacity(),
    );
    Ok(error)
}

fn main() -> ExitCode {
    let run = || -> aclnn::Result<f32> {
        let runtime = Runtime::from_env()?;
        let stream = runtime.device(0)?.new_stream()?;
        println!("W4A16 on {} ({}), m=128 k=64 n=32:", runtime.backend_name(), runtime.soc_name()?);
        let mut worst = 0f32;
        for (transposed, group) in [(false, 0), (true, 0), (false, 32), (true, 32)] {
            worst = worst.max(scenario(&stream, transposed, group)?);
        }
        Ok(worst)
    };
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
