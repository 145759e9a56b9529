//! The engine's layers, one module per family: each holds the forward and backward kernels of its
//! ops as free functions over flat NCHW slices. `crate::train` owns the buffers and walks the
//! graph (`crate::plan`) calling them.

pub(crate) mod conv;
pub(crate) mod elementwise;
pub(crate) mod linear;
pub(crate) mod lrn;
pub(crate) mod norm;
pub(crate) mod pool;
