//! The all-reduce of a clique (the communicators one `ncclCommInitAll` made): each rank's
//! call is queued on its own stream; when the streams reach it, the ranks meet (as NCCL's
//! kernels wait for their peers), the last to arrive reduces every rank's send buffer in rank
//! order and writes the result to every receive buffer, and all ranks go on.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::MockError;
use crate::libcommon::{Elem, HostRange};

/// `ncclRedOp_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedOp {
    Sum,
    Prod,
    Max,
    Min,
    Avg,
}

/// One rank's part of a collective.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    pub send: HostRange,
    pub recv: HostRange,
    pub count: usize,
    pub elem: Elem,
    pub op: RedOp,
}

/// `op` over the ranks' values, element by element, in rank order, fp32 (bf16 widened; the
/// result is rounded once, when stored).
pub fn reduce(op: RedOp, elem: Elem, inputs: &[&[u8]], count: usize) -> Vec<f32> {
    let ranks = inputs.len();
    (0..count)
        .map(|i| {
            let mut vals = inputs.iter().map(|b| elem.load(b, i));
            let first = vals.next().unwrap_or(0.0);
            let folded = vals.fold(first, |acc, v| match op {
                RedOp::Sum | RedOp::Avg => acc + v,
                RedOp::Prod => acc * v,
                RedOp::Max => acc.max(v),
                RedOp::Min => acc.min(v),
            });
            if op == RedOp::Avg {
                folded / ranks as f32
            } else {
                folded
            }
        })
        .collect()
}

/// One collective of the clique: the parts arrived so far; when done, its outcome.
struct Round {
    parts: Vec<Option<Part>>,
    outcome: Option<Result<(), String>>,
    /// Ranks that have not yet seen the outcome (the round is forgotten after the last).
    unseen: usize,
}

/// The communicators of one `ncclCommInitAll`.
pub struct Clique {
    pub ranks: usize,
    rounds: Mutex<BTreeMap<u64, Round>>,
    arrived: Condvar,
}

impl Clique {
    pub fn new(ranks: usize) -> Clique {
        Clique {
            ranks,
            rounds: Mutex::new(BTreeMap::new()),
            arrived: Condvar::new(),
        }
    }

    /// Rank `rank`'s part of collective number `seq` (each rank numbers its collectives in
    /// call order, as NCCL matches them): waits for every rank, then returns the outcome.
    pub fn all_reduce(
        &self,
        seq: u64,
        rank: usize,
        part: Part,
        timeout: Duration,
    ) -> Result<(), MockError> {
        let mut rounds = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
        let round = rounds.entry(seq).or_insert_with(|| Round {
            parts: vec![None; self.ranks],
            outcome: None,
            unseen: self.ranks,
        });
        round.parts[rank] = Some(part);
        if round.parts.iter().all(Option::is_some) {
            let parts: Vec<Part> = round.parts.iter().flatten().copied().collect();
            // SAFETY: every part's ranges were resolved inside live allocations when queued;
            // each rank's stream is held at this call until the outcome is set, so no other
            // work of these ranks touches the buffers meanwhile.
            round.outcome = Some(unsafe { finish(&parts) });
            self.arrived.notify_all();
        }
        let start = Instant::now();
        loop {
            let round = rounds
                .get_mut(&seq)
                .expect("kept until every rank has seen it");
            if let Some(outcome) = round.outcome.clone() {
                round.unseen -= 1;
                if round.unseen == 0 {
                    rounds.remove(&seq);
                }
                return outcome.map_err(MockError);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                let missing: Vec<usize> = (0..self.ranks)
                    .filter(|r| round.parts[*r].is_none())
                    .collect();
                round.parts[rank] = None;
                return Err(MockError(format!(
                    "ncclAllReduce #{seq}: rank {rank} waited {} s for ranks {missing:?}, which never \
                     reached the call on their streams",
                    timeout.as_secs()
                )));
            }
            rounds = self
                .arrived
                .wait_timeout(rounds, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Reduces the parts into every receive buffer; the parts must agree.
unsafe fn finish(parts: &[Part]) -> Result<(), String> {
    let first = parts[0];
    if let Some(p) = parts
        .iter()
        .find(|p| (p.count, p.elem, p.op) != (first.count, first.elem, first.op))
    {
        return Err(format!(
            "ncclAllReduce: the ranks disagree: {} x {:?} {:?} against {} x {:?} {:?}",
            first.count, first.elem, first.op, p.count, p.elem, p.op
        ));
    }
    let values = {
        let inputs: Vec<&[u8]> = parts.iter().map(|p| p.send.bytes()).collect();
        reduce(first.op, first.elem, &inputs, first.count)
    };
    for p in parts {
        let out = p.recv.bytes_mut();
        for (i, v) in values.iter().enumerate() {
            p.elem.store(out, i, *v);
        }
    }
    Ok(())
}
