//! audit-service: consumes auth events from Kafka, stores each exactly once
//! in PostgreSQL, detects attacks on sliding windows and publishes alerts.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; README.md
//! shows how the parts fit.

pub mod activity;
pub mod alerts;
pub mod api;
pub mod config;
pub mod demo;
pub mod detect;
pub mod event;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod loadgen;
pub mod metrics;
pub mod replay;
pub mod service;
pub mod store;
pub mod telemetry;
