//! The NVMe driver: controller bring-up, admin commands, I/O queues and PRPs.
//!
//! It talks to the controller only through [`crate::device::NvmeDevice`], so the same code
//! drives the emulated controller and a real one behind VFIO.

pub mod barrier;
pub mod controller;
pub mod io;
pub mod prp;
pub mod queue;
pub mod smart;
pub mod spec;
pub mod vector;

pub use controller::{Controller, ControllerInfo, DriverError, Namespace};
pub use io::{IoCommand, IoQueue, RwCommand};
pub use vector::{Cursor, DmaSeg, SglSupport, Transfer};
