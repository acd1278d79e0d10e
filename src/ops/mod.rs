//! aclnn operators.

pub mod cast;
pub mod int4pack;
pub mod wqbmm;
