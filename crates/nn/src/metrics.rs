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

/// The first class of highest probability in each row of `probs`.
fn predictions(probs: &[f64], classes: usize) -> impl Iterator<Item = usize> + '_ {
    probs.chunks_exact(classes.max(1)).map(|row| {
        let mut arg = 0;
        for (j, &v) in row.iter().enumerate() {
            if v > row[arg] {
                arg = j;
            }
        }
        arg
    })
}

/// Sensitivity and specificity per class, and balanced accuracy, from a confusion matrix
/// (`confusion[true * classes + predicted]`).
fn rates(confusion: &[u64], classes: usize) -> (Vec<Option<f64>>, Vec<Option<f64>>, Option<f64>) {
    // In u128: no sum of u64 counts can overflow it, whatever the counts.
    let total: u128 = confusion.iter().map(|&v| u128::from(v)).sum();
    let (mut sensitivity, mut specificity) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let row: u128 = confusion[c * classes..(c + 1) * classes]
            .iter()
            .map(|&v| u128::from(v))
            .sum();
        let column: u128 = (0..classes)
            .map(|t| u128::from(confusion[t * classes + c]))
            .sum();
        let tp = u128::from(confusion[c * classes + c]);
        let (fn_, fp) = (row - tp, column - tp);
        let tn = total - row - fp;
        let rate = |a: u128, b: u128| (a + b > 0).then(|| a as f64 / (a + b) as f64);
        sensitivity.push(rate(tp, fn_));
        specificity.push(rate(tn, fp));
    }
    let present: Vec<f64> = sensitivity.iter().flatten().copied().collect();
    let balanced_accuracy =
        (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64);
    (sensitivity, specificity, balanced_accuracy)
}

/// Binary: class 1's AUC; more classes: the mean of the defined one-vs-rest AUCs.
fn combine_auc(classes: usize, class_auc: impl Fn(usize) -> Option<f64>) -> Option<f64> {
    if classes == 2 {
        class_auc(1)
    } else {
        let aucs: Vec<f64> = (0..classes).filter_map(class_auc).collect();
        (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64)
    }
}

fn confusion_matrix(probs: &[f64], labels: &[u16], classes: usize) -> Vec<u64> {
    let mut confusion = vec![0u64; classes * classes];
    for (&label, pred) in labels.iter().zip(predictions(probs, classes)) {
        confusion[usize::from(label) * classes + pred] += 1;
    }
    confusion
}

/// Clinical metrics from `probs` (`labels.len()` rows of `classes` probabilities, row-major).
///
/// # Panics
/// If `probs.len() != labels.len() * classes` or a label is `>= classes` (caller bugs).
pub fn clinical_metrics(probs: &[f64], labels: &[u16], classes: usize) -> ClinicalMetrics {
    assert_eq!(probs.len(), labels.len() * classes, "one row per label");
    let confusion = confusion_matrix(probs, labels, classes);
    let (sensitivity, specificity, balanced_accuracy) = rates(&confusion, classes);
    let auc = combine_auc(classes, |c| {
        let scores: Vec<f64> = probs.chunks_exact(classes).map(|row| row[c]).collect();
        let positive: Vec<bool> = labels.iter().map(|&l| usize::from(l) == c).collect();
        roc_auc(&scores, &positive)
    });
    ClinicalMetrics {
        auc,
        balanced_accuracy,
        sensitivity,
        specificity,
    }
}

/// Bins of one score histogram of [`EvalCounts`]: the log-odds of a probability, clamped to
/// +-[`SCORE_LOGIT_RANGE`], in bins of 1/1024 (fine enough to rank the nearly equal scores of
/// an untrained model).
pub const SCORE_BINS: u64 = 32 * 1024;
/// Log-odds beyond which scores share the first or last bin (probabilities within about 1e-7
/// of 0 or 1).
pub const SCORE_LOGIT_RANGE: f64 = 16.0;

