//! Model weights on the wire: every tensor of the model, in the model's own order, as raw
//! little-endian f32 bytes cut into [`TensorChunk`]s of at most [`CHUNK_VALUES`] values. The
//! receiving side rebuilds the parameter and buffer vectors with an [`Assembler`], which takes
//! chunks from an untrusted peer: every name, offset, length and value is checked against the
//! model's [`Layout`] before it is stored, and any mismatch is an error naming the tensor, never a
//! panic or an allocation the peer chose.

use fedra_nn::{Model, TensorKind};

use crate::proto::TensorChunk;

/// Values per chunk: 1 Mi f32 = 4 MiB, under [`crate::MAX_MESSAGE_BYTES`].
pub const CHUNK_VALUES: usize = 1024 * 1024;

/// A peer's text shortened for an error or a log line (a tensor name can be megabytes long).
pub(crate) fn clip(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// What an update or task may not contain.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum WireError {
    #[error("tensor `{got}` where `{expected}` was expected (tensors come in the model's order)")]
    UnexpectedTensor { expected: String, got: String },
    #[error("tensor `{got}` after the model's last tensor")]
    ExtraTensor { got: String },
    #[error("tensor `{tensor}`: chunk at element {got}, expected element {expected}")]
    Offset {
        tensor: String,
        expected: u64,
        got: u64,
    },
    #[error("tensor `{tensor}`: a chunk of {bytes} bytes is not a whole number of f32 values")]
    Misaligned { tensor: String, bytes: usize },
    #[error("tensor `{tensor}`: an empty chunk")]
    EmptyChunk { tensor: String },
    #[error("tensor `{tensor}` has {expected} values, the chunks carry more")]
    TooLong { tensor: String, expected: usize },
    #[error("tensor `{tensor}`: value {index} is {value} (NaN or infinite)")]
    NonFinite {
        tensor: String,
        index: usize,
        value: f32,
    },
    #[error("tensor `{tensor}` ended after {got} of its {expected} values")]
    Incomplete {
        tensor: String,
        got: usize,
        expected: usize,
    },
}

/// One tensor's place in the model's parameter or buffer vector.
#[derive(Clone, Debug, PartialEq)]
struct Slot {
    name: String,
    kind: TensorKind,
    offset: usize,
    len: usize,
}

/// The named tensors of a model, in order: what a message's chunks must match.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    slots: Vec<Slot>,
    params_len: usize,
    buffers_len: usize,
}

impl Layout {
    pub fn of(model: &Model) -> Layout {
        Layout {
            slots: model
                .tensors()
                .iter()
                .map(|t| Slot {
                    name: t.name.clone(),
                    kind: t.kind,
                    offset: t.offset,
                    len: t.len,
                })
                .collect(),
            params_len: model.params().len(),
            buffers_len: model.buffers().len(),
        }
    }

    /// Bytes the weights take on the wire, without message framing.
    pub fn payload_bytes(&self) -> usize {
        4 * (self.params_len + self.buffers_len)
    }

    /// The chunks carrying `params` and `buffers` (which must have this layout's sizes).
    pub fn chunks(&self, params: &[f32], buffers: &[f32]) -> Vec<TensorChunk> {
        assert_eq!(params.len(), self.params_len, "parameter vector size");
        assert_eq!(buffers.len(), self.buffers_len, "buffer vector size");
        let mut out = Vec::new();
        for slot in &self.slots {
            let values = match slot.kind {
                TensorKind::Param => &params[slot.offset..slot.offset + slot.len],
                TensorKind::Buffer => &buffers[slot.offset..slot.offset + slot.len],
            };
            for (k, part) in values.chunks(CHUNK_VALUES).enumerate() {
                let mut bytes = Vec::with_capacity(part.len() * 4);
                for v in part {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                out.push(TensorChunk {
                    name: slot.name.clone(),
                    offset: (k * CHUNK_VALUES) as u64,
                    data: bytes.into(),
                });
            }
        }
        out
    }
}

/// Rebuilds weights from chunks, checking each as it arrives.
pub struct Assembler {
    /// A copy of the layout (names and sizes only): an assembler outlives no borrow.
    layout: Layout,
    params: Vec<f32>,
    buffers: Vec<f32>,
    /// Index of the tensor being filled.
    current: usize,
    /// Values of that tensor received so far.
    filled: usize,
}

impl Assembler {
    pub fn new(layout: &Layout) -> Assembler {
        Assembler {
            layout: layout.clone(),
            params: vec![0.0; layout.params_len],
            buffers: vec![0.0; layout.buffers_len],
            current: 0,
            filled: 0,
        }
    }

