//! A two-stream W4A16 pipeline: a copy stream uploads each layer's weights and activations
//! through pinned memory while a compute stream runs `aclnnWeightQuantBatchMatmulV2` on the
//! previous layer. The crate orders the two streams with events on the device, so enqueueing the
//! whole pipeline never blocks the host. For comparison, "serialized" runs the same work with the
//! host waiting for each upload and each matmul before it queues the next step (what ordering by
//! host synchronisation alone forces). Both are checked against the CPU golden.
//!
//! Prints, for both strategies: host synchronisations while enqueueing (simulator counter),
//! device-side waits, and the device time between the first upload and the last matmul
//! (`aclrtEventElapsedTime`; on the simulator, its modelled timeline: 25 GB/s host-device copies,
//! matmuls after a 5 us launch floor at 250 TFLOP/s or 1.6 TB/s).
//!
//! `cargo run --example pipeline` (simulated device) or `ACLNN_BACKEND=cann cargo run --example
//! pipeline` on an NPU host.

use std::error::Error;
use std::sync::Arc;

use aclnn::ops::wqbmm::{HostW4A16, WeightQuantMatmul};
use aclnn::{DType, DeviceBuffer, Event, PinnedHostBuffer, Runtime, Stream, Tensor, TensorDesc, Workspace};

const LAYERS: usize = 8;
const GROUP: usize = 128;

/// One layer's device operands and the pinned staging buffers they were uploaded from.
struct Layer {
    x: DeviceBuffer<u16>,
    w: DeviceBuffer<i8>,
    scale: DeviceBuffer<u16>,
    offset: DeviceBuffer<u16>,
    _staging: (PinnedHostBuffer<u16>, PinnedHostBuffer<i8>, PinnedHostBuffer<u16>, PinnedHostBuffer<u16>),
}

fn f16(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| half::f16::from_f32(*x).to_bits()).collect()
}

/// Queues the uploads of one layer on `copy` (asynchronous copies from pinned memory).
fn upload(p: &HostW4A16, copy: &Arc<Stream>) -> aclnn::Result<Layer> {
    let device = copy.device();
    fn stage<T: aclnn::DeviceRepr>(
        device: &Arc<aclnn::Device>,
        copy: &Arc<Stream>,
        host: &[T],
    ) -> aclnn::Result<(DeviceBuffer<T>, PinnedHostBuffer<T>)> {
        let pinned = PinnedHostBuffer::from_slice(device, host)?;
        let mut dev = DeviceBuffer::alloc(copy, host.len())?;
        dev.copy_from_pinned_async_on(&pinned, copy)?;
        Ok((dev, pinned))
    }
    let w8: Vec<i8> = p.w.iter().map(|v| *v as i8).collect();
    let (w, pw) = stage(device, copy, &w8)?;
    let (x, px) = stage(device, copy, &f16(&p.x))?;
    let (scale, ps) = stage(device, copy, &f16(&p.scale))?;
    let (offset, po) = stage(device, copy, &f16(&p.offset))?;
    Ok(Layer { x, w, scale, offset, _staging: (px, pw, ps, po) })
}

/// Queues one layer's matmul on `compute`.
fn matmul(
    p: &HostW4A16,
    l: &Layer,
    y: &mut DeviceBuffer<u16>,
    compute: &Arc<Stream>,
    ws: &mut Workspace,
) -> aclnn::Result<()> {
    let (m, k, n) = (p.m as i64, p.k as i64, p.n as i64);
    let groups = [k / GROUP as i64, n];
    let x = Tensor::new(&l.x, TensorDesc::nd(DType::Float16, &[m, k]))?;
    let w = Tensor::new(&l.w, TensorDesc::nd(DType::Int8, &[k, n]))?;
    let scale = Tensor::new(&l.scale, TensorDesc::nd(DType::Float16, &groups))?;
    let offset = Tensor::new(&l.offset, TensorDesc::nd(DType::Float16, &groups))?;
    let mut yt = Tensor::new_mut(y, TensorDesc::nd(DType::Float16, &[m, n]))?;
    let op = WeightQuantMatmul {
        antiquant_offset: Some(&offset),
        antiquant_group_size: GROUP as i32,
        ..WeightQuantMatmul::new(&x, &w, &scale)
    };
    op.run(&mut yt, compute, ws)
}

