//! The classification head over frozen encoder embeddings, and its training
//! (`safepipe classifier train`).
//!
//! A head is one dense layer (`logits = W x + b`) or, with a hidden layer, two
//! (`logits = W2 relu(W1 x + b1) + b2`): mean-pooled MiniLM embeddings of mails and requests are
//! not linearly separable enough for a demo filter (docs/classifier.md has the figures).
//!
//! Training follows the paper's recipe where it applies: 6-way cross-entropy (not regression),
//! the loss of examples with score > 0 multiplied by `upweight`; minibatch Adam with a small L2
//! penalty on the weights, a seeded initialisation and a seeded example order. The matrix
//! products run on the CPU backend's blocked GEMM, which cuts work into fixed blocks, so the same
//! data and settings give the same head bit for bit on any number of threads.

use super::{ClassifierError, Result};
use crate::llama::gemm::{Kernels, linear, linear_grad_input, linear_grad_weight};
use crate::rng::Normal;
use serde::Serialize;
use std::path::Path;

/// One dense layer: `y = weight x + bias`, `weight` row-major `[outputs, inputs]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub inputs: usize,
}

impl Dense {
    pub fn outputs(&self) -> usize {
        self.bias.len()
    }

    fn apply(&self, x: &[f32], scale: f32) -> Vec<f32> {
        (0..self.outputs())
            .map(|k| {
                let row = &self.weight[k * self.inputs..(k + 1) * self.inputs];
                self.bias[k] + scale * row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>()
            })
            .collect()
    }

    /// `y = x W^T + b` for a batch `x: [n, inputs]`.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = linear(Kernels::Blocked, x, &self.weight, self.inputs, self.outputs());
        for row in y.chunks_exact_mut(self.outputs()) {
            row.iter_mut().zip(&self.bias).for_each(|(v, b)| *v += b);
        }
        y
    }
}

/// A classification head: an optional hidden layer (ReLU) and the output layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Head {
    pub hidden: Option<Dense>,
    pub output: Dense,
}

impl Head {
    pub fn labels(&self) -> usize {
        self.output.outputs()
    }

    /// The embedding width the head takes.
    pub fn input_width(&self) -> usize {
        self.hidden.as_ref().unwrap_or(&self.output).inputs
    }

    /// Logits of one embedding (L2-normalised first when `normalize`).
    pub fn apply(&self, x: &[f32], normalize: bool) -> Vec<f32> {
        let scale = if normalize { inverse_norm(x) } else { 1.0 };
        match &self.hidden {
            None => self.output.apply(x, scale),
            Some(hidden) => {
                let h: Vec<f32> = hidden.apply(x, scale).into_iter().map(|v| v.max(0.0)).collect();
                self.output.apply(&h, 1.0)
            }
        }
    }

    /// One head whose logits are the mean of `heads`' logits (a bagged ensemble): linear heads
    /// average their weights; heads with hidden layers stack them (the units of every head side by
    /// side) under an output layer of averaged, concatenated weights. `None` when the heads'
    /// shapes differ or there are none.
    pub fn average(heads: &[Head]) -> Option<Head> {
        let first = heads.first()?;
        let n = heads.len() as f32;
        let same = |a: &Dense, b: &Dense| a.inputs == b.inputs && a.outputs() == b.outputs();
        let mean = |pick: &dyn Fn(&Head) -> &[f32]| -> Vec<f32> {
            let mut out = vec![0.0f32; pick(first).len()];
            for h in heads {
                out.iter_mut().zip(pick(h)).for_each(|(o, v)| *o += v / n);
            }
            out
        };
        for h in heads {
            let hidden_same = match (&h.hidden, &first.hidden) {
                (None, None) => true,
                (Some(a), Some(b)) => same(a, b),
                _ => false,
            };
            if !hidden_same || !same(&h.output, &first.output) {
                return None;
            }
        }
        let output_bias = mean(&|h: &Head| h.output.bias.as_slice());
        let Some(hidden) = &first.hidden else {
            return Some(Head {
                hidden: None,
                output: Dense {
                    weight: mean(&|h: &Head| h.output.weight.as_slice()),
                    bias: output_bias,
                    inputs: first.output.inputs,
                },
            });
        };
        let (units, labels) = (hidden.outputs(), first.labels());
        let stacked = Dense {
            weight: heads
                .iter()
                .flat_map(|h| h.hidden.as_ref().map_or(&[][..], |d| &d.weight))
                .copied()
                .collect(),
            bias: heads
                .iter()
                .flat_map(|h| h.hidden.as_ref().map_or(&[][..], |d| &d.bias))
                .copied()
                .collect(),
            inputs: hidden.inputs,
        };
        // Output row k: head 0's row k / n, then head 1's, ...
        let weight = (0..labels)
            .flat_map(|k| {
                heads
                    .iter()
                    .flat_map(move |h| h.output.weight[k * units..(k + 1) * units].iter().map(move |w| w / n))
            })
            .collect();
        Some(Head {
            hidden: Some(stacked),
            output: Dense {
                weight,
                bias: output_bias,
                inputs: units * heads.len(),
            },
        })
    }

