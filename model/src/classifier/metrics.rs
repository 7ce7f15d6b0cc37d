//! Held-out metrics of a classification head: per-label precision and recall, macro F1,
//! top-1 / top-3 accuracy, the paper's recall@k and the unsafe (label > 0) decision.

use super::head::Head;
use serde::Serialize;

/// Held-out metrics of a head.
#[derive(Clone, Debug, Serialize)]
pub struct HeadMetrics {
    pub examples: usize,
    /// Per label: (precision, recall, support).
    pub per_label: Vec<(f64, f64, usize)>,
    /// Mean F1 over the labels that have held-out examples (labels without any are left out,
    /// unlike scikit-learn's default).
    pub macro_f1: f64,
    /// Top-1 accuracy: the fraction of examples whose true label is the most probable one.
    pub top1_accuracy: f64,
    /// Top-3 accuracy: the true label is among the 3 most probable.
    pub top3_accuracy: f64,
    /// The paper's recall@k for k = 1, 2, ... (index 0 is k = 1): of the examples whose true
    /// score is at least k, the fraction predicted (most probable label) at least k; 0 where
    /// no held-out example reaches k.
    pub recall_at_k: Vec<f64>,
    /// Unsafe (label > 0) vs safe as a binary decision: precision and recall of "unsafe".
    pub unsafe_precision: f64,
    pub unsafe_recall: f64,
    /// Weighted training loss of the last epoch (computed before its update).
    pub final_loss: f64,
}

/// Held-out metrics of `head` on `(xs, ys)`.
pub fn evaluate<X: AsRef<[f32]>>(head: &Head, normalize: bool, xs: &[X], ys: &[usize], final_loss: f64) -> HeadMetrics {
    let k = head.labels();
    let mut confusion = vec![vec![0usize; k]; k];
    let (mut top1, mut top3) = (0usize, 0usize);
    for (x, &y) in xs.iter().zip(ys) {
        let logits = head.apply(x.as_ref(), normalize);
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        confusion[y][order[0]] += 1;
        top1 += usize::from(order[0] == y);
        top3 += usize::from(order.iter().take(3).any(|&c| c == y));
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let mut per_label = Vec::new();
    let (mut f1_sum, mut with_support) = (0.0, 0);
    for (c, row) in confusion.iter().enumerate() {
        let tp = row[c];
        let predicted: usize = confusion.iter().map(|r| r[c]).sum();
        let support: usize = row.iter().sum();
        let (p, r) = (ratio(tp, predicted), ratio(tp, support));
        if support > 0 {
            with_support += 1;
            f1_sum += if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 };
        }
        per_label.push((p, r, support));
    }
    let recall_at_k = recall_at_k(&confusion);
    let unsafe_tp: usize = (1..k).map(|r| (1..k).map(|c| confusion[r][c]).sum::<usize>()).sum();
    let predicted_unsafe: usize = (0..k).map(|r| (1..k).map(|c| confusion[r][c]).sum::<usize>()).sum();
    let actual_unsafe: usize = (1..k).map(|r| confusion[r].iter().sum::<usize>()).sum();
    HeadMetrics {
        examples: ys.len(),
        per_label,
        macro_f1: if with_support == 0 {
            0.0
        } else {
            f1_sum / with_support as f64
        },
        top1_accuracy: ratio(top1, ys.len()),
        top3_accuracy: ratio(top3, ys.len()),
        recall_at_k,
        unsafe_precision: ratio(unsafe_tp, predicted_unsafe),
        unsafe_recall: ratio(unsafe_tp, actual_unsafe),
        final_loss,
    }
}

/// The paper's recall@k for k = 1..labels-1 from a confusion matrix (`confusion[true][predicted]`):
/// of the examples whose true label is at least k, the fraction predicted at least k.
fn recall_at_k(confusion: &[Vec<usize>]) -> Vec<f64> {
    let k = confusion.len();
    (1..k)
        .map(|t| {
            let hit: usize = (t..k).map(|r| confusion[r][t..].iter().sum::<usize>()).sum();
            let actual: usize = (t..k).map(|r| confusion[r].iter().sum::<usize>()).sum();
            if actual == 0 { 0.0 } else { hit as f64 / actual as f64 }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_at_k_counts_examples_at_or_above_each_threshold() {
        // Rows: true label 0..2; columns: predicted.
        let confusion = vec![vec![5, 1, 0], vec![2, 3, 1], vec![0, 1, 3]];
        // k = 1: true >= 1 are 10 examples, 8 of them predicted >= 1; k = 2: 4 true, 3 predicted.
        assert_eq!(recall_at_k(&confusion), vec![0.8, 0.75]);
        assert_eq!(recall_at_k(&[vec![4, 0], vec![0, 0]]), vec![0.0]);
    }
}
