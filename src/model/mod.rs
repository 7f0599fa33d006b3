//! Pure domain logic: CPU lists, names, port ranges, NUMA topology and input validation.
//! Nothing here changes the host; readers take a `root` so tests can use a fake tree.

pub(crate) mod cpulist;
pub(crate) mod names;
pub(crate) mod numa;
pub(crate) mod ports;
pub(crate) mod status;
pub mod validate;

pub use cpulist::CpuList;
pub use ports::{PortPlan, PortRanges};

/// Errors of the pure model: always caused by bad input, so they map to HTTP 4xx.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("invalid CPU list {input:?}: {reason}")]
    CpuList { input: String, reason: String },
    #[error("invalid port plan: {0}")]
    Ports(String),
    #[error("{0}")]
    Invalid(String),
}
