//! Guest-RAM style use: one large memfd (as a VMM would have for guest memory) is sealed,
//! registered once, and I/O lands at many offsets inside it, zero copy.
//!
//! ```text
//! nvmed --emulate --socket /tmp/nvmed.sock &
//! cargo run --example guest_ram -- /tmp/nvmed.sock
//! ```

use std::time::Instant;

use nvmed_client::{Io, MemfdBuffer, NvmeRing};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "/run/nvmed.sock".into());
    let mut ring = NvmeRing::open(&path)?;
    let ns = *ring.namespaces().first().ok_or("the broker offers no namespace")?;

    // "Guest RAM": a 256 MiB memfd, sealed against shrinking as QEMU's memory-backend-memfd is.
    let ram_size = 256usize << 20;
    let ram = MemfdBuffer::new(ram_size)?;
    let ram = ring.register_buffer(ram)?;

    // Scatter 4 KiB writes from many guest pages to consecutive disk blocks, then read them
    // back into other guest pages, 32 requests in flight at a time.
    let count = 4096u64;
    let block = 4096u32;
    let page_for = |i: u64| (i * 7919 % (ram_size as u64 / 2 / 4096)) * 4096;
    for i in 0..count {
        let page = ring.buffer_mut(ram, page_for(i), u64::from(block))?;
        page.fill((i % 255) as u8 + 1);
        page[..8].copy_from_slice(&i.to_le_bytes());
    }
    let started = Instant::now();
    let mut done = Vec::new();
    let run = |ring: &mut NvmeRing,
               make: &dyn Fn(u64) -> Io,
               done: &mut Vec<_>|
     -> Result<(), Box<dyn std::error::Error>> {
        let mut next = 0;
        let mut finished = 0;
        while finished < count {
            while next < count && ring.in_flight() < 32 {
                ring.prep(make(next).user_data(next))?;
                next += 1;
            }
            ring.submit()?;
            done.clear();
            finished += ring.wait(1, done, None)? as u64;
            if let Some(bad) = done.iter().find(|c: &&nvmed_client::Completion| !c.status.is_success()) {
                return Err(format!("request {} failed: {}", bad.user_data, bad.status).into());
            }
        }
        Ok(())
    };
    run(&mut ring, &|i| Io::write(ns.nsid, i * u64::from(block), block, ram, page_for(i)), &mut done)?;
    let half = ram_size as u64 / 2;
    run(&mut ring, &|i| Io::read(ns.nsid, i * u64::from(block), block, ram, half + page_for(i)), &mut done)?;
    let elapsed = started.elapsed();
    for i in 0..count {
        let a = ring.buffer(ram, page_for(i), u64::from(block))?;
        let b = ring.buffer(ram, half + page_for(i), u64::from(block))?;
        if a != b || b[..8] != i.to_le_bytes() {
            return Err(format!("guest page for request {i} differs after read-back").into());
        }
    }
    println!(
        "guest RAM: {} writes + {} reads of {} KiB at scattered offsets of one {} MiB registration, verified, in {:.1} ms",
        count,
        count,
        block / 1024,
        ram_size >> 20,
        elapsed.as_secs_f64() * 1e3
    );
    Ok(())
}
