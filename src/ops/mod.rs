//! aclnn operators.

pub mod int4pack;
pub mod wqbmm;
