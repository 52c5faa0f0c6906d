//! # nvmed broker
//!
//! Owns an NVMe controller (emulated, or real through VFIO) and serves it to unprivileged
//! clients over shared-memory rings.
//!
//! * [`device`]: the seam between the driver and "a PCIe NVMe controller".
//! * [`nvme`]: the NVMe driver (admin queue, I/O queues, PRPs).
//! * [`iova`]: the IOVA space (internal area, buffer area, DMA mappings).
//! * [`emulator`]: the register-level emulated controller.
//! * [`broker`]: sessions, rings, the I/O poller and the control socket.
//! * [`policy`]: what each client may do.
//! * [`activation`]: the listening socket systemd passes (socket activation).
//! * [`cpus`]: CPU lists on command lines.

pub mod activation;
pub mod broker;
pub mod cpus;
pub mod device;
pub mod emulator;
pub mod iova;
pub mod nvme;
pub mod policy;
