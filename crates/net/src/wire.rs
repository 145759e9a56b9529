//! Model weights on the wire: every tensor of the model, in the model's own order, as raw
//! little-endian f32 bytes cut into [`TensorChunk`]s of at most [`CHUNK_VALUES`] values (for a
//! SCAFFOLD task, followed by one `control/<name>` tensor per parameter tensor). The
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

/// Which vector a tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Param,
    Buffer,
    /// SCAFFOLD's correction, shaped like the parameters.
    Control,
}

/// One tensor's place in the model's parameter or buffer vector (or the control vector).
#[derive(Clone, Debug, PartialEq)]
struct Slot {
    name: String,
    part: Part,
    offset: usize,
    len: usize,
}

/// The named tensors of a model, in order: what a message's chunks must match.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    slots: Vec<Slot>,
    params_len: usize,
    buffers_len: usize,
    /// Values of the control tensors ([`Layout::with_control`]; 0 without).
    control_len: usize,
}

impl Layout {
    pub fn of(model: &Model) -> Layout {
        Layout {
            slots: model
                .tensors()
                .iter()
                .map(|t| Slot {
                    name: t.name.clone(),
                    part: match t.kind {
                        TensorKind::Param => Part::Param,
                        TensorKind::Buffer => Part::Buffer,
                    },
                    offset: t.offset,
                    len: t.len,
                })
                .collect(),
            params_len: model.params().len(),
            buffers_len: model.buffers().len(),
            control_len: 0,
        }
    }

    /// This layout followed by a `control/<name>` tensor for each parameter tensor (a SCAFFOLD
    /// task's correction).
    pub fn with_control(&self) -> Layout {
        let mut out = self.clone();
        let controls: Vec<Slot> = self
            .slots
            .iter()
            .filter(|s| s.part == Part::Param)
            .map(|s| Slot {
                name: format!("control/{}", s.name),
                part: Part::Control,
                offset: s.offset,
                len: s.len,
            })
            .collect();
        out.slots.extend(controls);
        out.control_len = self.params_len;
        out
    }

    /// Bytes the weights (and control) take on the wire, without message framing.
    pub fn payload_bytes(&self) -> usize {
        4 * (self.params_len + self.buffers_len + self.control_len)
    }

    /// The chunks carrying `params` and `buffers` (which must have this layout's sizes; a layout
    /// with control needs [`Layout::chunks_with_control`]).
    pub fn chunks(&self, params: &[f32], buffers: &[f32]) -> Vec<TensorChunk> {
        self.chunks_with_control(params, buffers, &[])
    }