/// The histogram bin of probability `p`.
pub fn score_bin(p: f64) -> u64 {
    let logit = p.ln() - (1.0 - p).ln();
    let x = (logit + SCORE_LOGIT_RANGE) / (2.0 * SCORE_LOGIT_RANGE) * SCORE_BINS as f64;
    // `as` saturates (NaN becomes 0).
    (x.floor() as u64).min(SCORE_BINS - 1)
}

/// Most examples one evaluation may count (2^40): sums over any realistic number of sites stay
/// far from overflowing.
pub const MAX_EVAL_EXAMPLES: u64 = 1 << 40;

/// What one evaluation measured, as counts and sums that add up across the sites that hold
/// parts of a test set: federated evaluation sends these, never a prediction per example.
/// Accuracy, loss, sensitivity, specificity and balanced accuracy of the sum are those of the
/// pooled test set exactly; the AUC comes from histograms of each class's score (log-odds bins
/// of 1/1024), so two examples in one bin count as tied: it is within that bin's mass of the
/// exact pooled AUC. `correct` is the trainer's count (argmax of the logits) and the confusion
/// matrix the argmax of the probabilities: they agree but for exact ties.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalCounts {
    pub classes: usize,
    pub examples: u64,
    pub loss_sum: f64,
    pub correct: u64,
    /// `confusion[true * classes + predicted]`.
    pub confusion: Vec<u64>,
    /// For each class c, two histograms of c's probability ([`SCORE_BINS`] bins each): over the
    /// examples of class c, then over the others. Sparse: `(key, count)` with
    /// `key = (c * 2 + side) * SCORE_BINS + bin`, keys strictly increasing, counts above 0.
    pub score_histograms: Vec<(u64, u64)>,
}

impl EvalCounts {
    /// Nothing evaluated yet.
    pub fn empty(classes: usize) -> EvalCounts {
        EvalCounts {
            classes,
            examples: 0,
            loss_sum: 0.0,
            correct: 0,
            confusion: vec![0; classes * classes],
            score_histograms: Vec::new(),
        }
    }

    /// The counts of one evaluation: its loss sum and correct count (as the trainer counts them)
    /// and its probabilities.
    ///
    /// # Panics
    /// If `probs.len() != labels.len() * classes` or a label is `>= classes` (caller bugs).
    pub fn from_probs(
        probs: &[f64],
        labels: &[u16],
        classes: usize,
        loss_sum: f64,
        correct: usize,
    ) -> EvalCounts {
        assert_eq!(probs.len(), labels.len() * classes, "one row per label");
        let mut bins = std::collections::BTreeMap::<u64, u64>::new();
        for (row, &label) in probs.chunks_exact(classes).zip(labels) {
            for (c, &p) in row.iter().enumerate() {
                let side = u64::from(usize::from(label) != c);
                *bins
                    .entry((c as u64 * 2 + side) * SCORE_BINS + score_bin(p))
                    .or_default() += 1;
            }
        }
        EvalCounts {
            classes,
            examples: labels.len() as u64,
            loss_sum,
            correct: correct as u64,
            confusion: confusion_matrix(probs, labels, classes),
            score_histograms: bins.into_iter().collect(),
        }
    }

