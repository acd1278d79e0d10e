//! Quantized checkpoints of every format, generated here from the formats' public
//! descriptions, converted to CANN's W4A16 operands: the dequantized output equals the source's
//! dequantized weight exactly in f32 (asymmetric zero points, group sizes 32/64/128, act-order,
//! a bias, an MoE block), the W4A16 matmul on the simulator matches an f32 golden of the source,
//! other tensors pass through unchanged, and bad input is a typed error.

#![cfg(feature = "checkpoint")]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use aclnn::checkpoint::{ActDtype, Checkpoint, CheckpointError, FormatKind, Layout};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

// ---------------------------------------------------------------------------------------------
// Ground truth and the writers of each format
// ---------------------------------------------------------------------------------------------

/// One quantized linear as the quantizer saw it: unsigned codes `q` in [0, 15] (K, N), zero
/// points `z` in [0, 15] (groups, N), fp16 scales (groups, N); group of input row `i` is
/// `group[i]`. Source dequantization: `(q - z) * s`.
#[derive(Clone)]
struct Truth {
    k: usize,
    n: usize,
    g: usize, // 0: per channel
    q: Vec<u8>,
    z: Vec<u8>,
    s: Vec<half::f16>,
    group: Vec<usize>,
    bias: Option<Vec<half::f16>>,
}

impl Truth {
    fn new(k: usize, n: usize, g: usize, sym: bool, act_order: bool, seed: u64) -> Truth {
        let mut rng = fastrand::Rng::with_seed(seed);
        let groups = k.checked_div(g).unwrap_or(1);
        let q = (0..k * n).map(|_| rng.u8(0..16)).collect();
        let z = (0..groups * n).map(|_| if sym { 8 } else { rng.u8(0..16) }).collect();
        let s = (0..groups * n).map(|_| half::f16::from_f32(0.001 + rng.f32() * 0.05)).collect();
        let group = if act_order {
            let mut order: Vec<usize> = (0..k).collect();
            rng.shuffle(&mut order);
            let mut group = vec![0; k];
            for (rank, row) in order.iter().enumerate() {
                group[*row] = rank / g.max(1);
            }
            group
        } else {
            (0..k).map(|i| i.checked_div(g).unwrap_or(0)).collect()
        };
        Truth { k, n, g, q, z, s, group, bias: None }
    }

    fn groups(&self) -> usize {
        self.k.checked_div(self.g).unwrap_or(1)
    }

    /// The source's dequantized weight, (K, N) in f32.
    fn dequantized(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.k * self.n];
        for i in 0..self.k {
            for j in 0..self.n {
                let gi = self.group[i] * self.n + j;
                w[i * self.n + j] = (self.q[i * self.n + j] as f32 - self.z[gi] as f32) * self.s[gi].to_f32();
            }
        }
        w
    }
}

/// Tensors of a file being generated.
#[derive(Default)]
struct Tensors(BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>);

impl Tensors {
    fn put(&mut self, name: impl Into<String>, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) {
        self.0.insert(name.into(), (dtype, shape.to_vec(), bytes));
    }

    fn i32s(&mut self, name: impl Into<String>, shape: &[usize], v: &[u32]) {
        self.put(name, Dtype::I32, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect());
    }

    fn f16s(&mut self, name: impl Into<String>, shape: &[usize], v: &[half::f16]) {
        self.put(name, Dtype::F16, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect());
    }

