//! Errors of the MOVE core.

/// What can go wrong while fitting or applying a MOVE model.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The design matrix is (numerically) rank deficient.
    #[error(
        "design matrix is ill-conditioned (condition estimate {condition:.3e} > {limit:.1e}, {cols} columns)"
    )]
    IllConditioned {
        /// Estimated condition number of the scaled R factor.
        condition: f64,
        /// The limit that was exceeded.
        limit: f64,
        /// Number of columns in the design.
        cols: usize,
    },
    /// Fewer observations than parameters (plus one for an error estimate).
    #[error("too few samples: {rows} rows for {cols} parameters")]
    TooFewSamples {
        /// Rows available.
        rows: usize,
        /// Parameters to fit.
        cols: usize,
    },
    /// A data set exceeds a bound.
    #[error("{what} has {count} entries, limit is {limit}")]
    TooLarge {
        /// Which collection.
        what: &'static str,
        /// How many there are.
        count: usize,
        /// The bound.
        limit: usize,
    },
    /// A value is not finite or out of range.
    #[error("invalid value in {what} at sample {index}: {value}")]
    InvalidValue {
        /// Which field.
        what: &'static str,
        /// Sample index.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// Unsupported format version.
    #[error("unsupported {what} version {found} (this build reads {supported})")]
    Version {
        /// Which document.
        what: &'static str,
        /// Version in the document.
        found: u32,
        /// Version this build supports.
        supported: u32,
    },
    /// A model references a metric name this build does not know.
    #[error("unknown metric {name:?}")]
    UnknownMetric {
        /// The name.
        name: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, MoveError>;