    /// The chunks carrying `params`, `buffers` and `control` (empty for a layout without).
    pub fn chunks_with_control(
        &self,
        params: &[f32],
        buffers: &[f32],
        control: &[f32],
    ) -> Vec<TensorChunk> {
        assert_eq!(params.len(), self.params_len, "parameter vector size");
        assert_eq!(buffers.len(), self.buffers_len, "buffer vector size");
        assert_eq!(control.len(), self.control_len, "control vector size");
        let mut out = Vec::new();
        for slot in &self.slots {
            let values = match slot.part {
                Part::Param => &params[slot.offset..slot.offset + slot.len],
                Part::Buffer => &buffers[slot.offset..slot.offset + slot.len],
                Part::Control => &control[slot.offset..slot.offset + slot.len],
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
    control: Vec<f32>,
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
            control: vec![0.0; layout.control_len],
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
        let target = match slot.part {
            Part::Param => &mut self.params,
            Part::Buffer => &mut self.buffers,
            Part::Control => &mut self.control,
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
        self.finish_with_control().map(|r| (r.params, r.buffers))
    }

    /// Every vector, control included, once every tensor is complete.
    pub fn finish_with_control(self) -> Result<Received, WireError> {
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
        Ok(Received {
            params: self.params,
            buffers: self.buffers,
            control: self.control,
        })
    }
}

/// What an [`Assembler`] rebuilt.
#[derive(Debug)]
pub struct Received {
    pub params: Vec<f32>,
    pub buffers: Vec<f32>,
    /// SCAFFOLD's correction; empty for a layout without control.
    pub control: Vec<f32>,
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

    #[test]
    fn a_control_travels_after_the_weights_and_is_checked_like_them() {
        let m = model();
        let layout = Layout::of(&m).with_control();
        let control: Vec<f32> = (0..m.params().len()).map(|i| i as f32 * 1e-3).collect();
        let chunks = layout.chunks_with_control(m.params(), m.buffers(), &control);
        let plain = Layout::of(&m).chunks(m.params(), m.buffers());
        assert_eq!(
            &chunks[..plain.len()],
            &plain[..],
            "the weights come first, unchanged"
        );
        assert!(
            chunks[plain.len()..]
                .iter()
                .all(|c| c.name.starts_with("control/"))
        );
        assert_eq!(
            layout.payload_bytes(),
            Layout::of(&m).payload_bytes() + 4 * m.params().len()
        );
        let mut a = Assembler::new(&layout);
        for c in &chunks {
            a.push(c).unwrap();
        }
        let r = a.finish_with_control().unwrap();
        assert_eq!(
            (r.params.as_slice(), r.buffers.as_slice()),
            (m.params(), m.buffers())
        );
        assert_eq!(r.control, control);
        // A task that promised a control and sends none is incomplete, naming the first control
        // tensor; a model layout refuses a control tensor.
        let mut a = Assembler::new(&layout);
        for c in &plain {
            a.push(c).unwrap();
        }
        let err = a.finish().unwrap_err();
        assert!(err.to_string().contains("control/"), "{err}");
        let mut a = Assembler::new(&Layout::of(&m));
        for c in &plain {
            a.push(c).unwrap();
        }
        assert!(matches!(
            a.push(&chunks[plain.len()]),
            Err(WireError::ExtraTensor { .. })
        ));
        // A non-finite correction is refused like a non-finite weight.
        let mut bad = chunks[plain.len()].clone();
        let mut bytes = bad.data.to_vec();
        bytes[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        bad.data = bytes.into();
        let mut a = Assembler::new(&layout);
        for c in &plain {
            a.push(c).unwrap();
        }
        assert!(matches!(a.push(&bad), Err(WireError::NonFinite { .. })));
    }

    proptest::proptest! {
        /// A task's chunks (weights and control) with bytes flipped: refused with an error, or
        /// rebuilt into vectors of the layout's sizes holding only finite values; never a panic.
        #[test]
        fn mutated_control_tasks_are_refused_or_well_formed(
            flips in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(),
                 proptest::prelude::any::<proptest::sample::Index>(), 1u8..=255), 1..4),
        ) {
            use prost::Message as _;
            let m = model();
            let layout = Layout::of(&m).with_control();
            let control = vec![0.25f32; m.params().len()];
            let mut frames: Vec<Vec<u8>> = layout
                .chunks_with_control(m.params(), m.buffers(), &control)
                .iter()
                .map(|c| c.encode_to_vec())
                .collect();
            for (frame, byte, xor) in flips {
                let f = frame.index(frames.len());
                if frames[f].is_empty() { continue; }
                let b = byte.index(frames[f].len());
                frames[f][b] ^= xor;
            }
            let mut a = Assembler::new(&layout);
            let mut refused = false;
            for frame in &frames {
                match TensorChunk::decode(&frame[..]) {
                    Ok(c) if a.push(&c).is_ok() => {}
                    _ => { refused = true; break; }
                }
            }
            if !refused && let Ok(r) = a.finish_with_control() {
                proptest::prop_assert_eq!(r.params.len(), m.params().len());
                proptest::prop_assert_eq!(r.buffers.len(), m.buffers().len());
                proptest::prop_assert_eq!(r.control.len(), m.params().len());
                proptest::prop_assert!(r.params.iter().chain(&r.control).all(|v| v.is_finite()));
            }
        }
    }
}