    fn write(&self, path: &Path) {
        let views: Vec<(String, TensorView<'_>)> =
            self.0.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }
}

/// A tensor that is not part of any quantized linear.
fn plain_tensors(t: &mut Tensors) {
    let emb: Vec<half::f16> = (0..64).map(|i| half::f16::from_f32(i as f32 / 8.0)).collect();
    t.f16s("model.embed_tokens.weight", &[8, 8], &emb);
    t.f16s("model.norm.weight", &[8], &emb[..8]);
}

fn pack8(nibbles: impl Iterator<Item = u8>) -> u32 {
    nibbles.enumerate().fold(0u32, |w, (i, v)| w | (u32::from(v & 0xF) << (4 * i)))
}

fn gptq(t: &mut Tensors, p: &str, x: &Truth, v2: bool) {
    let (k, n, groups) = (x.k, x.n, x.groups());
    let qweight: Vec<u32> = (0..k / 8)
        .flat_map(|r| (0..n).map(move |c| (r, c)))
        .map(|(r, c)| pack8((0..8).map(|j| x.q[(8 * r + j) * n + c])))
        .collect();
    t.i32s(format!("{p}.qweight"), &[k / 8, n], &qweight);
    let qzeros: Vec<u32> = (0..groups)
        .flat_map(|g| (0..n / 8).map(move |c| (g, c)))
        .map(|(g, c)| {
            let w = pack8((0..8).map(|j| x.z[g * n + 8 * c + j]));
            if v2 { w } else { w.wrapping_sub(0x1111_1111) } // v1 stores z - 1, word-wise (GPTQModel)
        })
        .collect();
    t.i32s(format!("{p}.qzeros"), &[groups, n / 8], &qzeros);
    t.f16s(format!("{p}.scales"), &[groups, n], &x.s);
    let g_idx: Vec<u32> = x.group.iter().map(|g| *g as u32).collect();
    t.i32s(format!("{p}.g_idx"), &[k], &g_idx);
    if let Some(b) = &x.bias {
        t.f16s(format!("{p}.bias"), &[n], b);
    }
}

const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

fn awq(t: &mut Tensors, p: &str, x: &Truth) {
    let (k, n, groups) = (x.k, x.n, x.groups());
    let interleave = |row: &dyn Fn(usize) -> u8, c: usize| pack8(AWQ_ORDER.iter().map(|o| row(8 * c + o)));
    let qweight: Vec<u32> = (0..k)
        .flat_map(|r| (0..n / 8).map(move |c| (r, c)))
        .map(|(r, c)| interleave(&|col| x.q[r * n + col], c))
        .collect();
    t.i32s(format!("{p}.qweight"), &[k, n / 8], &qweight);
    let qzeros: Vec<u32> = (0..groups)
        .flat_map(|g| (0..n / 8).map(move |c| (g, c)))
        .map(|(g, c)| interleave(&|col| x.z[g * n + col], c))
        .collect();
    t.i32s(format!("{p}.qzeros"), &[groups, n / 8], &qzeros);
    t.f16s(format!("{p}.scales"), &[groups, n], &x.s);
    if let Some(b) = &x.bias {
        t.f16s(format!("{p}.bias"), &[n], b);
    }
}

fn compressed(t: &mut Tensors, p: &str, x: &Truth, symmetric: bool) {
    let (k, n, groups) = (x.k, x.n, x.groups());
    // Signed q - 8 stored + 8 (= q), packed along K, output-major.
    let packed: Vec<u32> = (0..n)
        .flat_map(|r| (0..k / 8).map(move |c| (r, c)))
        .map(|(r, c)| pack8((0..8).map(|j| x.q[(8 * c + j) * n + r])))
        .collect();
    t.i32s(format!("{p}.weight_packed"), &[n, k / 8], &packed);
    let scale: Vec<half::f16> = (0..n).flat_map(|r| (0..groups).map(move |g| x.s[g * n + r])).collect();
    t.f16s(format!("{p}.weight_scale"), &[n, groups], &scale);
    t.put(
        format!("{p}.weight_shape"),
        Dtype::I64,
        &[2],
        [n as i64, k as i64].iter().flat_map(|v| v.to_le_bytes()).collect(),
    );
    if !symmetric {
        // Signed zp = z - 8 stored + 8 (= z), packed along N.
        let zp: Vec<u32> = (0..n / 8)
            .flat_map(|c| (0..groups).map(move |g| (c, g)))
            .map(|(c, g)| pack8((0..8).map(|j| x.z[g * n + 8 * c + j])))
            .collect();
        t.i32s(format!("{p}.weight_zero_point"), &[n / 8, groups], &zp);
    }
    if let Some(b) = &x.bias {
        t.f16s(format!("{p}.bias"), &[n], b);
    }
}

/// ModelSlim: signed q - 8, float32 scale and offset (z - 8), `(q_s - offset) * scale`.
/// Styles: ascendV1 per group (`[N/2, K]` paired along N, scale `[N, K/G]`), ascendV1 paired
/// along K (`[N, K/2]`, scale `[N, 1]` per channel or flat `[N*K/G, 1]` per group), and the
/// older one value per int8 (`[N, K]`).
fn modelslim(t: &mut Tensors, p: &str, x: &Truth, style: &str) {
    let (k, n, groups) = (x.k, x.n, x.groups());
    let signed = |r: usize, c: usize| (x.q[r * n + c] as i8 - 8) as u8 & 0xF;
    let (weight, shape): (Vec<u8>, [usize; 2]) = match style {
        "paired_rows" => (
            (0..n / 2).flat_map(|j| (0..k).map(move |r| signed(r, 2 * j) | (signed(r, 2 * j + 1) << 4))).collect(),
            [n / 2, k],
        ),
        "paired_cols" | "paired_cols_flat" => (
            (0..n).flat_map(|c| (0..k / 2).map(move |h| signed(2 * h, c) | (signed(2 * h + 1, c) << 4))).collect(),
            [n, k / 2],
        ),
        _ => ((0..n).flat_map(|c| (0..k).map(move |r| (x.q[r * n + c] as i8 - 8) as u8)).collect(), [n, k]),
    };
    t.put(format!("{p}.weight"), Dtype::I8, &shape, weight);
    let f32s = |v: Vec<f32>| v.into_iter().flat_map(f32::to_le_bytes).collect::<Vec<u8>>();
    let by_row = |f: &dyn Fn(usize) -> f32| {
        (0..n).flat_map(|r| (0..groups).map(move |g| (r, g))).map(|(r, g)| f(g * n + r)).collect::<Vec<_>>()
    };
    let scale_shape = if style == "paired_cols_flat" { [n * groups, 1] } else { [n, groups] };
    t.put(format!("{p}.weight_scale"), Dtype::F32, &scale_shape, f32s(by_row(&|i| x.s[i].to_f32())));
    t.put(format!("{p}.weight_offset"), Dtype::F32, &scale_shape, f32s(by_row(&|i| x.z[i] as f32 - 8.0)));
}

fn json(dir: &Path, name: &str, value: serde_json::Value) {
    std::fs::write(dir.join(name), value.to_string()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Reading the output back
// ---------------------------------------------------------------------------------------------

fn convert(dir: &Path, kind: FormatKind, layout: Layout, stack: bool) -> Vec<u8> {
    let ck = Checkpoint::open(dir, kind).unwrap();
    let mut out = Vec::new();
    ck.write(&mut out, layout, ActDtype::F16, stack, &mut |_| {}).unwrap();
    out
}

fn f16_values(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    assert_eq!(t.dtype(), Dtype::F16, "{name}");
    t.data().chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

/// The dequantized output `(w + offset) * scale` in f32, rows in the output's (permuted) order,
/// for an ND `P.weight`.
fn output_dequantized(st: &SafeTensors<'_>, p: &str, x: &Truth) -> Vec<f32> {
    let (k, n) = (x.k, x.n);
    let w = st.tensor(&format!("{p}.weight")).unwrap();
    assert_eq!((w.dtype(), w.shape()), (Dtype::I32, &[k, n / 8][..]), "{p}.weight");
    let scale = f16_values(st, &format!("{p}.antiquant_scale"));
    let offset =
        st.tensor(&format!("{p}.antiquant_offset")).ok().map(|_| f16_values(st, &format!("{p}.antiquant_offset")));
    let bytes = w.data();
    let mut out = vec![0f32; k * n];
    for r in 0..k {
        let g = r.checked_div(x.g).unwrap_or(0);
        for c in 0..n {
            let b = bytes[r * n / 2 + c / 2];
            let nib = if c % 2 == 0 { b & 0xF } else { b >> 4 };
            let v = ((nib << 4) as i8 >> 4) as f32;
            let o = offset.as_ref().map_or(0.0, |o| o[g * n + c]);
            out[r * n + c] = (v + o) * scale[g * n + c];
        }
    }
    out
}

fn act_perm(st: &SafeTensors<'_>, p: &str) -> Option<Vec<usize>> {
    let t = st.tensor(&format!("{p}.act_perm")).ok()?;
    Some(t.data().chunks(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize).collect())
}

/// The output equals the source's dequantized weight, exactly, row for row.
fn assert_exact(st: &SafeTensors<'_>, p: &str, x: &Truth) {
    let got = output_dequantized(st, p, x);
    let want = x.dequantized();
    let perm = act_perm(st, p).unwrap_or_else(|| (0..x.k).collect());
    for (r, src_row) in perm.iter().enumerate() {
        for c in 0..x.n {
            assert_eq!(got[r * x.n + c], want[src_row * x.n + c], "{p}: output row {r} (input {src_row}), column {c}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The formats
// ---------------------------------------------------------------------------------------------

#[test]
fn gptq_v1_and_v2_asymmetric_and_act_order_dequantize_exactly() {
    for (v2, desc_act, g) in [(false, false, 128), (true, false, 64), (false, true, 32), (true, true, 64)] {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Truth::new(256, 48, g, false, desc_act, 1);
        x.bias = Some((0..48).map(|i| half::f16::from_f32(i as f32 * 0.5)).collect());
        let mut t = Tensors::default();
        gptq(&mut t, "model.layers.0.self_attn.q_proj", &x, v2);
        plain_tensors(&mut t);
        t.write(&dir.path().join("model.safetensors"));
        let format = if v2 { "gptq_v2" } else { "gptq" };
        json(
            dir.path(),
            "config.json",
            serde_json::json!({"quantization_config": {
            "quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": desc_act, "sym": false,
            "checkpoint_format": format}}),
        );
        let out = convert(dir.path(), FormatKind::Auto, Layout::Nd, false);
        let st = SafeTensors::deserialize(&out).unwrap();
        assert_exact(&st, "model.layers.0.self_attn.q_proj", &x);
        assert_eq!(act_perm(&st, "model.layers.0.self_attn.q_proj").is_some(), desc_act);
        // The bias and the other tensors are copied unchanged.
        let src = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let src = SafeTensors::deserialize(&src).unwrap();
        for name in ["model.layers.0.self_attn.q_proj.bias", "model.embed_tokens.weight", "model.norm.weight"] {
            assert_eq!(st.tensor(name).unwrap().data(), src.tensor(name).unwrap().data(), "{name}");
        }
        assert!(st.tensor("model.layers.0.self_attn.q_proj.qweight").is_err(), "sources are not copied");
    }
}

#[test]
fn gptq_symmetric_has_no_offset_and_offset_sign_is_eight_minus_z() {
    let dir = tempfile::tempdir().unwrap();
    let x = Truth::new(64, 16, 32, true, false, 2);
    let mut t = Tensors::default();
    gptq(&mut t, "l", &x, false);
    t.write(&dir.path().join("gptq_model-4bit-32g.safetensors"));
    json(
        dir.path(),
        "quantize_config.json",
        serde_json::json!({"bits": 4, "group_size": 32, "desc_act": false, "sym": true}),
    );
    let out = convert(dir.path(), FormatKind::Gptq, Layout::Nd, false);
    let st = SafeTensors::deserialize(&out).unwrap();
    assert!(st.tensor("l.antiquant_offset").is_err(), "symmetric: no offset");
    assert_exact(&st, "l", &x);
    // Asymmetric: offset[g, n] = 8 - z (never z - 8).
    let dir = tempfile::tempdir().unwrap();
    let x = Truth::new(64, 16, 32, false, false, 3);
    let mut t = Tensors::default();
    gptq(&mut t, "l", &x, true);
    t.write(&dir.path().join("model.safetensors"));
    json(
        dir.path(),
        "quantize_config.json",
        serde_json::json!({"bits": 4, "group_size": 32, "sym": false, "checkpoint_format": "gptq_v2"}),
    );
    let st_bytes = convert(dir.path(), FormatKind::Auto, Layout::Nd, false);
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let offset = f16_values(&st, "l.antiquant_offset");
    assert!(offset.iter().zip(&x.z).all(|(o, z)| *o == 8.0 - *z as f32));
}

#[test]
fn awq_gemm_dequantizes_exactly() {
    for g in [32, 64, 128] {
        let dir = tempfile::tempdir().unwrap();
        let x = Truth::new(256, 32, g, false, false, 4 + g as u64);
        let mut t = Tensors::default();
        awq(&mut t, "model.layers.1.mlp.up_proj", &x);
        plain_tensors(&mut t);
        t.write(&dir.path().join("model.safetensors"));
        json(
            dir.path(),
            "config.json",
            serde_json::json!({"quantization_config": {
            "quant_method": "awq", "bits": 4, "group_size": g, "version": "gemm", "zero_point": true}}),
        );
        let out = convert(dir.path(), FormatKind::Awq, Layout::Nd, false);
        assert_exact(&SafeTensors::deserialize(&out).unwrap(), "model.layers.1.mlp.up_proj", &x);
    }
}

#[test]
fn compressed_tensors_group_and_channel_symmetric_and_not_dequantize_exactly() {
    for (g, symmetric) in [(64, false), (128, true), (0, false), (0, true)] {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Truth::new(128, 24, g, symmetric, false, 9);
        x.bias = Some(vec![half::f16::from_f32(1.5); 24]);
        let mut t = Tensors::default();
        compressed(&mut t, "model.layers.0.mlp.down_proj", &x, symmetric);
        plain_tensors(&mut t);
        t.write(&dir.path().join("model-00001-of-00001.safetensors"));
        let strategy = if g == 0 { "channel" } else { "group" };
        json(
            dir.path(),
            "config.json",
            serde_json::json!({"quantization_config": {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": strategy,
                "group_size": if g == 0 { serde_json::Value::Null } else { g.into() }}}},
            "ignore": ["lm_head"]}}),
        );
        let out = convert(dir.path(), FormatKind::CompressedTensors, Layout::Nd, false);
        let st = SafeTensors::deserialize(&out).unwrap();
        assert_exact(&st, "model.layers.0.mlp.down_proj", &x);
        assert_eq!(st.tensor("model.layers.0.mlp.down_proj.antiquant_offset").is_ok(), !symmetric);
    }
}

#[test]
fn modelslim_packed_and_plain_layouts_dequantize_exactly() {
    for (style, g) in [("paired_rows", 64), ("paired_cols", 0), ("paired_cols_flat", 32), ("plain", 32)] {
        let dir = tempfile::tempdir().unwrap();
        let x = Truth::new(128, 16, g, false, false, 11);
        let mut t = Tensors::default();
        modelslim(&mut t, "model.layers.0.self_attn.o_proj", &x, style);
        plain_tensors(&mut t);
        t.write(&dir.path().join("quant_model_weight_w4a16.safetensors"));
        json(dir.path(), "config.json", serde_json::json!({"model_type": "llama"}));
        let mut description = serde_json::json!({
            "model_quant_type": "W4A16",
            "model.layers.0.self_attn.o_proj.weight": "W4A16",
            "model.layers.0.self_attn.o_proj.weight_scale": "W4A16",
            "model.layers.0.self_attn.o_proj.weight_offset": "W4A16",
            "model.embed_tokens.weight": "FLOAT"});
        let file = if style == "plain" {
            "quant_model_description_w4a16.json" // the older saver: no version
        } else {
            description["version"] = "1.0.0".into();
            if g > 0 {
                description["group_size"] = g.into();
            }
            "quant_model_description.json"
        };
        json(dir.path(), file, description);
        let out = convert(dir.path(), FormatKind::Auto, Layout::Nd, false);
        assert_exact(&SafeTensors::deserialize(&out).unwrap(), "model.layers.0.self_attn.o_proj", &x);
    }
}

#[test]
fn compressed_tensors_before_0_9_4_store_the_zero_point_unpacked() {
    let dir = tempfile::tempdir().unwrap();
    let x = Truth::new(64, 16, 32, false, false, 13);
    let mut t = Tensors::default();
    compressed(&mut t, "l", &x, true);
    let zp: Vec<u8> =
        (0..16).flat_map(|c| (0..2).map(move |g| (c, g))).map(|(c, g)| (x.z[g * 16 + c] as i8 - 8) as u8).collect();
    t.put("l.weight_zero_point", Dtype::I8, &[16, 2], zp);
    t.write(&dir.path().join("model.safetensors"));
    json(
        dir.path(),
        "config.json",
        serde_json::json!({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int", "symmetric": false,
            "strategy": "group", "group_size": 32}}}}}),
    );
    let out = convert(dir.path(), FormatKind::Auto, Layout::Nd, false);
    assert_exact(&SafeTensors::deserialize(&out).unwrap(), "l", &x);
}

// ---------------------------------------------------------------------------------------------
// MoE, NZ and the W4A16 matmul on the simulator
// ---------------------------------------------------------------------------------------------

fn moe_dir(experts: usize) -> (tempfile::TempDir, Vec<Truth>) {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tensors::default();
    let truths: Vec<Truth> = (0..experts).map(|e| Truth::new(64, 32, 32, false, false, 100 + e as u64)).collect();
    for (e, x) in truths.iter().enumerate() {
        awq(&mut t, &format!("model.layers.0.mlp.experts.{e}.gate_proj"), x);
    }
    plain_tensors(&mut t);
    t.write(&dir.path().join("model.safetensors"));
    json(
        dir.path(),
        "config.json",
        serde_json::json!({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}}),
    );
    (dir, truths)
}