    /// Reads `classifier.weight` `[labels, width]` and `classifier.bias` `[labels]`, and when
    /// present the hidden layer `hidden.weight` `[width, embedding]` and `hidden.bias` (F32).
    pub fn load(path: &Path) -> Result<Head> {
        let io = |detail: String| ClassifierError::Io {
            path: path.display().to_string(),
            detail,
        };
        let bytes = std::fs::read(path).map_err(|e| io(e.to_string()))?;
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| io(e.to_string()))?;
        let layer = |prefix: &str| -> Result<Option<Dense>> {
            let read = |name: &str| -> Result<Option<(Vec<usize>, Vec<f32>)>> {
                let Ok(view) = file.tensor(name) else {
                    return Ok(None);
                };
                if view.dtype() != safetensors::Dtype::F32 {
                    return Err(io(format!("{name} is {:?}, expected F32", view.dtype())));
                }
                // `deserialize` checked each tensor's bytes are the product of its shape times
                // 4, so `weight` holds exactly outputs x inputs values (what `apply` slices).
                let data = view
                    .data()
                    .chunks_exact(4)
                    // cannot fail: chunks_exact(4) yields 4-byte slices.
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect();
                Ok(Some((view.shape().to_vec(), data)))
            };
            let (weight, bias) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
            match (read(&weight)?, read(&bias)?) {
                (None, None) => Ok(None),
                (Some((wshape, weight)), Some((bshape, bias))) if wshape.len() == 2 && bshape == [wshape[0]] => {
                    Ok(Some(Dense {
                        weight,
                        bias,
                        inputs: wshape[1],
                    }))
                }
                (Some((wshape, _)), Some((bshape, _))) => Err(io(format!(
                    "{prefix}: shapes {wshape:?} and {bshape:?} are not [outputs, inputs] and [outputs]"
                ))),
                _ => Err(io(format!("{prefix}: a layer needs both {weight} and {bias}"))),
            }
        };
        let output = layer("classifier")?
            .ok_or_else(|| io("no classifier.weight and classifier.bias (the head's output layer)".into()))?;
        let hidden = layer("hidden")?;
        if let Some(h) = &hidden
            && h.outputs() != output.inputs
        {
            return Err(io(format!(
                "hidden.weight has {} outputs but classifier.weight takes {} inputs",
                h.outputs(),
                output.inputs
            )));
        }
        Ok(Head { hidden, output })
    }

    /// Writes the head atomically in the layout [`Head::load`] reads.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut tensors = Vec::new();
        for (prefix, layer) in [("hidden", self.hidden.as_ref()), ("classifier", Some(&self.output))] {
            if let Some(l) = layer {
                tensors.push((
                    format!("{prefix}.weight"),
                    vec![l.outputs(), l.inputs],
                    bytes(&l.weight),
                ));
                tensors.push((format!("{prefix}.bias"), vec![l.outputs()], bytes(&l.bias)));
            }
        }
        crate::train::write_named(path, tensors).map_err(ClassifierError::Runtime)
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
    /// Units of the hidden layer (0: a linear head).
    pub hidden: usize,
    /// Loss weight of examples whose label is not 0 (the paper upweights unsafe examples).
    pub upweight: f32,
    pub epochs: usize,
    /// Examples per Adam step.
    pub batch: usize,
    pub lr: f32,
    /// L2 penalty on the weights (not the biases).
    pub l2: f32,
    pub normalize: bool,
    /// Seeds the initial weights and the order of examples.
    pub seed: u64,
}

impl Default for HeadTraining {
    fn default() -> Self {
        HeadTraining {
            labels: 6,
            hidden: 512,
            upweight: 3.0,
            epochs: 30,
            batch: 200,
            lr: 1e-3,
            l2: 1e-4,
            normalize: true,
            seed: 0,
        }
    }
}

