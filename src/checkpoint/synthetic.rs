//! Synthetic GPTQ checkpoints of any size, streamed to disk, for tests and benchmarks of the
//! converter (no model download needed). The values are random but valid: codes in [0, 15],
//! asymmetric zero points (GPTQ v2), fp16 scales, `g_idx = k / G`.

use std::io::Write;
use std::path::Path;

use safetensors::tensor::Dtype;

use super::output::{Entry, write_header};
use super::{CheckpointError, Result};

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticGptq {
    /// Number of decoder layers; each holds one `k x n` projection.
    pub layers: usize,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Group size (a multiple of 32 dividing `k`).
    pub group_size: usize,
    /// Seed of the values.
    pub seed: u64,
}

/// A small, fast generator (xorshift64*): reproducible bytes, statistically irrelevant.
struct Bytes(u64);

impl Bytes {
    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

impl SyntheticGptq {
    /// The prefix of layer `i`.
    pub fn prefix(i: usize) -> String {
        format!("model.layers.{i}.mlp.down_proj")
    }

    /// Writes `config.json` and `model.safetensors` into `dir`; returns the bytes of tensor data.
    pub fn write(&self, dir: &Path) -> Result<u64> {
        let (k, n, g) = (self.k, self.n, self.group_size);
        if g == 0 || g % 32 != 0 || k % g != 0 || n % 8 != 0 {
            return Err(CheckpointError::Unsupported {
                what: format!("synthetic GPTQ k={k} n={n} group={g}"),
                expected: "a group size that is a multiple of 32 dividing k, and n a multiple of 8".into(),
            });
        }
        let groups = k / g;
        let config = serde_json::json!({"quantization_config": {
            "quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": false, "sym": false,
            "checkpoint_format": "gptq_v2"}});
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, config.to_string()).map_err(|e| CheckpointError::io(&config_path, e))?;
        let mut entries = Vec::new();
        for i in 0..self.layers {
            let p = Self::prefix(i);
            entries.push(Entry {
                name: format!("{p}.qweight"),
                dtype: Dtype::I32,
                shape: vec![k / 8, n],
                len: k * n / 2,
            });
            entries.push(Entry {
                name: format!("{p}.qzeros"),
                dtype: Dtype::I32,
                shape: vec![groups, n / 8],
                len: groups * n / 2,
            });
            entries.push(Entry {
                name: format!("{p}.scales"),
                dtype: Dtype::F16,
                shape: vec![groups, n],
                len: groups * n * 2,
            });
            entries.push(Entry { name: format!("{p}.g_idx"), dtype: Dtype::I32, shape: vec![k], len: k * 4 });
        }
        let path = dir.join("model.safetensors");
        let io = |e| CheckpointError::io(&path, e);
        let file = std::fs::File::create(&path).map_err(io)?;
        let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
        write_header(&mut out, &entries, &Default::default()).map_err(io)?;
        let mut rng = Bytes(self.seed | 1);
        let mut data = 0u64;
        for _ in 0..self.layers {
            let mut qweight = vec![0u8; k * n / 2];
            rng.fill(&mut qweight);
            let mut qzeros = vec![0u8; groups * n / 2];
            rng.fill(&mut qzeros);
            // Scales in [2^-10, 2^-4): positive normal fp16 with random mantissas.
            let mut raw = vec![0u8; groups * n * 2];
            rng.fill(&mut raw);
            let scales: Vec<u8> = raw
                .chunks(2)
                .flat_map(|c| (0x1400u16 | (u16::from_le_bytes([c[0], c[1]]) & 0x0FFF)).to_le_bytes())
                .collect();
            let g_idx: Vec<u8> = (0..k).flat_map(|r| ((r / g) as i32).to_le_bytes()).collect();
            for part in [&qweight, &qzeros, &scales, &g_idx] {
                out.write_all(part).map_err(io)?;
                data += part.len() as u64;
            }
        }
        out.flush().map_err(io)?;
        Ok(data)
    }
}
