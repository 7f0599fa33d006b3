//! Kloigos: VM-like compute units cut from one Linux host with systemd and nftables.
//!
//! Read the modules in this order: `model` (pure domain logic) → `store` (SQLite inventory)
//! → `render` (Tera templates to file contents) → `plan` (the desired state of a host, one pure
//! function) → `apply` (the one seam that changes a host, under a root directory; `converge`
//! applies a plan) → `generator` (the systemd generator) → `service` (the operations, tying
//! them together) → `api` (HTTP) → `server` (listeners, socket activation) → `cli`.

pub mod api;
pub mod apply;
pub mod audit;
pub mod auth;
pub mod canned;
pub mod cli;
pub mod doctor;
pub mod generator;
pub mod logging;
pub mod model;
pub mod peeruid;
pub mod plan;
pub mod render;
pub mod server;
pub mod service;
pub mod store;
pub mod time;