/// A layer with seeded normal weights (standard deviation `sqrt(2 / inputs)`) and zero biases.
fn init_layer(rng: &mut Normal, inputs: usize, outputs: usize) -> Dense {
    let std = (2.0 / inputs as f64).sqrt();
    Dense {
        weight: (0..inputs * outputs).map(|_| (rng.sample() * std) as f32).collect(),
        bias: vec![0.0; outputs],
        inputs,
    }
}

/// Adam's moments for one layer's weights and biases.
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

/// One Adam step on `params` with gradient `grad` (plus `l2 x param` when `decay`).
fn adam(params: &mut [f32], grad: &[f32], state: &mut Moments, lr: f32, l2: f32, step: i32) {
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let (c1, c2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
    for i in 0..params.len() {
        let g = grad[i] + l2 * params[i];
        state.m[i] = b1 * state.m[i] + (1.0 - b1) * g;
        state.v[i] = b2 * state.v[i] + (1.0 - b2) * g * g;
        params[i] -= lr * (state.m[i] / c1) / ((state.v[i] / c2).sqrt() + eps);
    }
}

/// Fits a head on `(embedding, label)` pairs; returns it with the weighted training loss of the
/// last epoch (each batch's loss computed before its update). Deterministic: the same pairs and
/// settings give the same head bit for bit, on any number of threads.
pub fn train_head<X: AsRef<[f32]>>(xs: &[X], ys: &[usize], settings: &HeadTraining) -> Result<(Head, f64)> {
    let Some(width) = xs.first().map(|x| x.as_ref().len()) else {
        return Err(ClassifierError::Invalid("no training examples".into()));
    };
    let k = settings.labels;
    if let Some(bad) = ys.iter().find(|&&y| y >= k) {
        return Err(ClassifierError::Invalid(format!("label {bad} is out of range 0..{k}")));
    }
    if let Some(x) = xs.iter().map(AsRef::as_ref).find(|x| x.len() != width) {
        return Err(ClassifierError::Invalid(format!(
            "embeddings of {} and {width} dimensions in one training set",
            x.len()
        )));
    }
    if xs.len() != ys.len() || settings.batch == 0 {
        return Err(ClassifierError::Invalid(format!(
            "{} embeddings, {} labels, batch {}",
            xs.len(),
            ys.len(),
            settings.batch
        )));
    }
    // One contiguous, normalised copy: batches are gathered from it.
    let xs: Vec<f32> = xs
        .iter()
        .map(AsRef::as_ref)
        .flat_map(|x| {
            let s = if settings.normalize { inverse_norm(x) } else { 1.0 };
            x.iter().map(move |v| v * s)
        })
        .collect();
    let mut rng = Normal::new(settings.seed);
    let mut head = match settings.hidden {
        0 => Head {
            hidden: None,
            output: init_layer(&mut rng, width, k),
        },
        h => Head {
            hidden: Some(init_layer(&mut rng, width, h)),
            output: init_layer(&mut rng, h, k),
        },
    };
    let moments = |l: &Dense| {
        (
            Moments {
                m: vec![0.0; l.weight.len()],
                v: vec![0.0; l.weight.len()],
            },
            Moments {
                m: vec![0.0; l.bias.len()],
                v: vec![0.0; l.bias.len()],
            },
        )
    };
    let mut hidden_state = head.hidden.as_ref().map(moments);
    let mut output_state = moments(&head.output);
    let mut order: Vec<usize> = (0..ys.len()).collect();
    let (mut step, mut final_loss) = (0i32, 0.0f64);
    for _ in 0..settings.epochs {
        // A seeded Fisher-Yates shuffle per epoch.
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let (mut epoch_loss, mut epoch_weight) = (0.0f64, 0.0f64);
        for batch in order.chunks(settings.batch) {
            let x: Vec<f32> = batch
                .iter()
                .flat_map(|&i| &xs[i * width..(i + 1) * width])
                .copied()
                .collect();
            let weights: Vec<f32> = batch
                .iter()
                .map(|&i| if ys[i] > 0 { settings.upweight } else { 1.0 })
                .collect();
            let total: f32 = weights.iter().sum();
            // Forward.
            let pre = head.hidden.as_ref().map(|h| h.forward(&x));
            let act: Option<Vec<f32>> = pre.as_ref().map(|z| z.iter().map(|v| v.max(0.0)).collect());
            let features = act.as_deref().unwrap_or(&x);
            let logits = head.output.forward(features);
            // Softmax cross-entropy: dlogits = (p - onehot) w / total.
            let mut dlogits = Vec::with_capacity(logits.len());
            for ((row, &i), &w) in logits.chunks_exact(k).zip(batch).zip(&weights) {
                let p = super::softmax(row);
                epoch_loss += -(p[ys[i]].max(1e-12) as f64).ln() * w as f64;
                dlogits.extend(
                    p.iter()
                        .enumerate()
                        .map(|(c, pc)| (pc - if c == ys[i] { 1.0 } else { 0.0 }) * w / total),
                );
            }
            epoch_weight += total as f64;
            step += 1;
            // Backward through the output layer, then the hidden layer.
            let inputs = head.output.inputs;
            let mut dw = vec![0.0f32; head.output.weight.len()];
            linear_grad_weight(Kernels::Blocked, &dlogits, features, &mut dw, inputs, k);
            let db = column_sums(&dlogits, k);
            let dfeatures = head
                .hidden
                .as_ref()
                .map(|_| linear_grad_input(Kernels::Blocked, &dlogits, &head.output.weight, inputs, k));
            adam(
                &mut head.output.weight,
                &dw,
                &mut output_state.0,
                settings.lr,
                settings.l2,
                step,
            );
            adam(&mut head.output.bias, &db, &mut output_state.1, settings.lr, 0.0, step);
            if let (Some(hidden), Some(state), Some(pre), Some(mut dz)) =
                (head.hidden.as_mut(), hidden_state.as_mut(), pre.as_ref(), dfeatures)
            {
                dz.iter_mut().zip(pre).for_each(|(d, z)| {
                    if *z <= 0.0 {
                        *d = 0.0;
                    }
                });
                let units = hidden.outputs();
                let mut dw = vec![0.0f32; hidden.weight.len()];
                linear_grad_weight(Kernels::Blocked, &dz, &x, &mut dw, width, units);
                let db = column_sums(&dz, units);
                adam(&mut hidden.weight, &dw, &mut state.0, settings.lr, settings.l2, step);
                adam(&mut hidden.bias, &db, &mut state.1, settings.lr, 0.0, step);
            }
        }
        final_loss = epoch_loss / epoch_weight.max(f64::MIN_POSITIVE);
    }
    Ok((head, final_loss))
}

/// Sums of each column of a row-major `[n, columns]` matrix, rows added in order.
fn column_sums(m: &[f32], columns: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; columns];
    for row in m.chunks_exact(columns) {
        out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::evaluate;
    use super::*;
    use crate::rng::Normal;

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
        let (tx, ty) = sample(1300);
        let (vx, vy) = sample(90);
        // A linear head and one with a hidden layer; batches of 200 on 1300 examples.
        for hidden in [0, 16] {
            let settings = HeadTraining {
                labels: 3,
                hidden,
                upweight: 2.0,
                epochs: 60,
                lr: 0.01,
                ..Default::default()
            };
            fits_and_round_trips(&tx, &ty, &vx, &vy, &settings);
        }
    }

    fn fits_and_round_trips(tx: &[Vec<f32>], ty: &[usize], vx: &[Vec<f32>], vy: &[usize], settings: &HeadTraining) {
        let (head, loss) = train_head(tx, ty, settings).unwrap();
        assert_eq!(head.hidden.is_some(), settings.hidden > 0);
        assert_eq!((head.input_width(), head.labels()), (8, 3));
        let metrics = evaluate(&head, settings.normalize, vx, vy, loss);
        assert!(metrics.top1_accuracy > 0.95, "{metrics:?}");
        assert_eq!(metrics.top3_accuracy, 1.0);
        assert_eq!(metrics.recall_at_k.len(), 2);
        assert!(metrics.recall_at_k.iter().all(|r| *r > 0.9), "{metrics:?}");
        assert!(metrics.macro_f1 > 0.95);
        let again = train_head(tx, ty, settings).unwrap().0;
        assert_eq!(head, again, "training is deterministic");
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let serial = one_thread.install(|| train_head(tx, ty, settings).unwrap().0);
        assert_eq!(head, serial, "the head does not depend on the number of threads");
        // The average of two heads gives the mean of their logits.
        let other = train_head(
            tx,
            ty,
            &HeadTraining {
                seed: 1,
                ..settings.clone()
            },
        )
        .unwrap()
        .0;
        let mean = Head::average(&[head.clone(), other.clone()]).unwrap();
        for x in vx.iter().take(5) {
            let (a, b, m) = (head.apply(x, true), other.apply(x, true), mean.apply(x, true));
            for i in 0..3 {
                assert!((m[i] - (a[i] + b[i]) / 2.0).abs() < 1e-4, "{m:?} {a:?} {b:?}");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head.safetensors");
        head.save(&path).unwrap();
        assert_eq!(Head::load(&path).unwrap(), head);
    }
}
