//! The NCCL all-reduce group over the checked GPU, one rank.

use recycle_engine::{cuda, DType, Result};

use super::checker::{dims, Checker};

/// The NCCL all-reduce group over the checked GPU alone: with one rank the mean is the input,
/// bit for bit (NCCL divides by 1), so the tolerance is 0 — what it checks is that the group
/// is made, the reduction is queued on the communication stream between the two events, and
/// the buffer comes back untouched. A group that cannot be made (no libnccl.so.2) is a failed
/// row naming the error, not the end of the report.
pub(super) fn all_reduce_checks(c: &mut Checker) -> Result<()> {
    let mut group = match cuda::AllReduceGroup::new(&[c.device]) {
        Ok(g) => g,
        Err(e) => {
            c.record_err(
                &format!("all_reduce_mean (NCCL): {e}"),
                "-".to_string(),
                DType::F32,
                f64::INFINITY,
                0.0,
            );
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
