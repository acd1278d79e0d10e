//! aclnn operators.

pub mod int4pack;
