//! Reverse-mode autograd on a tape.
//!
//! A recording tape gives every value that depends on a trainable input an id and, for every op
//! that produced one, pushes a node: the ids of its inputs and a closure that maps the gradient
//! of the output to gradients of the inputs. `backward` walks the nodes in reverse, accumulates
//! gradients per id, frees each as soon as it has been used, and adds the gradients of
//! parameters into their views of the model's flat gradient buffer.
//!
//! An inference tape records nothing: ops compute their forward value and return a `Var`
//! without an id, so nothing is kept alive beyond the values the caller holds (teachers).

use std::cell::RefCell;
use std::collections::HashMap;

use crate::{Error, Result, Tensor};

/// Maps the gradient of an op's output to the gradients of its inputs. The slice says which
/// inputs need a gradient, so an op can skip work (the gradient of an input image, of labels);
/// an entry is `None` when not needed.
pub type BackwardFn = Box<dyn FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send>;

/// Called by [`Tape::backward_hooked`] with a parameter's gradient (its view of the flat
/// gradient buffer) as soon as backward has added the last contribution to it: a data-parallel
/// trainer starts reducing a bucket of the buffer once every parameter in it is final.
pub type GradReadyHook<'a> = &'a mut dyn FnMut(&Tensor) -> Result<()>;

/// A value in a computation: a tensor, and its id on the tape when it needs a gradient.
#[derive(Clone, Debug)]
pub struct Var {
    tensor: Tensor,
    id: Option<usize>,
}

impl Var {
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    pub fn into_tensor(self) -> Tensor {
        self.tensor
    }

    pub fn shape(&self) -> &[usize] {
        self.tensor.shape()
    }

    pub fn requires_grad(&self) -> bool {
        self.id.is_some()
    }

    pub fn id(&self) -> Option<usize> {
        self.id
    }
}

struct Node {
    output: usize,
    inputs: Vec<Option<usize>>,
    backward: BackwardFn,
}

#[derive(Default)]
struct TapeState {
    next_id: usize,
    nodes: Vec<Node>,
    /// Parameter leaves: id -> the view of the flat gradient buffer their gradient is added to.
    param_grads: HashMap<usize, Tensor>,
    /// Watched leaves whose gradients `backward` returns (tests, gradient checks).
    watched: Vec<usize>,
    done: bool,
}

pub struct Tape {
    recording: bool,
    state: RefCell<TapeState>,
}

/// Gradients of watched values, returned by `backward`.
#[derive(Debug, Default)]
pub struct Gradients {
    by_id: HashMap<usize, Tensor>,
}

impl Gradients {
    /// The gradient of a watched `var`; `None` when the output did not depend on it.
    pub fn get(&self, var: &Var) -> Option<&Tensor> {
        var.id.and_then(|id| self.by_id.get(&id))
    }
}

impl Tape {
    /// A tape that records what backward needs.
    pub fn recording() -> Tape {
        Tape {
            recording: true,
            state: RefCell::new(TapeState::default()),
        }
    }

