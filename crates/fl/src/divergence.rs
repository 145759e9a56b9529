//! Weight divergence (the study's Figure 2): for each named parameter tensor and each layer as a
//! whole, ||w_FedAvg - w_SGD|| / ||w_SGD|| (L2), where the SGD twin was trained centrally from the
//! same initial weights for the same number of epochs.

use fedra_nn::{Model, TensorKind};

/// One divergence figure: a tensor (`conv1.weight`) or a whole layer (`conv1`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Divergence {
    pub name: String,
    pub value: f64,
}

/// Divergence of `fed` from `sgd` per parameter tensor, then per layer, in the model's order.
/// A tensor whose SGD norm is zero reports the plain distance instead of a ratio.
pub fn weight_divergence(fed: &Model, sgd: &Model) -> Vec<Divergence> {
    let mut per_tensor = Vec::new();
    let mut layers: Vec<(String, f64, f64)> = Vec::new();
    for t in fed.tensors().iter().filter(|t| t.kind == TensorKind::Param) {
        let range = t.offset..t.offset + t.len;
        let (mut diff, mut norm) = (0f64, 0f64);
        for (&a, &b) in fed.params()[range.clone()].iter().zip(&sgd.params()[range]) {
            let d = a as f64 - b as f64;
            diff += d * d;
            norm += b as f64 * b as f64;
        }
        per_tensor.push(Divergence {
            name: t.name.clone(),
            value: ratio(diff, norm),
        });
        match layers.iter_mut().find(|(name, _, _)| *name == t.layer) {
            Some(entry) => {
                entry.1 += diff;
                entry.2 += norm;
            }
            None => layers.push((t.layer.clone(), diff, norm)),
        }
    }
    per_tensor.extend(layers.into_iter().map(|(name, diff, norm)| Divergence {
        name,
        value: ratio(diff, norm),
    }));
    per_tensor
}

fn ratio(diff_sq: f64, norm_sq: f64) -> f64 {
    if norm_sq > 0.0 {
        (diff_sq / norm_sq).sqrt()
    } else {
        diff_sq.sqrt()
    }
}
