//! Distillation: the fused loss, the teacher pool and its strategies, and the schedule that
//! says which steps distill.

pub mod cache;
pub mod loss;
pub mod pool;
pub mod schedule;

pub use loss::{kd_loss, kd_loss_cpu, KdKind, KdLoss, KdLossOutput, KdLossVars};
pub use pool::{TeacherEntry, TeacherPool, TeacherStrategy};
pub use schedule::KdSchedule;