/// What one strategy cost.
struct Run {
    host_syncs_while_enqueueing: Option<u64>,
    stream_waits: Option<u64>,
    device_ms: f32,
}

fn sim_sync_counters(runtime: &Runtime) -> Option<(u64, u64)> {
    #[cfg(feature = "sim")]
    if runtime.backend_name() == "sim" {
        let s = aclnn::sim::stats().sync;
        return Some((s.host_syncs, s.stream_waits));
    }
    #[cfg(not(feature = "sim"))]
    let _ = runtime;
    None
}

fn run(runtime: &Runtime, problems: &[HostW4A16], serialized: bool) -> Result<Run, Box<dyn Error>> {
    let device = runtime.device(0)?;
    let (copy, compute) = (device.new_stream()?, device.new_stream()?);
    let mut ws = Workspace::new(&compute);
    let (start, end) = (Event::new(&device)?, Event::new(&device)?);
    let before = sim_sync_counters(runtime);
    start.record(&copy)?;
    let mut layers = Vec::new();
    let mut outputs = Vec::new();
    for p in problems {
        let layer = upload(p, &copy)?;
        if serialized {
            copy.synchronize()?; // the host waits for the upload before queuing the matmul
        }
        let mut y = DeviceBuffer::<u16>::alloc(&compute, p.m * p.n)?;
        matmul(p, &layer, &mut y, &compute, &mut ws)?;
        if serialized {
            compute.synchronize()?; // and for the matmul before the next upload
        }
        layers.push(layer);
        outputs.push(y);
    }
    end.record(&compute)?;
    let after = sim_sync_counters(runtime);
    end.synchronize()?;
    let device_ms = start.elapsed_ms(&end)?;
    for (p, y) in problems.iter().zip(&outputs) {
        let got: Vec<f32> = y.to_vec()?.into_iter().map(|b| half::f16::from_bits(b).to_f32()).collect();
        let err = HostW4A16::max_error(&got, &p.golden()?);
        if err > 1e-2 {
            return Err(format!("layer result differs from the CPU golden by {err}").into());
        }
    }
    let diff = before.zip(after).map(|((h0, w0), (h1, w1))| (h1 - h0, w1 - w0));
    Ok(Run { host_syncs_while_enqueueing: diff.map(|d| d.0), stream_waits: diff.map(|d| d.1), device_ms })
}

fn main() -> Result<(), Box<dyn Error>> {
    let runtime = Runtime::from_env()?;
    println!("backend: {}", runtime.backend_name());
    let problems: Vec<HostW4A16> = (0..LAYERS).map(|i| HostW4A16::seeded(64, 512, 512, GROUP, 40 + i as u64)).collect();
    let overlapped = run(&runtime, &problems, false)?;
    let serialized = run(&runtime, &problems, true)?;
    let show = |v: Option<u64>| v.map_or("n/a (hardware)".to_string(), |v| v.to_string());
    println!("{LAYERS} layers of W4A16 64x512x512 (group {GROUP}): upload on one stream, matmul on another");
    println!(
        "{:<12} {:>28} {:>14} {:>16}",
        "strategy", "host syncs while enqueueing", "device waits", "device time ms"
    );
    for (name, r) in [("events", &overlapped), ("serialized", &serialized)] {
        println!(
            "{:<12} {:>28} {:>14} {:>16.4}",
            name,
            show(r.host_syncs_while_enqueueing),
            show(r.stream_waits),
            r.device_ms
        );
    }
    println!("serialized / events device time: {:.2}x", serialized.device_ms / overlapped.device_ms.max(1e-9));
    if overlapped.host_syncs_while_enqueueing.is_some_and(|n| n != 0) {
        return Err("the event-ordered pipeline blocked the host".into());
    }
    println!("every layer matches the CPU golden");
    Ok(())
}