#[test]
fn moe_experts_convert_one_by_one_or_stacked() {
    let (dir, truths) = moe_dir(4);
    let each = convert(dir.path(), FormatKind::Auto, Layout::Nd, false);
    let each = SafeTensors::deserialize(&each).unwrap();
    for (e, x) in truths.iter().enumerate() {
        assert_exact(&each, &format!("model.layers.0.mlp.experts.{e}.gate_proj"), x);
    }
    let stacked = convert(dir.path(), FormatKind::Auto, Layout::Nd, true);
    let stacked = SafeTensors::deserialize(&stacked).unwrap();
    let w = stacked.tensor("model.layers.0.mlp.experts.gate_proj.weight").unwrap();
    assert_eq!(w.shape(), &[4, 64, 4]);
    let concat: Vec<u8> = (0..4)
        .flat_map(|e| each.tensor(&format!("model.layers.0.mlp.experts.{e}.gate_proj.weight")).unwrap().data().to_vec())
        .collect();
    assert_eq!(w.data(), &concat[..]);
    let scale = stacked.tensor("model.layers.0.mlp.experts.gate_proj.antiquant_scale").unwrap();
    assert_eq!(scale.shape(), &[4, 2, 32]);
}

#[test]
fn nz_output_is_what_int4pack_writes_and_the_matmul_matches_the_source() {
    use aclnn::ops::int4pack::{PackOptions, convert_weight_to_int4_pack};
    use aclnn::ops::wqbmm::WeightQuantMatmul;
    use aclnn::{DType, DeviceBuffer, Format, Tensor, TensorDesc, Workspace};
    let dir = tempfile::tempdir().unwrap();
    let x = Truth::new(128, 64, 64, false, false, 21);
    let mut t = Tensors::default();
    gptq(&mut t, "proj", &x, true);
    t.write(&dir.path().join("model.safetensors"));
    json(
        dir.path(),
        "quantize_config.json",
        serde_json::json!({"bits": 4, "group_size": 64, "sym": false, "checkpoint_format": "gptq_v2"}),
    );
    let nd = convert(dir.path(), FormatKind::Gptq, Layout::Nd, false);
    let nz = convert(dir.path(), FormatKind::Gptq, Layout::Nz, false);
    let (nd, nz) = (SafeTensors::deserialize(&nd).unwrap(), SafeTensors::deserialize(&nz).unwrap());
    let h = common::harness();
    {
        let rig = common::Rig::new(&h);
        // The int4 values of the ND output, packed by the (simulated) operator in NZ: the same bytes.
        let values: Vec<i32> = {
            let b = nd.tensor("proj.weight").unwrap().data().to_vec();
            (0..x.k * x.n)
                .map(|i| {
                    let nib = if i % 2 == 0 { b[i / 2] & 0xF } else { b[i / 2] >> 4 };
                    i32::from((nib << 4) as i8 >> 4)
                })
                .collect()
        };
        let wb = DeviceBuffer::from_host(&rig.stream, &values).unwrap();
        let options = PackOptions { format: Format::FractalNz, ..Default::default() };
        let packed =
            convert_weight_to_int4_pack(&Tensor::new(&wb, TensorDesc::nd(DType::Int32, &[128, 64])).unwrap(), options)
                .unwrap();
        let nz_weight = nz.tensor("proj.weight").unwrap();
        assert_eq!(nz_weight.shape().iter().map(|d| *d as i64).collect::<Vec<_>>(), packed.desc().storage);
        assert_eq!(packed.to_host_bytes().unwrap(), nz_weight.data());
        // W4A16 on the converted ND operands against an f32 golden of the source.
        let m = 2;
        let mut rng = fastrand::Rng::with_seed(5);
        let xs: Vec<half::f16> = (0..m * x.k).map(|_| half::f16::from_f32(rng.f32() * 2.0 - 1.0)).collect();
        let w_src = x.dequantized();
        let golden: Vec<f32> = (0..m * x.n)
            .map(|p| (0..x.k).map(|l| xs[(p / x.n) * x.k + l].to_f32() * w_src[l * x.n + p % x.n]).sum())
            .collect();
        let bits = |name: &str| {
            nd.tensor(name).unwrap().data().chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect::<Vec<u16>>()
        };
        let xb = DeviceBuffer::from_host(&rig.stream, &xs.iter().map(|v| v.to_bits()).collect::<Vec<u16>>()).unwrap();
        let wb = DeviceBuffer::from_host(&rig.stream, nd.tensor("proj.weight").unwrap().data()).unwrap();
        let sb = DeviceBuffer::from_host(&rig.stream, &bits("proj.antiquant_scale")).unwrap();
        let ob = DeviceBuffer::from_host(&rig.stream, &bits("proj.antiquant_offset")).unwrap();
        let mut yb = DeviceBuffer::<u16>::alloc(&rig.stream, m * x.n).unwrap();
        {
            let xt = Tensor::new(&xb, TensorDesc::nd(DType::Float16, &[m as i64, 128])).unwrap();
            let wt = Tensor::new(&wb, TensorDesc::nd(DType::Int32, &[128, 8])).unwrap();
            let st = Tensor::new(&sb, TensorDesc::nd(DType::Float16, &[2, 64])).unwrap();
            let ot = Tensor::new(&ob, TensorDesc::nd(DType::Float16, &[2, 64])).unwrap();
            let mut yt = Tensor::new_mut(&mut yb, TensorDesc::nd(DType::Float16, &[m as i64, 64])).unwrap();
            let op = WeightQuantMatmul {
                antiquant_offset: Some(&ot),
                antiquant_group_size: 64,
                ..WeightQuantMatmul::new(&xt, &wt, &st)
            };
            op.run(&mut yt, &rig.stream, &mut Workspace::new(&rig.stream)).unwrap();
        }
        let y: Vec<f32> = yb.to_vec().unwrap().into_iter().map(|b| half::f16::from_bits(b).to_f32()).collect();
        let err = aclnn::ops::wqbmm::HostW4A16::max_error(&y, &golden);
        assert!(err < 2e-2, "W4A16 on the converted weights vs the source's f32 golden: {err}");
    }
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

fn gptq_dir(k: usize, n: usize, g: usize, config: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let x = Truth::new(k, n.div_ceil(8) * 8, if g.is_multiple_of(32) { g } else { 32 }, false, false, 7);
    let mut t = Tensors::default();
    gptq(&mut t, "l", &x, true);
    if !n.is_multiple_of(8) {
        t.i32s("l.qweight", &[k / 8, n], &vec![0; k / 8 * n]);
    }
    t.write(&dir.path().join("model.safetensors"));
    json(dir.path(), "config.json", serde_json::json!({"quantization_config": config}));
    dir
}

fn open_err(dir: &Path, kind: FormatKind) -> CheckpointError {
    match Checkpoint::open(dir, kind) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    }
}

