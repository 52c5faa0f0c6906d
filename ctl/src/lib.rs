//! # nvmectl
//!
//! The operator's side of nvmed's admin socket ([`nvmed_proto::admin`]): [`AdminClient`] asks,
//! [`render`] turns the answers into tables, [`rates`] turns two session samples into IOPS and
//! MB/s. The `nvmectl` binary is a thin command line over these.

pub mod client;
pub mod rates;
pub mod render;

pub use client::{AdminClient, CtlError, DEFAULT_ADMIN_SOCKET};
pub use rates::{session_rates, SessionRate};
