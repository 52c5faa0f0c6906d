//! Rate limits for log lines that clients can cause (see [`nvmed_proto::ratelog`]): the
//! broker's macros, with a budget per call site (`limited!`) or per uid at a call site
//! (`limited_per!`).

/// As `limited!`, with a budget per `key` (a uid) at the call site.
pub(crate) use nvmed_proto::log_limited_per as limited_per;

/// `tracing`'s macro `$level!` with the call site's `LogBudget`, adding `dropped = N` (lines
/// over the budget since the last one logged).
pub(crate) use nvmed_proto::log_limited as limited;