    /// A tape that records nothing and keeps nothing (frozen teachers, evaluation).
    pub fn inference() -> Tape {
        Tape {
            recording: false,
            state: RefCell::new(TapeState::default()),
        }
    }

    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// Number of recorded nodes (zero on an inference tape).
    pub fn len(&self) -> usize {
        self.state.borrow().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn fresh_id(&self) -> usize {
        let mut s = self.state.borrow_mut();
        let id = s.next_id;
        s.next_id += 1;
        id
    }

    /// A value that needs no gradient (data, labels, frozen weights).
    pub fn constant(&self, tensor: Tensor) -> Var {
        Var { tensor, id: None }
    }

    /// A trainable parameter: its gradient is added into `grad` (a view of the flat gradient
    /// buffer, same shape, f32). On an inference tape this is a constant.
    pub fn param(&self, value: Tensor, grad: Tensor) -> Result<Var> {
        if !self.recording {
            return Ok(self.constant(value));
        }
        crate::error::check_same_shape("Tape::param", value.shape(), grad.shape())?;
        grad.expect_dtype("Tape::param (gradient buffer)", crate::DType::F32)?;
        let id = self.fresh_id();
        self.state.borrow_mut().param_grads.insert(id, grad);
        Ok(Var {
            tensor: value,
            id: Some(id),
        })
    }

    /// A leaf whose gradient `backward` returns in `Gradients` (tests, gradient checks).
    pub fn watch(&self, tensor: Tensor) -> Var {
        if !self.recording {
            return self.constant(tensor);
        }
        let id = self.fresh_id();
        self.state.borrow_mut().watched.push(id);
        Var {
            tensor,
            id: Some(id),
        }
    }

    /// Wraps the output of an op. When recording and some input needs a gradient, the node is
    /// kept with `backward`; otherwise `backward` is dropped unused.
    pub fn record(&self, output: Tensor, inputs: &[&Var], backward: BackwardFn) -> Var {
        if !self.recording || inputs.iter().all(|v| v.id.is_none()) {
            return Var {
                tensor: output,
                id: None,
            };
        }
        let id = self.fresh_id();
        self.state.borrow_mut().nodes.push(Node {
            output: id,
            inputs: inputs.iter().map(|v| v.id).collect(),
            backward,
        });
        Var {
            tensor: output,
            id: Some(id),
        }
    }

    /// Backpropagates from a scalar `loss` (seed gradient 1).
    pub fn backward(&self, loss: &Var) -> Result<Gradients> {
        if loss.tensor.elem_count() != 1 {
            return Err(Error::Autograd(format!(
                "backward needs a scalar loss, got shape {:?}; use backward_with to seed a gradient",
                loss.shape()
            )));
        }
        let seed = Tensor::ones(loss.shape(), crate::DType::F32, loss.tensor.device())?;
        self.backward_with(loss, seed)
    }

    /// [`Tape::backward`], calling `ready` with each parameter's gradient view once it is
    /// final: right after the node of the parameter's first use in the forward (the last one
    /// backward reaches) has run. Views shared by several parameter leaves (tied weights) are
    /// reported once, after the last of them; parameters the loss does not depend on are
    /// reported at the end, unchanged.
    pub fn backward_hooked(&self, loss: &Var, ready: GradReadyHook<'_>) -> Result<Gradients> {
        if loss.tensor.elem_count() != 1 {
            return Err(Error::Autograd(format!(
                "backward needs a scalar loss, got shape {:?}",
                loss.shape()
            )));
        }
        let seed = Tensor::ones(loss.shape(), crate::DType::F32, loss.tensor.device())?;
        self.walk(loss, seed, Some(ready))
    }

    /// Backpropagates `grad` (the gradient of some scalar with respect to `output`).
    /// A tape can be walked once: the nodes are consumed so their saved values are freed.
    pub fn backward_with(&self, output: &Var, grad: Tensor) -> Result<Gradients> {
        self.walk(output, grad, None)
    }

    fn walk(
        &self,
        output: &Var,
        grad: Tensor,
        mut ready: Option<GradReadyHook<'_>>,
    ) -> Result<Gradients> {
        if !self.recording {
            return Err(Error::Autograd(
                "backward on an inference tape: nothing was recorded; use Tape::recording()".into(),
            ));
        }
        crate::error::check_same_shape("backward_with", output.shape(), grad.shape())?;
        let Some(root) = output.id else {
            return Err(Error::Autograd(
                "the output does not depend on any parameter or watched value".into(),
            ));
        };
        let (nodes, param_grads, watched) = {
            let mut s = self.state.borrow_mut();
            if s.done {
                return Err(Error::Autograd(
                    "backward was already run on this tape; record a new one per step".into(),
                ));
            }
            s.done = true;
            (
                std::mem::take(&mut s.nodes),
                std::mem::take(&mut s.param_grads),
                std::mem::take(&mut s.watched),
            )
        };

        let mut finals = ready
            .is_some()
            .then(|| FinalGrads::new(&nodes, &param_grads));
        let mut report = |i: usize, param_grads: &HashMap<usize, Tensor>| -> Result<()> {
            match (finals.as_mut(), ready.as_mut()) {
                (Some(f), Some(hook)) => f.node_done(i, param_grads, hook),
                _ => Ok(()),
            }
        };

        let mut grads: HashMap<usize, Tensor> = HashMap::new();
        grads.insert(root, grad);
        for (i, node) in nodes.into_iter().enumerate().rev() {
            let Some(g) = grads.remove(&node.output) else {
                // This node does not lead to the output; a parameter first used here may
                // still be final.
                report(i, &param_grads)?;
                continue;
            };
            let needs: Vec<bool> = node.inputs.iter().map(|i| i.is_some()).collect();
            let input_grads = (node.backward)(&g, &needs)?;
            if input_grads.len() != node.inputs.len() {
                return Err(Error::Autograd(format!(
                    "an op returned {} input gradients for {} inputs",
                    input_grads.len(),
                    node.inputs.len()
                )));
            }
            for (input, ig) in node.inputs.iter().zip(input_grads) {
                let (Some(id), Some(ig)) = (input, ig) else {
                    continue;
                };
                if let Some(dst) = param_grads.get(id) {
                    dst.add_assign(&ig.reshape(dst.shape())?)?;
                } else if let Some(acc) = grads.get(id) {
                    // Accumulate into a private f32 buffer: `acc` may share storage with a
                    // value the forward pass still holds (and on a GPU a gradient may be bf16).
                    let sum = acc.sum_f32(&ig)?;
                    grads.insert(*id, sum);
                } else {
                    grads.insert(*id, ig);
                }
            }
            report(i, &param_grads)?;
        }
        // A parameter used directly as the output (rare): its seed gradient is still in `grads`.
        for (id, dst) in &param_grads {
            if let Some(g) = grads.remove(id) {
                dst.add_assign(&g.reshape(dst.shape())?)?;
            }
        }
        // Leaves no node used: final as they are.
        if let (Some(f), Some(hook)) = (finals.as_mut(), ready.as_mut()) {
            f.unused(&param_grads, hook)?;
        }
        let by_id = watched
            .into_iter()
            .filter_map(|id| grads.remove(&id).map(|g| (id, g)))
            .collect();
        Ok(Gradients { by_id })
    }
}

/// Which parameter gradients are final after each node of a backward walk.
struct FinalGrads {
    /// Node index -> the parameter leaves first used there (final once it has run).
    first_use: HashMap<usize, Vec<usize>>,
    /// Leaves no node uses.
    unused: Vec<usize>,
    /// Leaves not yet final per gradient view (tied weights share one).
    left: HashMap<(usize, usize), usize>,
}

impl FinalGrads {
    fn new(nodes: &[Node], param_grads: &HashMap<usize, Tensor>) -> FinalGrads {
        let mut first_use: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for (i, node) in nodes.iter().enumerate() {
            for id in node.inputs.iter().flatten() {
                if param_grads.contains_key(id) && seen.insert(*id) {
                    first_use.entry(i).or_default().push(*id);
                }
            }
        }
        let mut unused: Vec<usize> = param_grads
            .keys()
            .filter(|id| !seen.contains(id))
            .copied()
            .collect();
        unused.sort_unstable();
        let mut left = HashMap::new();
        for dst in param_grads.values() {
            *left.entry(view_key(dst)).or_default() += 1;
        }
        FinalGrads {
            first_use,
            unused,
            left,
        }
    }

