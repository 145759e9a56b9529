//! The metrics clinicians read, computed from a model's class probabilities on a labelled set:
//! ROC AUC (binary: of the positive class, label 1; more classes: the macro mean of one-vs-rest
//! AUCs, as MedMNIST reports it), balanced accuracy (the mean of the per-class sensitivities),
//! and each class's sensitivity (recall, true-positive rate) and specificity (true-negative rate)
//! when that class is taken as "positive".
//!
//! AUC is the Mann-Whitney statistic: the probability that a random positive example scores
//! above a random negative one, ties counting one half, computed exactly with mid-ranks in
//! O(n log n). It is undefined (`None`) when the set holds only one of the two sides; the macro
//! mean leaves such classes out and is `None` when no class is left, and balanced accuracy
//! averages over the classes that occur (as scikit-learn does).
//!
//! Predictions are the first class of highest probability, as accuracy counts them.

use serde::{Deserialize, Serialize};

/// Clinical metrics of one evaluation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClinicalMetrics {
    /// Binary: AUC of class 1's probability. More classes: macro one-vs-rest AUC.
    pub auc: Option<f64>,
    /// Mean sensitivity over the classes present in the labels.
    pub balanced_accuracy: Option<f64>,
    /// Per class: TP / (TP + FN); `None` when the class does not occur in the labels.
    pub sensitivity: Vec<Option<f64>>,
    /// Per class: TN / (TN + FP); `None` when every label is that class.
    pub specificity: Vec<Option<f64>>,
}

/// ROC AUC of `scores` for the examples where `positive` is true against the others, ties
/// counting one half. `None` when either side is empty.
///
/// # Panics
/// If the slices differ in length (a caller bug).
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), positive.len(), "one label per score");
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the positives' mid-ranks (1-based; tied scores share the mean of their ranks).
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mid_rank = (i + j) as f64 / 2.0 + 1.0;
        let tied_pos = order[i..=j].iter().filter(|&&k| positive[k]).count();
        rank_sum += mid_rank * tied_pos as f64;
        i = j + 1;
    }
    let (p, n) = (n_pos as f64, n_neg as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// Clinical metrics from `probs` (`labels.len()` rows of `classes` probabilities, row-major).
///
/// # Panics
/// If `probs.len() != labels.len() * classes` or a label is `>= classes` (caller bugs).
pub fn clinical_metrics(probs: &[f64], labels: &[u16], classes: usize) -> ClinicalMetrics {
    assert_eq!(probs.len(), labels.len() * classes, "one row per label");
    let predicted: Vec<usize> = probs
        .chunks_exact(classes.max(1))
        .map(|row| {
            let mut arg = 0;
            for (j, &v) in row.iter().enumerate() {
                if v > row[arg] {
                    arg = j;
                }
            }
            arg
        })
        .collect();
    let (mut sensitivity, mut specificity) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let (mut tp, mut fn_, mut tn, mut fp) = (0usize, 0usize, 0usize, 0usize);
        for (&label, &pred) in labels.iter().zip(&predicted) {
            match (usize::from(label) == c, pred == c) {
                (true, true) => tp += 1,
                (true, false) => fn_ += 1,
                (false, false) => tn += 1,
                (false, true) => fp += 1,
            }
        }
        let rate = |a: usize, b: usize| (a + b > 0).then(|| a as f64 / (a + b) as f64);
        sensitivity.push(rate(tp, fn_));
        specificity.push(rate(tn, fp));
    }
    let present: Vec<f64> = sensitivity.iter().flatten().copied().collect();
    let balanced_accuracy =
        (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64);
    let class_auc = |c: usize| {
        let scores: Vec<f64> = probs.chunks_exact(classes).map(|row| row[c]).collect();
        let positive: Vec<bool> = labels.iter().map(|&l| usize::from(l) == c).collect();
        roc_auc(&scores, &positive)
    };
    let auc = if classes == 2 {
        class_auc(1)
    } else {
        let aucs: Vec<f64> = (0..classes).filter_map(class_auc).collect();
        (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64)
    };
    ClinicalMetrics {
        auc,
        balanced_accuracy,
        sensitivity,
        specificity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_by_hand_including_ties() {
        // Perfect and perfectly wrong rankings.
        assert_eq!(
            roc_auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            roc_auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        // All scores tied: every pair counts one half.
        assert_eq!(
            roc_auc(&[0.5; 5], &[true, false, true, false, false]),
            Some(0.5)
        );
        // Positives {0.4, 0.8}, negatives {0.1, 0.4, 0.9}. Pairs (pos > neg):
        // 0.4: beats 0.1, ties 0.4 (1/2), loses 0.9 -> 1.5; 0.8: beats 0.1, 0.4 -> 2.
        // AUC = 3.5 / 6.
        let auc = roc_auc(
            &[0.1, 0.4, 0.4, 0.8, 0.9],
            &[false, false, true, true, false],
        );
        assert!((auc.unwrap() - 3.5 / 6.0).abs() < 1e-12, "{auc:?}");
        // One side missing: undefined.
        assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(roc_auc(&[], &[]), None);
    }

    #[test]
    fn sensitivity_specificity_and_balanced_accuracy_by_hand() {
        // Three classes; predictions (argmax): 0, 0, 1, 2, 2, 1; labels 0, 1, 1, 2, 2, 2.
        let probs = [
            0.7, 0.2, 0.1, //
            0.5, 0.4, 0.1, //
            0.1, 0.8, 0.1, //
            0.2, 0.2, 0.6, //
            0.1, 0.3, 0.6, //
            0.3, 0.4, 0.3, //
        ];
        let labels = [0, 1, 1, 2, 2, 2];
        let m = clinical_metrics(&probs, &labels, 3);
        // Class 0: TP 1, FN 0; TN 4, FP 1.  Class 1: TP 1, FN 1; TN 3, FP 1.
        // Class 2: TP 2, FN 1; TN 3, FP 0.
        assert_eq!(m.sensitivity, [Some(1.0), Some(0.5), Some(2.0 / 3.0)]);
        assert_eq!(m.specificity, [Some(0.8), Some(0.75), Some(1.0)]);
        let ba = m.balanced_accuracy.unwrap();
        assert!((ba - (1.0 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert!(m.auc.is_some());

        // A class absent from the labels has no sensitivity and leaves the means.
        let m = clinical_metrics(&[0.9, 0.1, 0.0, 0.2, 0.7, 0.1], &[0, 1], 3);
        assert_eq!(m.sensitivity, [Some(1.0), Some(1.0), None]);
        assert_eq!(m.specificity[2], Some(1.0));
        assert_eq!(m.balanced_accuracy, Some(1.0));
        assert_eq!(m.auc, Some(1.0));
    }

    #[test]
    fn binary_auc_is_of_class_one() {
        let probs = [0.9, 0.1, 0.3, 0.7, 0.6, 0.4, 0.2, 0.8];
        let m = clinical_metrics(&probs, &[0, 1, 1, 0], 2);
        // Class-1 scores: 0.1 (neg), 0.7 (pos), 0.4 (pos), 0.8 (neg). Positive 0.7 beats 0.1
        // and loses to 0.8; 0.4 likewise: 2 of 4 pairs.
        assert_eq!(m.auc, Some(0.5));
        // Predicted 0, 1, 0, 1 for labels 0, 1, 1, 0.
        assert_eq!(m.sensitivity, [Some(0.5), Some(0.5)]);
        assert_eq!(m.specificity, [Some(0.5), Some(0.5)]);
    }
}
