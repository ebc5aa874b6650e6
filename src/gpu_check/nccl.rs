//! NCCL over the checked GPU, one rank: the all-reduce group of one process
//! (`ncclCommInitAll`) and the communicator a launch of one process per GPU makes from a
//! unique id (`ncclGetUniqueId`, `ncclCommInitRankConfig`), reducing the whole buffer and a bucket.

use std::time::Duration;

use recycle_engine::cuda::{NcclId, RankComm};
use recycle_engine::{cuda, DType, Result};

use super::checker::{dims, Checker};

/// How long a one-rank reduction may take before the check calls it hung.
const RANK_TIMEOUT: Duration = Duration::from_secs(60);

/// With one rank the mean is the input, bit for bit (NCCL divides by 1), so the tolerance is
/// 0 — what it checks is that the communicator is made, the reduction is queued on the
/// communication stream between the two events, and the buffer comes back untouched. A
/// communicator that cannot be made (no libnccl.so.2) is a failed row naming the error, not
/// the end of the report.
pub(super) fn all_reduce_checks(c: &mut Checker) -> Result<()> {
    group_checks(c)?;
    rank_checks(c)
}

fn failed_row(c: &mut Checker, op: &str, e: impl std::fmt::Display) {
    c.record_err(
        &format!("{op}: {e}"),
        "-".to_string(),
        DType::F32,
        f64::INFINITY,
        0.0,
    );
}

/// `AllReduceGroup` (one process, `ncclCommInitAll`) over the checked GPU alone.
fn group_checks(c: &mut Checker) -> Result<()> {
    let mut group = match cuda::AllReduceGroup::new(&[c.device]) {
        Ok(g) => g,
        Err(e) => {
            failed_row(c, "all_reduce_mean (NCCL)", e);
            return Ok(());
        }
    };
    for dt in [DType::F32, DType::BF16] {
        let (cpu, gpu) = c.fresh(&[1 << 20], dt)?;
        group.all_reduce_mean(&[&gpu])?;
        c.record(
            "all_reduce_mean (NCCL), 1 rank",
            dims(&[1 << 20]),
            dt,
            &gpu,
            &cpu,
            0.0,
        )?;
    }
    Ok(())
}

/// `RankComm` (one process per GPU, `ncclCommInitRankConfig` from a unique id) as rank 0 of 1: the
/// whole buffer, then one bucket in the middle of it, waited for with the asynchronous-error
/// watch a multi-rank launch uses.
fn rank_checks(c: &mut Checker) -> Result<()> {
    let made =
        NcclId::new(c.device).and_then(|id| RankComm::new(c.device, 0, 1, &id, RANK_TIMEOUT));
    let mut comm = match made {
        Ok(comm) => comm,
        Err(e) => {
            failed_row(c, "RankComm (ncclCommInitRankConfig)", e);
            return Ok(());
        }
    };
    let n = (1 << 20) + 3;
    for dt in [DType::F32, DType::BF16] {
        let (cpu, gpu) = c.fresh(&[n], dt)?;
        comm.all_reduce_mean(&gpu)?;
        comm.reduce_bucket(&gpu, 1000..(n / 2))?;
        comm.join_student()?;
        comm.wait(RANK_TIMEOUT)?;
        c.record(
            "RankComm all_reduce_mean + bucket (ncclCommInitRankConfig), 1 rank",
            dims(&[n]),
            dt,
            &gpu,
            &cpu,
            0.0,
        )?;
    }
    Ok(())
}
