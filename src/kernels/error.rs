//! Errors of the kernels: wrong lengths or geometry, values that are not representable.

use std::fmt;

/// A buffer length or geometry parameter does not match what a kernel requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutError {
    /// Which quantity was wrong (for example "output length in bytes").
    pub what: &'static str,
    /// The value the kernel required.
    pub expected: usize,
    /// The value that was supplied.
    pub actual: usize,
}

impl LayoutError {
    pub(super) const fn new(what: &'static str, expected: usize, actual: usize) -> Self {
        Self { what, expected, actual }
    }
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: expected {}, got {}", self.what, self.expected, self.actual)
    }
}

impl std::error::Error for LayoutError {}

/// Error of the checked packing kernels.
#[derive(Clone, Debug, PartialEq)]
pub enum PackError {
    /// An INT32 element is outside the INT4 range [-8, 7]; `index` is the first such element.
    OutOfRange {
        /// Element index (in source order) of the first offending value.
        index: usize,
        /// The offending value.
        value: i64,
    },
    /// A FLOAT element is NaN, infinite or has magnitude above 6.0; `index` is the first one.
    FloatOutOfRange {
        /// Element index (in source order) of the first offending value.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// A buffer length or geometry parameter is wrong.
    Layout(LayoutError),
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfRange { index, value } => {
                write!(f, "int4 value {value} at index {index} is outside the representable range [-8, 7]")
            }
            Self::FloatOutOfRange { index, value } => write!(
                f,
                "fp4 value {value} at index {index} is not finite or outside the representable \
                 range [-6.0, 6.0]"
            ),
            Self::Layout(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Layout(e) => Some(e),
            _ => None,
        }
    }
}

impl From<LayoutError> for PackError {
    fn from(e: LayoutError) -> Self {
        Self::Layout(e)
    }
}
