//! The ClickHouse side of videocount: typed settings ([`config`]), the native-format block
//! encoder ([`native`]), the rows each table receives ([`rows`]), the HTTP service with its
//! retry classification ([`service`]), the bounded write queue and its writer tasks
//! ([`writer`]), job checkpoints ([`checkpoints`]) and the schema ([`schema`]).

pub mod checkpoints;
pub mod compact;
pub mod config;
pub mod native;
pub mod replay;
pub mod rows;
pub mod schema;
pub mod service;
pub mod states;
pub mod writer;

#[cfg(test)]
mod integration_tests;

pub use config::ClickHouseConfig;
pub use service::{ClickHouse, SinkError};
pub use writer::{Writer, WriterStats};
