//! Recycle: same-architecture knowledge distillation. This root crate gathers the engine and
//! the models, and holds what the paper's experiments need: the distillation loss, teacher
//! pool and schedule (`distill`), the data sets (`data`), run recipes (`recipe`), the trainer
//! (`trainer`), the experiments with their time-to-accuracy report (`experiments`), and the
//! measurement of a distillation step's cost against a plain one (`bench`).

pub mod bench;
pub mod data;
pub mod distill;
pub mod distributed;
pub mod experiments;
pub mod gpu_check;
pub mod recipe;
pub mod trainer;

pub use recycle_engine as engine;
pub use recycle_models as models;
