//! aclnn operators.

pub mod cast;
pub mod grouped_matmul;
pub mod int4pack;
pub mod wqbmm;
