//! centraldb-mfa: an encrypted vault for GarminSync users' Garmin tokens, MFA challenges,
//! login-flow sessions and a tamper-evident audit trail.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod api;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod listener;
pub mod private_file;
pub mod services;
pub mod startup;
pub mod state;
#[macro_use]
pub mod store;
pub mod sweeper;
pub mod telemetry;

pub use state::AppState;
