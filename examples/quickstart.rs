//! Quickstart: open the broker, register a buffer, write, flush, read back, verify.
//!
//! ```text
//! nvmed --emulate --socket /tmp/nvmed.sock &
//! cargo run --example quickstart -- /tmp/nvmed.sock
//! ```

use nvmed_client::{Io, NvmeRing};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "/run/nvmed.sock".into());
    let mut ring = NvmeRing::open(&path)?;
    let ns = *ring.namespaces().first().ok_or("the broker offers no namespace")?;
    println!(
        "namespace {}: {} blocks of {} bytes ({} MiB), max transfer {} KiB",
        ns.nsid,
        ns.lba_count,
        ns.lba_size,
        ns.size_bytes() >> 20,
        ns.max_transfer >> 10
    );

    // One buffer, registered once: the device DMAs straight into it.
    let len = 64 * 1024u32;
    let buf = ring.alloc_buffer(2 * len as usize)?;
    for (i, b) in ring.buffer_mut(buf, 0, u64::from(len))?.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }

    // Write, flush and read back as one batch of prepared requests.
    ring.prep(Io::write(ns.nsid, 0, len, buf, 0).user_data(1))?;
    ring.submit()?;
    let mut done = Vec::new();
    ring.wait(1, &mut done, None)?;
    ring.prep(Io::flush(ns.nsid).user_data(2))?;
    ring.prep(Io::read(ns.nsid, 0, len, buf, u64::from(len)).user_data(3))?;
    ring.submit()?;
    ring.wait(2, &mut done, None)?;
    for c in &done {
        println!("request {} -> {} ({} bytes)", c.user_data, c.status, c.result);
        if !c.status.is_success() {
            return Err(format!("request {} failed: {}", c.user_data, c.status).into());
        }
    }
    let written = ring.buffer(buf, 0, u64::from(len))?.to_vec();
    let read = ring.buffer(buf, u64::from(len), u64::from(len))?;
    if written != read {
        return Err("read-back data differs from what was written".into());
    }
    let stats = ring.stats()?;
    println!(
        "verified {len} bytes; session: {} submitted, {} completed, {} bytes written, {} bytes read",
        stats.submitted, stats.completed, stats.bytes_written, stats.bytes_read
    );
    Ok(())
}