#[test]
fn bad_checkpoints_are_typed_errors_naming_what_is_wrong() {
    let cfg = |bits: i64, g: i64| serde_json::json!({"quant_method": "gptq", "bits": bits, "group_size": g, "sym": false, "checkpoint_format": "gptq_v2"});
    let e = open_err(gptq_dir(64, 16, 32, cfg(8, 32)).path(), FormatKind::Auto);
    assert!(matches!(e, CheckpointError::Unsupported { .. }) && e.to_string().contains("8-bit"), "{e}");
    let e = open_err(gptq_dir(64, 16, 32, cfg(4, 48)).path(), FormatKind::Auto);
    assert!(e.to_string().contains("group size 48") && e.to_string().contains("multiple of 32"), "{e}");
    let e = open_err(gptq_dir(64, 12, 32, cfg(4, 32)).path(), FormatKind::Auto);
    assert!(matches!(e, CheckpointError::Tensor { .. } | CheckpointError::Layer { .. }), "{e}");
    // --from disagrees with the config.
    let e = open_err(gptq_dir(64, 16, 32, cfg(4, 32)).path(), FormatKind::Awq);
    assert!(e.to_string().contains("Gptq"), "{e}");
    // A missing zero-point tensor.
    let dir = gptq_dir(64, 16, 32, cfg(4, 32));
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, TensorView<'_>)> = st.tensors().into_iter().filter(|(n, _)| n != "l.qzeros").collect();
    std::fs::write(dir.path().join("model.safetensors"), safetensors::serialize(kept, None).unwrap()).unwrap();
    let e = open_err(dir.path(), FormatKind::Auto);
    assert!(matches!(e, CheckpointError::Missing { .. }) && e.to_string().contains("l.qzeros"), "{e}");
    // A truncated file.
    let dir = gptq_dir(64, 16, 32, cfg(4, 32));
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = open_err(dir.path(), FormatKind::Auto);
    assert!(matches!(e, CheckpointError::Format { .. }), "{e}");
    // No config at all.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.safetensors"), &bytes[..8]).unwrap();
    let e = open_err(dir.path(), FormatKind::Auto);
    assert!(matches!(e, CheckpointError::Missing { .. }), "{e}");
    // An unknown quant method.
    let dir = gptq_dir(64, 16, 32, serde_json::json!({"quant_method": "bitsandbytes"}));
    let e = open_err(dir.path(), FormatKind::Auto);
    assert!(e.to_string().contains("bitsandbytes"), "{e}");
}