    /// Take the next chunk. A chunk for the next tensor is accepted only once the current one
    /// is complete.
    pub fn push(&mut self, chunk: &TensorChunk) -> Result<(), WireError> {
        let slots = &self.layout.slots;
        if self.current < slots.len() && self.filled == slots[self.current].len {
            self.current += 1;
            self.filled = 0;
        }
        let Some(slot) = slots.get(self.current) else {
            return Err(WireError::ExtraTensor {
                got: clip(&chunk.name),
            });
        };
        if chunk.name != slot.name && self.filled > 0 {
            // The tensor being filled is short: the peer's model has another shape.
            return Err(WireError::Incomplete {
                tensor: slot.name.clone(),
                got: self.filled,
                expected: slot.len,
            });
        }
        if chunk.name != slot.name {
            // A zero-length tensor could be skipped here, but models have none.
            return Err(WireError::UnexpectedTensor {
                expected: slot.name.clone(),
                got: clip(&chunk.name),
            });
        }
        if chunk.offset != self.filled as u64 {
            return Err(WireError::Offset {
                tensor: slot.name.clone(),
                expected: self.filled as u64,
                got: chunk.offset,
            });
        }
        let bytes = &chunk.data;
        if bytes.is_empty() {
            return Err(WireError::EmptyChunk {
                tensor: slot.name.clone(),
            });
        }
        if !bytes.len().is_multiple_of(4) {
            return Err(WireError::Misaligned {
                tensor: slot.name.clone(),
                bytes: bytes.len(),
            });
        }
        let n = bytes.len() / 4;
        if n > slot.len - self.filled {
            return Err(WireError::TooLong {
                tensor: slot.name.clone(),
                expected: slot.len,
            });
        }
        let target = match slot.kind {
            TensorKind::Param => &mut self.params,
            TensorKind::Buffer => &mut self.buffers,
        };
        let start = slot.offset + self.filled;
        for (i, (dst, src)) in target[start..start + n]
            .iter_mut()
            .zip(bytes.chunks_exact(4))
            .enumerate()
        {
            let value = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
            if !value.is_finite() {
                return Err(WireError::NonFinite {
                    tensor: slot.name.clone(),
                    index: self.filled + i,
                    value,
                });
            }
            *dst = value;
        }
        self.filled += n;
        Ok(())
    }

    /// The parameter and buffer vectors, once every tensor is complete.
    pub fn finish(self) -> Result<(Vec<f32>, Vec<f32>), WireError> {
        let slots = &self.layout.slots;
        let mut current = self.current;
        let mut filled = self.filled;
        if current < slots.len() && filled == slots[current].len {
            current += 1;
            filled = 0;
        }
        if let Some(slot) = slots.get(current) {
            return Err(WireError::Incomplete {
                tensor: slot.name.clone(),
                got: filled,
                expected: slot.len,
            });
        }
        Ok((self.params, self.buffers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedra_nn::ModelSpec;

    fn model() -> Model {
        Model::new(&ModelSpec::by_name("mlp", [1, 28, 28], 10).unwrap(), 3).unwrap()
    }

    #[test]
    fn chunks_round_trip_bit_for_bit() {
        let m = model();
        let layout = Layout::of(&m);
        let mut a = Assembler::new(&layout);
        for c in layout.chunks(m.params(), m.buffers()) {
            a.push(&c).unwrap();
        }
        let (p, b) = a.finish().unwrap();
        assert_eq!(p, m.params());
        assert_eq!(b, m.buffers());
    }

    #[test]
    fn bad_chunks_are_named_errors() {
        let m = model();
        let layout = Layout::of(&m);
        let chunks = layout.chunks(m.params(), m.buffers());
        let first = chunks[0].name.clone();
        // Wrong order.
        let mut a = Assembler::new(&layout);
        let err = a.push(&chunks[1]).unwrap_err();
        assert!(matches!(err, WireError::UnexpectedTensor { .. }), "{err}");
        // NaN.
        let mut bad = chunks[0].clone();
        let mut bytes = bad.data.to_vec();
        bytes[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        bad.data = bytes.into();
        let err = Assembler::new(&layout).push(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("tensor `{first}`: value 1 is NaN (NaN or infinite)")
        );
        // Truncated: missing last tensor.
        let mut a = Assembler::new(&layout);
        for c in &chunks[..chunks.len() - 1] {
            a.push(c).unwrap();
        }
        assert!(matches!(a.finish(), Err(WireError::Incomplete { .. })));
        // One value too many.
        let mut long = chunks[0].clone();
        let mut bytes = long.data.to_vec();
        bytes.extend_from_slice(&1f32.to_le_bytes());
        long.data = bytes.into();
        assert!(matches!(
            Assembler::new(&layout).push(&long),
            Err(WireError::TooLong { .. })
        ));
        // Misaligned and wrong offset.
        let mut odd = chunks[0].clone();
        odd.data = odd.data.slice(..5);
        assert!(matches!(
            Assembler::new(&layout).push(&odd),
            Err(WireError::Misaligned { .. })
        ));
        let mut moved = chunks[0].clone();
        moved.offset = 1;
        assert!(matches!(
            Assembler::new(&layout).push(&moved),
            Err(WireError::Offset { .. })
        ));
        // Extra tensor after the last one.
        let mut a = Assembler::new(&layout);
        for c in &chunks {
            a.push(c).unwrap();
        }
        assert!(matches!(
            a.push(&chunks[0]),
            Err(WireError::ExtraTensor { .. })
        ));
    }
}