    /// Whether these counts could come from an evaluation of `classes` classes: lengths, and
    /// sums that agree with one another. The reason when not.
    pub fn check(&self, classes: usize) -> Result<(), String> {
        if self.classes != classes {
            return Err(format!("{} classes, the model has {classes}", self.classes));
        }
        if self.confusion.len() != classes * classes {
            return Err(format!(
                "a confusion matrix of {} cells for {classes} classes",
                self.confusion.len()
            ));
        }
        if self.examples == 0 {
            return Err("an evaluation of 0 examples".into());
        }
        if self.examples > MAX_EVAL_EXAMPLES {
            return Err(format!(
                "an evaluation of {} examples (at most {MAX_EVAL_EXAMPLES})",
                self.examples
            ));
        }
        if !(self.loss_sum.is_finite() && self.loss_sum >= 0.0) {
            return Err(format!("a loss sum of {}", self.loss_sum));
        }
        if self.correct > self.examples {
            return Err(format!(
                "{} correct of {} examples",
                self.correct, self.examples
            ));
        }
        let sum = |values: &[u64]| values.iter().try_fold(0u64, |s, &v| s.checked_add(v));
        if sum(&self.confusion) != Some(self.examples) {
            return Err(format!(
                "a confusion matrix that does not add up to its {} examples",
                self.examples
            ));
        }
        // Each example is counted once in each class's pair of histograms.
        let keys = (classes as u64).saturating_mul(2 * SCORE_BINS);
        let mut totals = vec![0u64; classes * 2];
        let mut last = None;
        for &(key, count) in &self.score_histograms {
            if key >= keys || last.is_some_and(|l| key <= l) || count == 0 {
                return Err(format!(
                    "score histograms with a bin {key} out of order, out of range or empty"
                ));
            }
            last = Some(key);
            let total = &mut totals[(key / SCORE_BINS) as usize];
            *total = total.saturating_add(count);
        }
        for c in 0..classes {
            let of_class = sum(&self.confusion[c * classes..(c + 1) * classes]);
            let others = of_class.map(|n| self.examples - n);
            if Some(totals[2 * c]) != of_class || Some(totals[2 * c + 1]) != others {
                return Err(format!(
                    "score histograms of class {c} that do not match its confusion-matrix row"
                ));
            }
        }
        Ok(())
    }

    /// Add another evaluation's counts (of the same classes; counts saturate).
    ///
    /// # Panics
    /// If the class counts differ (callers [`check`](Self::check) first).
    pub fn add(&mut self, other: &EvalCounts) {
        assert_eq!(self.classes, other.classes, "evaluations of one model");
        self.examples = self.examples.saturating_add(other.examples);
        self.loss_sum += other.loss_sum;
        self.correct = self.correct.saturating_add(other.correct);
        for (a, &b) in self.confusion.iter_mut().zip(&other.confusion) {
            *a = a.saturating_add(b);
        }
        let mut merged =
            Vec::with_capacity(self.score_histograms.len() + other.score_histograms.len());
        let (mut a, mut b) = (
            self.score_histograms.iter().peekable(),
            other.score_histograms.iter().peekable(),
        );
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&(ka, ca)), Some(&&(kb, cb))) if ka == kb => {
                    a.next();
                    b.next();
                    (ka, ca.saturating_add(cb))
                }
                (Some(&&x), Some(&&y)) => {
                    if x.0 < y.0 {
                        a.next();
                        x
                    } else {
                        b.next();
                        y
                    }
                }
                (Some(&&x), None) => {
                    a.next();
                    x
                }
                (None, Some(&&y)) => {
                    b.next();
                    y
                }
                (None, None) => break,
            };
            merged.push(next);
        }
        self.score_histograms = merged;
    }

    /// Merge each score histogram's bins in pairs (bin 2j + 1 into 2j, then, called again, in
    /// fours...): the same histograms at half the resolution, in fewer entries, for when they
    /// would not fit one message.
    pub fn coarsen(&mut self, times: u32) {
        let mask = !((1u64 << times.min(15)) - 1);
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.score_histograms.len());
        for &(key, count) in &self.score_histograms {
            let key = key & mask;
            match merged.last_mut() {
                Some(last) if last.0 == key => last.1 = last.1.saturating_add(count),
                _ => merged.push((key, count)),
            }
        }
        self.score_histograms = merged;
    }

    /// Fraction correct (0 when empty).
    pub fn accuracy(&self) -> f64 {
        if self.examples == 0 {
            0.0
        } else {
            self.correct as f64 / self.examples as f64
        }
    }

    /// Mean loss (0 when empty).
    pub fn mean_loss(&self) -> f64 {
        if self.examples == 0 {
            0.0
        } else {
            self.loss_sum / self.examples as f64
        }
    }

    /// The clinical metrics of the counted examples (AUC from the score histograms).
    pub fn clinical(&self) -> ClinicalMetrics {
        let classes = self.classes;
        let (sensitivity, specificity, balanced_accuracy) = rates(&self.confusion, classes);
        let hist = &self.score_histograms;
        let auc = combine_auc(classes, |c| {
            // Keys are sorted: each histogram is one run of them.
            let side = |s: u64| {
                let group = c as u64 * 2 + s;
                let start = hist.partition_point(|(key, _)| *key < group * SCORE_BINS);
                let end = hist.partition_point(|(key, _)| *key < (group + 1) * SCORE_BINS);
                hist[start..end]
                    .iter()
                    .map(|&(key, count)| (key % SCORE_BINS, count))
                    .collect()
            };
            histogram_auc(side(0), side(1))
        });
        ClinicalMetrics {
            auc,
            balanced_accuracy,
            sensitivity,
            specificity,
        }
    }
}

