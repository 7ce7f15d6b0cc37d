//! The linear classification head over frozen encoder embeddings, and its training
//! (`safepipe classifier train`).
//!
//! Training is full-batch softmax regression with the paper's recipe: 6-way cross-entropy (not
//! regression), the loss of examples with score > 0 multiplied by `upweight`, Adam with a small
//! L2 penalty. It runs in a fixed order on one thread, so the same data and seed give the same
//! head bit for bit. Metrics are computed on a held-out split.

use super::{ClassifierError, Result};
use serde::Serialize;
use std::path::Path;

/// `logits = weight x + bias`, `weight` row-major `[labels, hidden]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearHead {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub hidden: usize,
}

impl LinearHead {
    pub fn labels(&self) -> usize {
        self.bias.len()
    }

    /// Logits of one embedding (L2-normalised first when `normalize`).
    pub fn apply(&self, x: &[f32], normalize: bool) -> Vec<f32> {
        let scale = if normalize { inverse_norm(x) } else { 1.0 };
        (0..self.labels())
            .map(|k| {
                let row = &self.weight[k * self.hidden..(k + 1) * self.hidden];
                self.bias[k] + scale * row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>()
            })
            .collect()
    }

    /// Reads `classifier.weight` `[labels, hidden]` and `classifier.bias` `[labels]` (F32).
    pub fn load(path: &Path) -> Result<LinearHead> {
        let io = |detail: String| ClassifierError::Io {
            path: path.display().to_string(),
            detail,
        };
        let bytes = std::fs::read(path).map_err(|e| io(e.to_string()))?;
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| io(e.to_string()))?;
        let read = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let view = file.tensor(name).map_err(|_| {
                io(format!(
                    "no tensor {name} (a head has classifier.weight and classifier.bias)"
                ))
            })?;
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(io(format!("{name} is {:?}, expected F32", view.dtype())));
            }
            // `deserialize` checked each tensor's bytes are the product of its shape times 4, so
            // `weight` holds exactly labels x hidden values (what `apply` slices).
            let data = view
                .data()
                .chunks_exact(4)
                // cannot fail: chunks_exact(4) yields 4-byte slices.
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            Ok((view.shape().to_vec(), data))
        };
        let (wshape, weight) = read("classifier.weight")?;
        let (bshape, bias) = read("classifier.bias")?;
        if wshape.len() != 2 || bshape != [wshape[0]] {
            return Err(io(format!(
                "shapes {wshape:?} and {bshape:?} are not [labels, hidden] and [labels]"
            )));
        }
        Ok(LinearHead {
            weight,
            bias,
            hidden: wshape[1],
        })
    }

    /// Writes the head atomically in the layout [`LinearHead::load`] reads.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        crate::train::write_named(
            path,
            vec![
                (
                    "classifier.weight".into(),
                    vec![self.labels(), self.hidden],
                    bytes(&self.weight),
                ),
                ("classifier.bias".into(), vec![self.labels()], bytes(&self.bias)),
            ],
        )
        .map_err(ClassifierError::Runtime)
    }
}

fn inverse_norm(x: &[f32]) -> f32 {
    let n = x.iter().map(|v| v * v).sum::<f32>().sqrt();
    if n > 0.0 { 1.0 / n } else { 1.0 }
}

/// Settings of head training.
#[derive(Clone, Debug, Serialize)]
pub struct HeadTraining {
    pub labels: usize,
    /// Loss weight of examples whose label is not 0 (the paper upweights unsafe examples).
    pub upweight: f32,
    pub epochs: usize,
    pub lr: f32,
    pub l2: f32,
    pub normalize: bool,
}

impl Default for HeadTraining {
    fn default() -> Self {
        HeadTraining {
            labels: 6,
            upweight: 10.0,
            epochs: 300,
            lr: 0.05,
            l2: 1e-4,
            normalize: true,
        }
    }
}

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

