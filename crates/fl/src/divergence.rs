//! Weight divergence (the study's Figure 2): for each named parameter tensor and each layer as a
//! whole, ||w_FedAvg - w_SGD|| / ||w_SGD|| (L2), where the SGD twin was trained centrally from the
//! same initial weights for the same number of epochs. And the spread of the clients'
//! BatchNorm running statistics in a round: how far label skew pulls each client's normalisation
//! away from the others', the drift FedBN and GroupNorm exist to avoid.

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

/// How far apart the clients' BatchNorm running means are after a round: for every BatchNorm
/// channel, the standard deviation over the clients of their running mean divided by the
/// channel's pooled standard deviation (the square root of the clients' mean running variance
/// plus BatchNorm's 1e-5), averaged over every channel of every BatchNorm layer. 0 when the
/// clients agree (one client, statistics frozen); about 1 when client means differ by a
/// channel's standard deviation. `None` for a model without running statistics or no clients.
pub fn statistics_spread(model: &Model, client_buffers: &[&[f32]]) -> Option<f64> {
    if client_buffers.is_empty() {
        return None;
    }
    let n = client_buffers.len() as f64;
    let (mut sum, mut channels) = (0f64, 0usize);
    for mean_t in model
        .tensors()
        .iter()
        .filter(|t| t.kind == TensorKind::Buffer && t.name.ends_with(".running_mean"))
    {
        let var_name = format!("{}.running_var", mean_t.layer);
        let Some(var_t) = model.tensors().iter().find(|t| t.name == var_name) else {
            continue;
        };
        for c in 0..mean_t.len {
            let (mut m1, mut m2, mut var) = (0f64, 0f64, 0f64);
            for b in client_buffers {
                let mu = f64::from(b[mean_t.offset + c]);
                m1 += mu;
                m2 += mu * mu;
                var += f64::from(b[var_t.offset + c]);
            }
            let (m1, m2, var) = (m1 / n, m2 / n, var / n);
            let sd_between = (m2 - m1 * m1).max(0.0).sqrt();
            sum += sd_between / (var.max(0.0) + 1e-5).sqrt();
            channels += 1;
        }
    }
    (channels > 0).then(|| sum / channels as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedra_nn::ModelSpec;

    #[test]
    fn statistics_spread_is_the_clients_sd_of_means_over_the_pooled_sd() {
        let spec = ModelSpec::by_name("mnist-cnn-bn", [1, 28, 28], 10).unwrap();
        let model = Model::new(&spec, 0).unwrap();
        assert_eq!(statistics_spread(&model, &[]), None);
        let base = model.buffers().to_vec();
        // Two clients whose every running mean is 0 and 2, running variance 1 and 3: the
        // means' standard deviation 1 over sqrt(mean variance 2 + 1e-5).
        let mut a = base.clone();
        let mut b = base.clone();
        for t in model
            .tensors()
            .iter()
            .filter(|t| t.kind == TensorKind::Buffer)
        {
            let (va, vb) = match t.name.rsplit('.').next() {
                Some("running_mean") => (0.0, 2.0),
                Some("running_var") => (1.0, 3.0),
                _ => continue,
            };
            a[t.offset..t.offset + t.len].fill(va);
            b[t.offset..t.offset + t.len].fill(vb);
        }
        let spread = statistics_spread(&model, &[&a, &b]).unwrap();
        assert!(
            (spread - 1.0 / (2.0f64 + 1e-5).sqrt()).abs() < 1e-12,
            "{spread}"
        );
        assert_eq!(statistics_spread(&model, &[&a, &a, &a]), Some(0.0));
        let plain = ModelSpec::by_name("mnist-cnn", [1, 28, 28], 10).unwrap();
        let plain = Model::new(&plain, 0).unwrap();
        assert_eq!(statistics_spread(&plain, &[plain.buffers()]), None);
    }
}