    fn node_done(
        &mut self,
        node: usize,
        param_grads: &HashMap<usize, Tensor>,
        hook: &mut GradReadyHook<'_>,
    ) -> Result<()> {
        for id in self.first_use.remove(&node).unwrap_or_default() {
            self.leaf_final(id, param_grads, hook)?;
        }
        Ok(())
    }

    fn unused(
        &mut self,
        param_grads: &HashMap<usize, Tensor>,
        hook: &mut GradReadyHook<'_>,
    ) -> Result<()> {
        for id in std::mem::take(&mut self.unused) {
            self.leaf_final(id, param_grads, hook)?;
        }
        Ok(())
    }

    fn leaf_final(
        &mut self,
        id: usize,
        param_grads: &HashMap<usize, Tensor>,
        hook: &mut GradReadyHook<'_>,
    ) -> Result<()> {
        let Some(dst) = param_grads.get(&id) else {
            return Ok(());
        };
        let left = self.left.entry(view_key(dst)).or_default();
        *left = left.saturating_sub(1);
        if *left == 0 {
            hook(dst)?;
        }
        Ok(())
    }
}

/// A gradient view's place in its buffer: the leaves of tied parameters share it.
fn view_key(t: &Tensor) -> (usize, usize) {
    (t.offset(), t.elem_count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Device};

    fn t(v: &[f32]) -> Tensor {
        Tensor::f32(v.to_vec(), &[v.len()]).unwrap()
    }

    /// y = x * x (elementwise), written directly against `record` so the tape is tested alone.
    fn square(tape: &Tape, x: &Var) -> Var {
        let xv = x.tensor().to_vec_f32().unwrap();
        let out = t(&xv.iter().map(|a| a * a).collect::<Vec<_>>());
        let saved = x.tensor().clone();
        tape.record(
            out,
            &[x],
            Box::new(move |g, _| {
                let g = g.to_vec_f32()?;
                let x = saved.to_vec_f32()?;
                let d: Vec<f32> = g.iter().zip(&x).map(|(g, x)| 2.0 * g * x).collect();
                Ok(vec![Some(Tensor::f32(d, &[x.len()])?)])
            }),
        )
    }

    #[test]
    fn gradients_accumulate_over_paths_and_into_param_buffers() {
        let tape = Tape::recording();
        let flat_grad = Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap();
        flat_grad.write_f32().unwrap()[0] = 10.0; // existing gradient is added to, not replaced
        let p = tape.param(t(&[1.0, 2.0, 3.0]), flat_grad.clone()).unwrap();
        let x = tape.watch(t(&[4.0, 5.0, 6.0]));
        let y1 = square(&tape, &p);
        let y2 = square(&tape, &y1); // p^4
        let z = square(&tape, &x);
        assert_eq!(tape.len(), 3);
        let g = tape.backward_with(&y2, t(&[1.0, 1.0, 1.0])).unwrap();
        // d p^4 / dp = 4 p^3
        assert_eq!(flat_grad.to_vec_f32().unwrap(), vec![14.0, 32.0, 108.0]);
        assert!(g.get(&x).is_none(), "x does not lead to y2");
        assert!(g.get(&z).is_none());
        assert!(tape.backward_with(&y2, t(&[1.0, 1.0, 1.0])).is_err());
    }

    /// The hook sees each gradient view once, already holding its final value: `a` is used
    /// first and last, `b` only in the middle; `c` shares `b`'s view (tied); `d` is unused.
    #[test]
    fn the_hook_reports_each_gradient_once_when_final() {
        let tape = Tape::recording();
        let flat = Tensor::zeros(&[4], DType::F32, Device::Cpu).unwrap();
        let view = |o: usize| flat.view(o, &[1]).unwrap();
        let a = tape.param(t(&[2.0]), view(0)).unwrap();
        let b = tape.param(t(&[3.0]), view(1)).unwrap();
        let c = tape.param(t(&[3.0]), view(1)).unwrap();
        let d = tape.param(t(&[1.0]), view(3)).unwrap();
        let a2 = square(&tape, &a); // a^2
        let b2 = square(&tape, &b); // b^2
        let c2 = square(&tape, &c); // c^2 (tied to b)
        let sum = |x: &Var, y: &Var| {
            let v = x.tensor().to_vec_f32().unwrap()[0] + y.tensor().to_vec_f32().unwrap()[0];
            tape.record(
                t(&[v]),
                &[x, y],
                Box::new(|g, _| Ok(vec![Some(g.clone()), Some(g.clone())])),
            )
        };
        let s1 = sum(&a2, &b2);
        let s2 = sum(&s1, &c2);
        let s3 = sum(&s2, &a); // + a
        let _ = &d;
        let mut seen = Vec::new();
        tape.backward_hooked(&s3, &mut |g: &Tensor| {
            seen.push((g.offset(), g.to_vec_f32()?[0]));
            Ok(())
        })
        .unwrap();
        // d(a^2 + a)/da = 5 (a = 2), d(2 b^2)/db = 12 (b = c = 3), d is untouched.
        seen.sort_by_key(|s| s.0);
        assert_eq!(seen, vec![(0, 5.0), (1, 12.0), (3, 0.0)]);
        assert_eq!(flat.to_vec_f32().unwrap(), vec![5.0, 12.0, 0.0, 0.0]);
    }

    #[test]
    fn inference_tape_keeps_nothing() {
        let tape = Tape::inference();
        let p = tape
            .param(
                t(&[1.0]),
                Tensor::zeros(&[1], DType::F32, Device::Cpu).unwrap(),
            )
            .unwrap();
        let y = square(&tape, &p);
        assert!(!y.requires_grad());
        assert!(tape.is_empty());
        assert!(tape.backward(&y).is_err());
    }

    #[test]
    fn backward_rejects_non_scalar_loss() {
        let tape = Tape::recording();
        let x = tape.watch(t(&[1.0, 2.0]));
        let y = square(&tape, &x);
        let err = tape.backward(&y).unwrap_err().to_string();
        assert!(err.contains("scalar"), "{err}");
    }
}
