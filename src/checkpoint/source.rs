//! The tensors of a checkpoint directory: every `*.safetensors` file memory-mapped, headers
//! parsed once, tensors found by name. Nothing is read until a tensor's bytes are asked for,
//! and pages are given back after each tensor, so memory stays bounded by the tensor in hand.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensors};

use super::CheckpointError;

/// One `.safetensors` file.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Where the data section starts.
    data_start: usize,
}

/// A tensor of the checkpoint: where it is and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    /// Its name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

/// All tensors of a directory's `.safetensors` files.
pub struct Source {
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorRef>,
}

impl Source {
    /// Maps every `*.safetensors` file of `dir` (sorted by name) and reads their headers.
    pub fn open(dir: &Path) -> Result<Source, CheckpointError> {
        let entries = std::fs::read_dir(dir).map_err(|e| CheckpointError::io(dir, e))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(CheckpointError::Missing {
                what: format!("*.safetensors files in {}", dir.display()),
                expected: "the checkpoint's weight files (one or more shards)".into(),
            });
        }
        Source::open_files(&files)
    }

    /// Maps the given `.safetensors` files (e.g. one converted file) and reads their headers.
    pub fn open_files(files: &[PathBuf]) -> Result<Source, CheckpointError> {
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for path in files.iter().cloned() {
            let file = File::open(&path).map_err(|e| CheckpointError::io(&path, e))?;
            // SAFETY: the file is mapped read-only; the converter only reads it and the contract
            // of a checkpoint directory is that nobody rewrites its files while it is converted
            // (an output never replaces an input: the CLI refuses that).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(&path, e))?;
            let (n, metadata) = SafeTensors::read_metadata(&map).map_err(|e| CheckpointError::Format {
                path: path.clone(),
                problem: format!("not a valid safetensors file ({e:?})"),
            })?;
            let data_start = 8 + n;
            let data_len = map.len().saturating_sub(data_start);
            let index = shards.len();
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                if end > data_len {
                    return Err(CheckpointError::Format {
                        path: path.clone(),
                        problem: format!(
                            "truncated: tensor `{name}` ends at byte {end} of a {data_len}-byte data section"
                        ),
                    });
                }
                let t = TensorRef {
                    name: name.clone(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    shard: index,
                    start: data_start + start,
                    end: data_start + end,
                };
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(CheckpointError::Format {
                        path: path.clone(),
                        problem: format!("tensor `{name}` appears in two shards"),
                    });
                }
            }
            shards.push(Shard { path, map, data_start });
        }
        Ok(Source { shards, tensors })
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorRef> {
        self.tensors.values()
    }

    /// The tensor `name`, if present.
    pub fn get(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.get(name)
    }

    /// The tensor `name`, which must exist with `dtype` and `shape` (`None` in `shape` = any).
    pub fn require(
        &self,
        name: &str,
        dtypes: &[Dtype],
        shape: &[Option<usize>],
    ) -> Result<&TensorRef, CheckpointError> {
        let t = self.get(name).ok_or_else(|| CheckpointError::Missing {
            what: format!("tensor `{name}`"),
            expected: format!("{dtypes:?} of shape {}", describe_shape(shape)),
        })?;
        if !dtypes.contains(&t.dtype) {
            return Err(CheckpointError::Tensor {
                name: name.to_string(),
                problem: format!("dtype {:?}", t.dtype),
                expected: format!("one of {dtypes:?}"),
            });
        }
        let fits = t.shape.len() == shape.len() && t.shape.iter().zip(shape).all(|(d, e)| e.is_none_or(|e| e == *d));
        if !fits {
            return Err(CheckpointError::Tensor {
                name: name.to_string(),
                problem: format!("shape {:?}", t.shape),
                expected: describe_shape(shape),
            });
        }
        Ok(t)
    }

    /// The bytes of `t`.
    pub fn bytes(&self, t: &TensorRef) -> &[u8] {
        &self.shards[t.shard].map[t.start..t.end]
    }

    /// Gives the pages of `t` back to the kernel once they are no longer needed.
    pub fn release(&self, t: &TensorRef) {
        self.release_range(t, 0, t.end - t.start);
    }

    /// Gives back the pages that lie wholly inside bytes `[from, to)` of `t` (a converter that
    /// is done with that part, while it still works on the rest).
    pub fn release_range(&self, t: &TensorRef, from: usize, to: usize) {
        let shard = &self.shards[t.shard];
        let page = 4096;
        let start = (t.start + from).div_ceil(page) * page;
        let end = (t.start + to.min(t.end - t.start)) / page * page;
        if end > start {
            // SAFETY: a read-only, file-backed private mapping: dropped pages are read again
            // from the file if touched later (the data never changes), so this cannot change
            // what any slice of the mapping reads; it only frees memory.
            let _ = unsafe { shard.map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    /// The files read.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Total bytes of tensor data in the checkpoint.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().map(|s| (s.map.len() - s.data_start) as u64).sum()
    }
}

fn describe_shape(shape: &[Option<usize>]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.map_or("_".to_string(), |d| d.to_string())).collect();
    format!("[{}]", dims.join(", "))
}

/// Little-endian `i32` words of a tensor.
pub fn words(bytes: &[u8]) -> impl ExactSizeIterator<Item = u32> + '_ {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// The value of element `i` of a float tensor (F16, BF16, F32) as f32.
pub fn float_at(dtype: Dtype, bytes: &[u8], i: usize) -> f32 {
    match dtype {
        Dtype::F16 => half::f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
        Dtype::BF16 => half::bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
        _ => f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]),
    }
}

/// The value of element `i` of an integer tensor (I8, I32, I64) as i64.
pub fn int_at(dtype: Dtype, bytes: &[u8], i: usize) -> i64 {
    match dtype {
        Dtype::I8 => i64::from(bytes[i] as i8),
        Dtype::I64 => i64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().expect("8 bytes")),
        _ => i64::from(i32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]])),
    }
}

/// Float dtypes a scale may have.
pub const FLOATS: &[Dtype] = &[Dtype::F16, Dtype::BF16, Dtype::F32];
