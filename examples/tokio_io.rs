//! nvmed from tokio: a few thousand tasks, each writing its own block and reading it back,
//! all in flight at once on one ring, verified.
//!
//! ```text
//! nvmed --emulate --socket /tmp/nvmed.sock &
//! cargo run -p nvmed-client --features tokio --example tokio_io -- /tmp/nvmed.sock
//! ```

use nvmed_client::tokio::AsyncNvmeRing;
use tokio::task::JoinSet;

/// The byte task `task` writes at position `i` of its block.
fn byte(task: usize, i: usize) -> u8 {
    (task * 31 + i * 7 + 1) as u8
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "/run/nvmed.sock".into());
    let tasks = 4096usize;
    let ring = AsyncNvmeRing::open(&path)?;
    let ns = *ring.namespaces().first().ok_or("the broker offers no namespace")?;
    let block = 4096usize.max(ns.lba_size as usize);
    if ns.size_bytes() < (tasks * block) as u64 {
        return Err(format!("namespace {} is smaller than {} blocks of {block} bytes", ns.nsid, tasks).into());
    }

    // One registration, cut into one owned block per task.
    let blocks = ring.alloc_buffer(tasks * block)?.into_chunks(block);
    let started = std::time::Instant::now();
    let mut set = JoinSet::new();
    for (task, mut buf) in blocks.into_iter().enumerate() {
        let ring = ring.clone();
        set.spawn(async move {
            let offset = (task * block) as u64;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = byte(task, i);
            }
            let (_, mut buf) = ring.write(ns.nsid, offset, buf).await?;
            buf.fill(0);
            let (n, buf) = ring.read(ns.nsid, offset, buf).await?;
            if n as usize != block || buf.iter().enumerate().any(|(i, &b)| b != byte(task, i)) {
                return Err(format!("task {task}: read back differs from what it wrote").into());
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        });
    }
    while let Some(done) = set.join_next().await {
        done?.map_err(|e| e.to_string())?;
    }
    let c = ring.counters();
    println!(
        "{tasks} tasks wrote and verified {} KiB each in {:.1} ms; {} requests, at most {} in flight \
         ({} waited for a free entry), {} completions found by the futures, {} by the driver task, \
         which slept {} times",
        block >> 10,
        started.elapsed().as_secs_f64() * 1e3,
        c.submitted,
        ring.max_in_flight(),
        c.waited_for_entry,
        c.reaped_by_futures,
        c.reaped_by_driver,
        c.sleeps
    );
    Ok(())
}