/// AUC of binned scores (sparse `(bin, count)` lists in increasing bin order): a positive beats
/// the negatives of lower bins and ties (one half) those of its own. `None` when either side is
/// empty.
fn histogram_auc(pos: Vec<(u64, u64)>, neg: Vec<(u64, u64)>) -> Option<f64> {
    let n_pos: f64 = pos.iter().map(|&(_, v)| v as f64).sum();
    let n_neg: f64 = neg.iter().map(|&(_, v)| v as f64).sum();
    if n_pos == 0.0 || n_neg == 0.0 {
        return None;
    }
    let (mut below, mut wins) = (0f64, 0f64);
    let mut negatives = neg.into_iter().peekable();
    for (bin, p) in pos {
        while let Some(&(nb, n)) = negatives.peek()
            && nb < bin
        {
            below += n as f64;
            negatives.next();
        }
        let tied = match negatives.peek() {
            Some(&(nb, n)) if nb == bin => n as f64,
            _ => 0.0,
        };
        wins += p as f64 * (below + 0.5 * tied);
    }
    Some(wins / (n_pos * n_neg))
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

    #[test]
    fn counts_add_up_to_the_pooled_evaluation() {
        // Two sites' probabilities and labels; the sum of their counts gives the pooled set's
        // metrics: rates exactly, AUC within the binning.
        let probs_a = [0.7, 0.2, 0.1, 0.5, 0.4, 0.1, 0.1, 0.8, 0.1];
        let probs_b = [0.2, 0.2, 0.6, 0.1, 0.3, 0.6, 0.3, 0.4, 0.3, 0.05, 0.05, 0.9];
        let (labels_a, labels_b) = ([0u16, 1, 1], [2u16, 2, 2, 0]);
        let mut sum = EvalCounts::from_probs(&probs_a, &labels_a, 3, 1.5, 2);
        let b = EvalCounts::from_probs(&probs_b, &labels_b, 3, 2.0, 2);
        sum.check(3).unwrap();
        b.check(3).unwrap();
        sum.add(&b);
        sum.check(3).unwrap();
        let pooled_probs: Vec<f64> = probs_a.iter().chain(&probs_b).copied().collect();
        let pooled_labels: Vec<u16> = labels_a.iter().chain(&labels_b).copied().collect();
        let exact = clinical_metrics(&pooled_probs, &pooled_labels, 3);
        let counted = sum.clinical();
        assert_eq!(counted.sensitivity, exact.sensitivity);
        assert_eq!(counted.specificity, exact.specificity);
        assert_eq!(counted.balanced_accuracy, exact.balanced_accuracy);
        // These scores are far apart on the log-odds scale: no pair shares a bin but equal ones.
        assert!((counted.auc.unwrap() - exact.auc.unwrap()).abs() < 1e-12);
        assert_eq!((sum.examples, sum.correct), (7, 4));
        assert!((sum.mean_loss() - 3.5 / 7.0).abs() < 1e-15);
    }

    #[test]
    fn histogram_auc_counts_a_shared_bin_as_a_tie() {
        // 0.5 and 0.50001 share a bin (log-odds 0 and 0.00004): a tie, as if equal.
        let probs = [0.5, 0.5, 0.49999, 0.50001, 0.1, 0.9];
        let counts = EvalCounts::from_probs(&probs, &[0, 1, 1], 2, 0.0, 0);
        assert_eq!(counts.clinical().auc, Some(0.75));
        let exact = clinical_metrics(&probs, &[0, 1, 1], 2);
        assert_eq!(exact.auc, Some(1.0));
        assert_eq!(score_bin(0.0), 0);
        assert_eq!(score_bin(1.0), SCORE_BINS - 1);
        assert_eq!(score_bin(f64::NAN), 0);
        assert_eq!(score_bin(0.5), SCORE_BINS / 2);
    }

    #[test]
    fn coarser_histograms_keep_their_counts_and_stay_valid() {
        let probs: Vec<f64> = (0..200)
            .flat_map(|i| {
                let p = 0.2 + 0.003 * i as f64;
                [p, 1.0 - p]
            })
            .collect();
        let labels: Vec<u16> = (0..200).map(|i| u16::from(i % 3 == 0)).collect();
        let fine = EvalCounts::from_probs(&probs, &labels, 2, 1.0, 100);
        let mut coarse = fine.clone();
        coarse.coarsen(6);
        coarse.check(2).unwrap();
        assert!(coarse.score_histograms.len() < fine.score_histograms.len());
        // Fewer, wider bins: more ties, an AUC near the fine one.
        let (a, b) = (fine.clinical().auc.unwrap(), coarse.clinical().auc.unwrap());
        assert!((a - b).abs() < 0.01, "{a} {b}");
    }

    #[test]
    fn inconsistent_counts_are_named() {
        let good = EvalCounts::from_probs(&[0.9, 0.1, 0.2, 0.8], &[0, 1], 2, 0.3, 2);
        good.check(2).unwrap();
        let mut bad = good.clone();
        bad.examples = 3;
        assert!(bad.check(2).unwrap_err().contains("does not add up"));
        let mut bad = good.clone();
        bad.score_histograms[0].1 += 1;
        assert!(bad.check(2).unwrap_err().contains("class 0"));
        let mut bad = good.clone();
        bad.score_histograms.swap(0, 1);
        assert!(bad.check(2).unwrap_err().contains("out of order"));
        let mut bad = good.clone();
        bad.score_histograms[0].1 = 0;
        assert!(bad.check(2).is_err());
        let mut bad = good.clone();
        bad.score_histograms.push((4 * SCORE_BINS, 1));
        assert!(bad.check(2).unwrap_err().contains("out of range"));
        let mut bad = good.clone();
        bad.loss_sum = f64::NAN;
        assert!(bad.check(2).unwrap_err().contains("loss"));
        let mut bad = good.clone();
        bad.correct = 5;
        assert!(bad.check(2).unwrap_err().contains("correct"));
        let mut bad = good.clone();
        bad.confusion[0] = u64::MAX;
        assert!(bad.check(2).is_err());
        // Counts near the top of u64 are refused, and the rates of any counts are computed
        // without overflowing.
        let mut huge = good.clone();
        huge.examples = u64::MAX;
        assert!(huge.check(2).unwrap_err().contains("at most"));
        huge.confusion = vec![u64::MAX, u64::MAX, u64::MAX, 0];
        assert_eq!(huge.clinical().sensitivity[0], Some(0.5));
        assert!(good.check(3).unwrap_err().contains("classes"));
    }
}
