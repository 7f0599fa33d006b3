//! Kloigos: VM-like compute units cut from one Linux host with systemd and nftables.
//!
//! Read the modules in this order: `model` (pure domain logic) → `store` (SQLite inventory)
//! → `render` (Tera templates to file contents) → `plan` (the desired state of a host, one pure
//! function) → `apply` (the one seam that changes a host, under a root directory; `converge`
//! applies a plan) → `generator` (the systemd generator) → `service` (the operations, tying
//! them together) → `api` (HTTP) → `server` (listeners, socket activation) → `cli`. `store` is
//! reached through its `Inventory` trait; `error` prints an error with its causes once.

pub mod api;
pub(crate) mod apply;
pub(crate) mod audit;
pub(crate) mod auth;
pub(crate) mod canned;
pub mod cli;
pub(crate) mod doctor;
pub(crate) mod error;
pub mod fleet;
pub mod generator;
pub mod logging;
pub mod model;
pub(crate) mod peeruid;
pub(crate) mod plan;
pub(crate) mod render;
pub mod server;
pub mod service;
pub mod store;
pub(crate) mod time;
