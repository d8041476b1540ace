//! MOVE (Modeling Overheads of Virtual Environments, seed chapter 3): the model core.
//!
//! Given microbenchmark runs measured natively (the 11 metrics of Table 3.1) and on a
//! virtual platform (VM CPU and the host-side "Dom-0" CPU spent for the guest), fit two
//! linear models — forward stepwise selection with a partial F-test, coefficients by IRLS
//! with Tukey's bisquare — drop benchmark runs whose error is far above the overall error
//! and refit, and predict both CPU traces from any application's native trace. A
//! CPU-scaling baseline (`target = a + b·(user + kernel)`) is fitted alongside for
//! comparison.
//!
//! Guarantees: sans-IO and deterministic (no clock, no files, no threads; the simulator's
//! RNG is seeded); every fit is bounded ([`data::MAX_SAMPLES`], [`fit::IRLS_MAX_ITERATIONS`],
//! [`model::MAX_REFINE_ROUNDS`], [`model::MAX_DROPPED_FRACTION`]); the robust fit matches
//! statsmodels' `RLM(M=TukeyBiweight())` on the golden data in `golden/`.
//!
//! Format version policy: training set, trace, model and prediction JSON carry `version`
//! ([`data::FORMAT_VERSION`]); a reader rejects other versions. See `docs/move.md`.

pub mod data;
pub mod error;
pub mod fit;
pub mod linalg;
pub mod model;
pub mod sim;
pub mod stats;

pub use data::{Metric, Metrics, Trace, TraceSample, TrainingSample, TrainingSet};
pub use error::{MoveError, Result};
pub use model::{FitParams, Model, Prediction, RefineMode, evaluate, fit, predict};
