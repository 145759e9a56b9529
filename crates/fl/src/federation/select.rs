//! Tensors by name: the parameters `model.freeze` keeps fixed and the BatchNorm layers
//! `model.freeze_statistics` keeps fixed (a pattern that matches nothing is an error, not a
//! silent no-op), and the packing of a FedBN client's local layers into one vector and back.

use std::ops::Range;

use fedra_nn::{Model, TensorKind};

use crate::error::FlError;

/// Compiles glob patterns; the error names the pattern that is not one.
pub fn compile_patterns(patterns: &[String]) -> Result<Vec<glob::Pattern>, (String, String)> {
    patterns
        .iter()
        .map(|p| glob::Pattern::new(p).map_err(|e| (p.clone(), e.to_string())))
        .collect()
}

/// Fails naming `key` and the pattern when a pattern matches no tensor of `model` (with
/// `params_only`, no parameter): a typo must not silently freeze or reset nothing.
pub(super) fn match_patterns_somewhere(
    patterns: &[glob::Pattern],
    model: &Model,
    key: &str,
    params_only: bool,
) -> Result<(), FlError> {
    for p in patterns {
        let hit = model
            .tensors()
            .iter()
            .filter(|t| !params_only || t.kind == TensorKind::Param)
            .any(|t| p.matches(&t.name));
        if !hit {
            let names: Vec<&str> = model
                .tensors()
                .iter()
                .filter(|t| !params_only || t.kind == TensorKind::Param)
                .map(|t| t.name.as_str())
                .collect();
            return Err(FlError::State(format!(
                "{key}: pattern {:?} matches no {} of model {} ({})",
                p.as_str(),
                if params_only { "parameter" } else { "tensor" },
                model.spec().name,
                names.join(", ")
            )));
        }
    }
    Ok(())
}

/// The parameter ranges `model.freeze`'s patterns select in `model` (whole tensors, in order).
pub fn frozen_ranges(model: &Model, patterns: &[String]) -> Result<Vec<Range<usize>>, FlError> {
    let compiled = compile_patterns(patterns)
        .map_err(|(p, e)| FlError::State(format!("model.freeze {p:?}: {e}")))?;
    match_patterns_somewhere(&compiled, model, "model.freeze", true)?;
    Ok(model
        .tensors()
        .iter()
        .filter(|t| t.kind == TensorKind::Param && compiled.iter().any(|p| p.matches(&t.name)))
        .map(|t| t.offset..t.offset + t.len)
        .collect())
}

/// The BatchNorm layers `model.freeze_statistics`' patterns select in `model`, in model order;
/// a pattern that matches no BatchNorm layer is an error listing those there are.
pub fn frozen_statistics(model: &Model, patterns: &[String]) -> Result<Vec<String>, FlError> {
    let compiled = compile_patterns(patterns)
        .map_err(|(p, e)| FlError::State(format!("model.freeze_statistics {p:?}: {e}")))?;
    let mut layers: Vec<String> = Vec::new();
    for t in model.tensors() {
        if t.kind == TensorKind::Buffer && t.name.ends_with(".running_mean") {
            layers.push(t.layer.clone());
        }
    }
    for p in &compiled {
        if !layers.iter().any(|l| p.matches(l)) {
            return Err(FlError::State(format!(
                "model.freeze_statistics: pattern {:?} matches no BatchNorm layer of model {} ({})",
                p.as_str(),
                model.spec().name,
                if layers.is_empty() {
                    "it has none".to_string()
                } else {
                    layers.join(", ")
                }
            )));
        }
    }
    layers.retain(|l| compiled.iter().any(|p| p.matches(l)));
    Ok(layers)
}

/// The values of `ranges` of `values`, one after another (a FedBN client's layers, packed).
pub fn gather(values: &[f32], ranges: &[Range<usize>]) -> Vec<f32> {
    ranges
        .iter()
        .flat_map(|r| values[r.clone()].iter().copied())
        .collect()
}

/// The inverse of [`gather`]: `packed` written back into `ranges` of `out`.
pub fn scatter(packed: &[f32], ranges: &[Range<usize>], out: &mut [f32]) {
    let mut j = 0;
    for r in ranges {
        out[r.clone()].copy_from_slice(&packed[j..j + r.len()]);
        j += r.len();
    }
}
