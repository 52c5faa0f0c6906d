//! # nvmed-tcp
//!
//! An NVMe/TCP target (NVMe over Fabrics, TCP transport) that serves nvmed's namespaces to
//! standard initiators (the Linux kernel's nvme-tcp, SPDK). It is an ordinary client of the
//! nvmed broker: one broker session per NVMe controller (association), one ring per host I/O
//! queue, with the queue's data buffer registered once, so data moves socket -> registered
//! buffer -> device DMA with no other copy.

pub mod config;
pub mod ctrl;
mod handshakes;
mod ioq;
mod outbox;
pub mod pdu;
pub mod server;

pub use config::{Config, ConfigError, ConfigFile, HostAccess};
pub use server::{serve, serve_discovery, ConnError, Target};
pub mod initiator;
