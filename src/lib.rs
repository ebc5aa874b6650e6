//! Recycle: same-architecture knowledge distillation. This root crate gathers the engine (and,
//! as they land, the models, the distillation loss, the trainer and the experiments).

pub use recycle_engine as engine;
pub mod data;
pub mod experiments;