#[test]
fn a_checkpoint_loads_straight_onto_two_devices_ready_for_the_matmul() {
    use aclnn::ops::wqbmm::{HostW4A16, WeightQuantMatmul};
    use aclnn::{DType, DeviceBuffer, Tensor, TensorDesc, Workspace};
    let dir = tempfile::tempdir().unwrap();
    let truths: Vec<Truth> = (0..4).map(|i| Truth::new(128, 32, 64, false, false, 40 + i)).collect();
    let mut t = Tensors::default();
    for (i, x) in truths.iter().enumerate() {
        gptq(&mut t, &format!("model.layers.{i}.mlp.down_proj"), x, true);
    }
    t.write(&dir.path().join("model.safetensors"));
    json(
        dir.path(),
        "config.json",
        serde_json::json!({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 64, "sym": false, "checkpoint_format": "gptq_v2"}}),
    );
    let ck = Checkpoint::open(dir.path(), FormatKind::Auto).unwrap();
    let h = common::harness();
    {
        let devices = h.runtime.device_count().unwrap().min(2);
        let streams: Vec<_> = (0..devices).map(|d| h.runtime.device(d).unwrap().new_stream().unwrap()).collect();
        let mut seen = 0;
        let loaded = ck.load(&streams, Layout::Nd, ActDtype::F16, &mut |p| seen = p.done).unwrap();
        assert_eq!(loaded.len(), 4);
        assert!(seen > 0);
        for (i, (l, x)) in loaded.iter().zip(&truths).enumerate() {
            assert_eq!(l.plan.prefix, format!("model.layers.{i}.mlp.down_proj"));
            let stream = &l.stream;
            let m = 3;
            let xs: Vec<half::f16> =
                (0..m * x.k).map(|i| half::f16::from_f32(((i * 7) % 13) as f32 / 13.0 - 0.5)).collect();
            let w_src = x.dequantized();
            let golden: Vec<f32> = (0..m * x.n)
                .map(|p| (0..x.k).map(|r| xs[(p / x.n) * x.k + r].to_f32() * w_src[r * x.n + p % x.n]).sum())
                .collect();
            let xb = DeviceBuffer::from_host(stream, &xs.iter().map(|v| v.to_bits()).collect::<Vec<u16>>()).unwrap();
            let mut yb = DeviceBuffer::<u16>::alloc(stream, m * x.n).unwrap();
            {
                let xt = Tensor::new(&xb, TensorDesc::nd(DType::Float16, &[m as i64, x.k as i64])).unwrap();
                let (w, s, o) = (l.weight_tensor().unwrap(), l.scale_tensor().unwrap(), l.offset_tensor().unwrap());
                let mut yt = Tensor::new_mut(&mut yb, TensorDesc::nd(DType::Float16, &[m as i64, x.n as i64])).unwrap();
                let op = WeightQuantMatmul {
                    antiquant_offset: o.as_ref(),
                    antiquant_group_size: 64,
                    ..WeightQuantMatmul::new(&xt, &w, &s)
                };
                op.run(&mut yt, stream, &mut Workspace::new(stream)).unwrap();
            }
            let y: Vec<f32> = yb.to_vec().unwrap().into_iter().map(|b| half::f16::from_bits(b).to_f32()).collect();
            assert!(HostW4A16::max_error(&y, &golden) < 2e-2, "{}", l.plan.prefix);
        }
        if devices == 2 {
            assert!(!std::sync::Arc::ptr_eq(loaded[0].stream.device(), loaded[1].stream.device()), "round robin");
        }
    }
    h.assert_clean();
}