/// Fits a head on `(embedding, label)` pairs; returns it with metrics on `(test_x, test_y)`.
pub fn train_head(
    train_x: &[Vec<f32>],
    train_y: &[usize],
    test_x: &[Vec<f32>],
    test_y: &[usize],
    settings: &HeadTraining,
) -> Result<(LinearHead, HeadMetrics)> {
    let Some(hidden) = train_x.first().map(Vec::len) else {
        return Err(ClassifierError::Invalid("no training examples".into()));
    };
    let k = settings.labels;
    if let Some(bad) = train_y.iter().chain(test_y).find(|&&y| y >= k) {
        return Err(ClassifierError::Invalid(format!("label {bad} is out of range 0..{k}")));
    }
    let prep = |x: &Vec<f32>| -> Vec<f32> {
        let s = if settings.normalize { inverse_norm(x) } else { 1.0 };
        x.iter().map(|v| v * s).collect()
    };
    let xs: Vec<Vec<f32>> = train_x.iter().map(prep).collect();
    let sample_weight: Vec<f32> = train_y
        .iter()
        .map(|&y| if y > 0 { settings.upweight } else { 1.0 })
        .collect();
    let total_weight: f32 = sample_weight.iter().sum();
    let mut head = LinearHead {
        weight: vec![0.0; k * hidden],
        bias: vec![0.0; k],
        hidden,
    };
    let n_params = k * hidden + k;
    let (mut m, mut v) = (vec![0.0f32; n_params], vec![0.0f32; n_params]);
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let mut final_loss = 0.0;
    for epoch in 1..=settings.epochs {
        let mut grad = vec![0.0f32; n_params];
        let mut loss = 0.0f64;
        for ((x, &y), &w) in xs.iter().zip(train_y).zip(&sample_weight) {
            let p = super::softmax(&head.apply(x, false));
            loss += -(p[y].max(1e-12) as f64).ln() * w as f64;
            for c in 0..k {
                let g = (p[c] - if c == y { 1.0 } else { 0.0 }) * w / total_weight;
                for (gw, xv) in grad[c * hidden..(c + 1) * hidden].iter_mut().zip(x) {
                    *gw += g * xv;
                }
                grad[k * hidden + c] += g;
            }
        }
        final_loss = loss / total_weight as f64;
        let (c1, c2) = (1.0 - b1.powi(epoch as i32), 1.0 - b2.powi(epoch as i32));
        for i in 0..n_params {
            let param = if i < k * hidden {
                head.weight[i]
            } else {
                head.bias[i - k * hidden]
            };
            let g = grad[i] + if i < k * hidden { settings.l2 * param } else { 0.0 };
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let step = settings.lr * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
            if i < k * hidden {
                head.weight[i] -= step;
            } else {
                head.bias[i - k * hidden] -= step;
            }
        }
    }
    let metrics = evaluate(&head, settings.normalize, test_x, test_y, final_loss);
    Ok((head, metrics))
}

/// Held-out metrics of `head` on `(xs, ys)`.
pub fn evaluate(head: &LinearHead, normalize: bool, xs: &[Vec<f32>], ys: &[usize], final_loss: f64) -> HeadMetrics {
    let k = head.labels();
    let mut confusion = vec![vec![0usize; k]; k];
    let (mut top1, mut top3) = (0usize, 0usize);
    for (x, &y) in xs.iter().zip(ys) {
        let logits = head.apply(x, normalize);
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
    use crate::rng::Normal;

    #[test]
    fn recall_at_k_counts_examples_at_or_above_each_threshold() {
        // Rows: true label 0..2; columns: predicted.
        let confusion = vec![vec![5, 1, 0], vec![2, 3, 1], vec![0, 1, 3]];
        // k = 1: true >= 1 are 10 examples, 8 of them predicted >= 1; k = 2: 4 true, 3 predicted.
        assert_eq!(recall_at_k(&confusion), vec![0.8, 0.75]);
        assert_eq!(recall_at_k(&[vec![4, 0], vec![0, 0]]), vec![0.0]);
    }

    #[test]
    fn learns_separable_clusters_and_round_trips() {
        // Three labels around three centres in 8 dimensions.
        let mut rng = Normal::new(7);
        let mut sample = |n: usize| {
            let mut xs = Vec::new();
            let mut ys = Vec::new();
            for i in 0..n {
                let y = i % 3;
                let x: Vec<f32> = (0..8)
                    .map(|d| if d == y { 3.0 } else { 0.0 } + ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5))
                    .collect();
                xs.push(x);
                ys.push(y);
            }
            (xs, ys)
        };
        let (tx, ty) = sample(300);
        let (vx, vy) = sample(90);
        let settings = HeadTraining {
            labels: 3,
            upweight: 2.0,
            epochs: 200,
            ..Default::default()
        };
        let (head, metrics) = train_head(&tx, &ty, &vx, &vy, &settings).unwrap();
        assert!(metrics.top1_accuracy > 0.95, "{metrics:?}");
        assert_eq!(metrics.top3_accuracy, 1.0);
        assert_eq!(metrics.recall_at_k.len(), 2);
        assert!(metrics.recall_at_k.iter().all(|r| *r > 0.9), "{metrics:?}");
        assert!(metrics.macro_f1 > 0.95);
        let again = train_head(&tx, &ty, &vx, &vy, &settings).unwrap().0;
        assert_eq!(head, again, "training is deterministic");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head.safetensors");
        head.save(&path).unwrap();
        assert_eq!(LinearHead::load(&path).unwrap(), head);
    }
}
