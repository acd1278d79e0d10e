//! SoC families and the chip-dependent FRACTAL_NZ rules of the int4 packing operator.
//!
//! Pure functions shared by the simulated operator and the safe layer (which computes the
//! storage shape a device expects). Facts: `int4pack.md` sections 1.4 and 1.5.5.

/// The chip families whose rules differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChipFamily {
    /// Atlas A2 / A3 (Ascend 910B, 910_93; arch DAV_2201) and every other non-950 chip.
    A2A3,
    /// Ascend 950PR / 950DT (arch DAV_3510; "Ascend910_95" in older sources).
    Ascend950,
}

impl ChipFamily {
    /// The family of the SoC named by `aclrtGetSocName`.
    pub fn from_soc_name(soc_name: &str) -> ChipFamily {
        if soc_name.starts_with("Ascend950") || soc_name.starts_with("Ascend910_95") {
            ChipFamily::Ascend950
        } else {
            ChipFamily::A2A3
        }
    }

    /// Bytes per NZ row (C0) the operator's layout transform uses, given the last storage dim
    /// of the packed tensor: 32 on A2/A3; on 950, 16 if that dim is 32, else 8.
    pub fn nz_c0_bytes(self, storage_last_dim: i64) -> usize {
        match self {
            ChipFamily::A2A3 => 32,
            ChipFamily::Ascend950 if storage_last_dim == 32 => 16,
            ChipFamily::Ascend950 => 8,
        }
    }

    /// The NZ storage shape `(N1, K1, 16, C0 elements)` this crate declares for a packed view
    /// `(k, pn)` (`pn` = packed last dim: `n` for 4-bit element types, `n / 8` for 32-bit
    /// containers), as documented for each chip.
    pub fn nz_storage_shape(self, container: Container, k: i64, pn: i64) -> [i64; 4] {
        let k1 = ceil_div(k, 16);
        match (self, container) {
            (ChipFamily::A2A3, Container::FourBit) => [ceil_div(pn, 64), k1, 16, 64],
            (ChipFamily::A2A3, Container::ThirtyTwoBit) => [ceil_div(pn, 8), k1, 16, 8],
            (ChipFamily::Ascend950, Container::FourBit) => [ceil_div(pn, 16), k1, 16, 16],
            (ChipFamily::Ascend950, Container::ThirtyTwoBit) => [ceil_div(pn, 2), k1, 16, 2],
        }
    }
}

/// SoC names (as `aclrtGetSocName` reports them) this crate knows: Atlas A2 (910B), Atlas A3
/// (910_93) and Ascend 950. The library accepts any name (anything not 950 is treated as
/// A2/A3); the command-line tool's `--soc` takes only these.
pub const KNOWN_SOCS: &[&str] = &[
    "Ascend910B1",
    "Ascend910B2",
    "Ascend910B2C",
    "Ascend910B3",
    "Ascend910B4",
    "Ascend910B4-1",
    "Ascend910_9391",
    "Ascend910_9392",
    "Ascend910_9381",
    "Ascend910_9382",
    "Ascend910_9372",
    "Ascend910_9362",
    "Ascend950PR_9599",
];

/// How packed values are carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Container {
    /// One 4-bit element per tensor element (`ACL_INT4`, `ACL_FLOAT4_E2M1`).
    FourBit,
    /// Eight 4-bit values per 32-bit element (`ACL_INT32`, `ACL_FLOAT`).
    ThirtyTwoBit,
}

/// `ceil(a / b)` computed as the C++ library does, `(a + b - 1) / b` with truncating division,
/// and with its convention that division by 0 yields 0. Never panics (wrapping arithmetic).
pub fn ceil_div(a: i64, b: i64) -> i64 {
    if b == 0 { 0 } else { a.wrapping_add(b.wrapping_sub(1)).wrapping_div(b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_c0() {
        assert_eq!(ChipFamily::from_soc_name("Ascend910B3"), ChipFamily::A2A3);
        assert_eq!(ChipFamily::from_soc_name("Ascend910_9391"), ChipFamily::A2A3);
        assert_eq!(ChipFamily::from_soc_name("Ascend950PR_9599"), ChipFamily::Ascend950);
        assert_eq!(ChipFamily::from_soc_name("Ascend910_9591"), ChipFamily::Ascend950);
        assert_eq!(ChipFamily::A2A3.nz_c0_bytes(64), 32);
        assert_eq!(ChipFamily::Ascend950.nz_c0_bytes(32), 16);
        assert_eq!(ChipFamily::Ascend950.nz_c0_bytes(16), 8);
        assert_eq!(ChipFamily::Ascend950.nz_c0_bytes(64), 8);
    }

    #[test]
    fn documented_storage_shapes() {
        // The official example: weight (17, 72) int4 NZ on A2 -> (2, 2, 16, 64).
        assert_eq!(ChipFamily::A2A3.nz_storage_shape(Container::FourBit, 17, 72), [2, 2, 16, 64]);
        // INT32 containers: (k, n/8) = (64, 4) -> (ceil(4/8), 4, 16, 8).
        assert_eq!(ChipFamily::A2A3.nz_storage_shape(Container::ThirtyTwoBit, 64, 4), [1, 4, 16, 8]);
        assert_eq!(ChipFamily::Ascend950.nz_storage_shape(Container::FourBit, 64, 64), [4, 4, 16, 16]);
        assert_eq!(ChipFamily::Ascend950.nz_storage_shape(Container::ThirtyTwoBit, 64, 8), [4, 4, 16, 2]);
        assert_eq!(ceil_div(5, 0), 0);
    }
}
