//! AsyncNvmeRing against the synchronous ring, in the same run on the same broker: random
//! 4 KiB reads at a fixed queue depth, as IOPS and as a ratio (BENCHMARKS.md, "tokio").
//!
//! ```text
//! nvmed --emulate --socket /tmp/nvmed.sock &
//! cargo run --release -p nvmed-client --features tokio --example tokio_bench -- /tmp/nvmed.sock [SECS] [QD]
//! ```
//!
//! Peers, each for SECS seconds (default 2), twice in alternation, best of two:
//! * `sync`: one thread, one `NvmeRing`, QD requests kept in flight with prep/submit/wait;
//! * `tokio-mt`: QD tasks on a multi-threaded runtime, each looping over one read at a time, all
//!   on one `AsyncNvmeRing`; with 1 worker (`mt1`: with the broker's I/O thread, as many busy
//!   threads as the sync peer) and with 2 (`mt2`);
//! * `tokio-ct`: the same on a current-thread runtime.

use std::time::{Duration, Instant};

use nvmed_client::tokio::AsyncNvmeRing;
use nvmed_client::{Io, NvmeRing};

const BS: u64 = 4096;

/// xorshift: the block of the next read.
fn next_block(state: &mut u64, blocks: u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state % blocks
}

fn blocks_of(ring: &NvmeRing) -> u64 {
    (ring.namespaces()[0].size_bytes() / BS).min(16384)
}

fn sync_peer(path: &str, secs: f64, qd: usize) -> Result<f64, nvmed_client::Error> {
    let mut ring = NvmeRing::open(path)?;
    let nsid = ring.namespaces()[0].nsid;
    let blocks = blocks_of(&ring);
    let buf = ring.alloc_buffer(qd * BS as usize)?;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for slot in 0..qd {
        let io = Io::read(nsid, next_block(&mut rng, blocks) * BS, BS as u32, buf, slot as u64 * BS);
        ring.prep(io.user_data(slot as u64))?;
    }
    ring.submit()?;
    let (start, mut done, mut out) = (Instant::now(), 0u64, Vec::new());
    while start.elapsed().as_secs_f64() < secs {
        out.clear();
        ring.wait(1, &mut out, None)?;
        for c in &out {
            if !c.status.is_success() {
                return Err(nvmed_client::Error::Io(c.status));
            }
            let io = Io::read(nsid, next_block(&mut rng, blocks) * BS, BS as u32, buf, c.user_data * BS);
            ring.prep(io.user_data(c.user_data))?;
        }
        done += out.len() as u64;
        ring.submit()?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    while ring.in_flight() > 0 {
        ring.wait(1, &mut out, None)?;
    }
    Ok(done as f64 / elapsed)
}

async fn tokio_peer(path: String, secs: f64, qd: usize) -> Result<f64, nvmed_client::Error> {
    let ring = AsyncNvmeRing::open(&path)?;
    let nsid = ring.namespaces()[0].nsid;
    let blocks = (ring.namespaces()[0].size_bytes() / BS).min(16384);
    let pieces = ring.alloc_buffer(qd * BS as usize)?.into_chunks(BS as usize);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = pieces
        .into_iter()
        .enumerate()
        .map(|(i, mut buf)| {
            let ring = ring.clone();
            tokio::spawn(async move {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((i as u64 + 1) << 32);
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let (_, b) = ring.read(nsid, next_block(&mut rng, blocks) * BS, buf).await?;
                    buf = b;
                    done += 1;
                }
                Ok::<u64, nvmed_client::Error>(done)
            })
        })
        .collect();
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("task")?;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "/run/nvmed.sock".into());
    let secs: f64 = args.next().map_or(Ok(2.0), |s| s.parse())?;
    let qd: usize = args.next().map_or(Ok(32), |s| s.parse())?;
    let mt1 = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mt2 = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let ct = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut sync, mut t1, mut t2, mut tc) = (0f64, 0f64, 0f64, 0f64);
    for _ in 0..2 {
        sync = sync.max(sync_peer(&path, secs, qd)?);
        t1 = t1.max(mt1.block_on(tokio_peer(path.clone(), secs, qd))?);
        t2 = t2.max(mt2.block_on(tokio_peer(path.clone(), secs, qd))?);
        tc = tc.max(ct.block_on(tokio_peer(path.clone(), secs, qd))?);
    }
    println!("random 4 KiB reads, QD {qd}, {secs} s per run, best of 2:");
    println!("  sync       {:>10.0} IOPS", sync);
    println!("  tokio-ct   {:>10.0} IOPS  ({:.2} x sync)", tc, tc / sync);
    println!("  tokio-mt1  {:>10.0} IOPS  ({:.2} x sync)", t1, t1 / sync);
    println!("  tokio-mt2  {:>10.0} IOPS  ({:.2} x sync)", t2, t2 / sync);
    Ok(())
}
