//! Fair sharing and limits between the tenants of one I/O thread: a pure scheduler.
//!
//! No threads, no I/O, no clock and no allocation per I/O (only [`Scheduler::add_tenant`]
//! may allocate): time is a `u64` of nanoseconds the caller passes in, from any monotonic
//! clock, so tests drive it with a fake one. The I/O thread asks, per request it would like
//! to submit, whether it may go now; the scheduler answers [`Dispatch::Go`] (and charges it),
//! [`Dispatch::Later`] (this tenant's turn is over: its deficit, its queue-depth cap or its
//! share of the device slots is used up) or [`Dispatch::Wait`] (a rate limit holds it until
//! the given time). A request is never refused: at worst it waits.
//!
//! # Cost
//!
//! A request costs [`SchedConfig::cost`]: `BASE_COST + ceil(bytes / COST_UNIT_BYTES)`, with
//! the byte part of a write scaled by [`SchedConfig::write_cost_percent`]. The base stands for
//! what every command costs the device whatever its size (fetch, completion, FTL lookup): it is
//! worth 4 KiB of transfer, so a 4 KiB read costs 16, a 128 KiB read 264 and, with the default
//! write weight of 200 %, a 4 KiB write 24 and a 128 KiB write 520.
//!
//! # Fair sharing: deficit round robin
//!
//! Tenants that have work ([`Scheduler::set_has_work`]) form a ring. [`Scheduler::next_tenant`]
//! visits them in turn, skipping those that could not dispatch anything now (throttled, at
//! their queue-depth cap or slot share), and grants each visited tenant `quantum * weight` of
//! deficit; the tenant dispatches while its deficit covers the next request's cost. So under
//! saturation tenants share the dispatched cost in proportion to their weights; one tenant
//! alone gets everything (work conserving); and with the default quantum (the cost of a
//! 128 KiB write) even a weight-1 tenant dispatches a request of up to 128 KiB on every visit,
//! whatever the weights beside it: no starvation. A tenant that runs out of work loses its
//! deficit (classic DRR), so idleness earns no credit, and a tenant visited without using its
//! grant keeps at most one grant plus the cost of the request it last asked for.
//!
//! # Limits: token buckets
//!
//! Each limit (`iops`, `read_bytes_per_s`, `write_bytes_per_s`) is a token bucket refilled
//! from the elapsed time (exactly: the level is kept in nano-tokens, so neither the tick rate
//! nor its regularity loses or gains anything). Its depth is `burst_ns` worth of its rate (10 ms
//! by default), and at least one request ([`SchedConfig::burst_min_bytes`], 128 KiB by
//! default, for the byte buckets). A request that fits in the depth waits until the bucket holds
//! it; a larger one waits until the bucket is full, then goes and drives it negative (debt),
//! and the tenant waits until the debt is paid. So over any time `t` from the first request,
//! a tenant moves at most `rate * t + depth`, plus, for a request larger than the depth, its
//! excess over the depth. A request moving no data is held by the iops limit only.
//!
//! # Queue depth
//!
//! `max_in_flight` caps a tenant's requests in flight. And no tenant holds more than its
//! weight's share of the device slots while others have work: `share = max(1, device_slots *
//! weight / W)`, `W` the sum of the weights of the tenants with work (the asking tenant
//! included), so a tenant alone may fill the queue. A slot is taken on [`Dispatch::Go`] and
//! given back by [`Scheduler::complete`]. One request is one slot here, however many device
//! commands it needs.
//!
//! Everything is O(1) per request, and [`Scheduler::next_tenant`] is O(tenants) per round.

use slab::Slab;

/// Bytes per cost unit: the smallest logical block, so any transfer is a whole number of units.
pub const COST_UNIT_BYTES: u64 = 512;

/// Cost every request pays on top of its bytes: 8 units, the cost of moving 4 KiB, roughly what
/// a command costs an SSD apart from its data (so small requests are IOPS-bound and large ones
/// bandwidth-bound, as on the device).
pub const BASE_COST: u64 = 4096 / COST_UNIT_BYTES;

/// Default weight of written bytes against read bytes, in percent: writes cost flash more than
/// reads (slower programs, later garbage collection). Use 100 for a device without the bias.
pub const DEFAULT_WRITE_COST_PERCENT: u32 = 200;

/// Default quantum: the cost of a 128 KiB write, so a weight-1 tenant dispatches any request of
/// up to 128 KiB on every visit (one visit per request at worst, never several).
pub const DEFAULT_QUANTUM: u64 =
    BASE_COST + (128 << 10) / COST_UNIT_BYTES * DEFAULT_WRITE_COST_PERCENT as u64 / 100;

/// Default cost at the device while tenants contend: no cap. A cap (e.g. 64 reads of 4 KiB) bounds
/// what a request waits behind at a device that serves in order, however deep another tenant's
/// queue; but on a device that serves in parallel it gives large requests fewer slots than their
/// weight, so it is off unless asked for.
pub const DEFAULT_CONTENDED_COST: u64 = u64::MAX;

/// Default linger: 2 ms, several device latencies and well above a client's time between two
/// requests.
pub const DEFAULT_LINGER_NS: u64 = 2_000_000;

/// Default bucket depth in time: 10 ms of the rate (short enough to hold a limit within a
/// fraction of a second, long enough to absorb a 1 ms tick and the batching of a poll loop).
pub const DEFAULT_BURST_NS: u64 = 10_000_000;

/// Default smallest depth of a byte bucket: 128 KiB, a common largest single command, so such a
/// request never has to go on debt.
pub const DEFAULT_BURST_MIN_BYTES: u64 = 128 << 10;

const NS_PER_S: i128 = 1_000_000_000;
const NIL: usize = usize::MAX;

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedConfig {
    /// Device queue slots to share (at least 1).
    pub device_slots: u32,
    /// Cost granted per visit per unit of weight (at least 1).
    pub quantum: u64,
    /// Depth of a token bucket, as this long at its rate.
    pub burst_ns: u64,
    /// Smallest depth of a byte bucket, in bytes.
    pub burst_min_bytes: u64,
    /// Weight of written bytes in the cost, in percent of read bytes.
    pub write_cost_percent: u32,
    /// Cost all tenants together may have at the device while more than one is busy, shared by
    /// weight (each may always have one request there). What a request waits behind at an
    /// in-order device is bounded by this, however deep another tenant's queue is.
    pub contended_cost: u64,
    /// How long a tenant still counts as busy after its last request completed (a tenant at
    /// QD1 is idle for a moment between two requests: it must not lose its share then).
    pub linger_ns: u64,
}

impl SchedConfig {
    /// The defaults (the `DEFAULT_*` constants) for a device queue of `device_slots` slots.
    pub fn new(device_slots: u32) -> Self {
        Self {
            device_slots,
            quantum: DEFAULT_QUANTUM,
            burst_ns: DEFAULT_BURST_NS,
            burst_min_bytes: DEFAULT_BURST_MIN_BYTES,
            write_cost_percent: DEFAULT_WRITE_COST_PERCENT,
            contended_cost: DEFAULT_CONTENDED_COST,
            linger_ns: DEFAULT_LINGER_NS,
        }
    }

    /// Cost of a request moving `bytes` bytes: `BASE_COST + ceil(bytes / COST_UNIT_BYTES)`,
    /// the byte part scaled by `write_cost_percent` for a write.
    pub fn cost(&self, bytes: u64, write: bool) -> u64 {
        let units = bytes.div_ceil(COST_UNIT_BYTES);
        let units = if write {
            // u64 arithmetic when it cannot overflow (a u128 division is a library call).
            match units.checked_mul(u64::from(self.write_cost_percent)) {
                Some(product) => product / 100,
                None => {
                    let scaled = u128::from(units) * u128::from(self.write_cost_percent) / 100;
                    u64::try_from(scaled).unwrap_or(u64::MAX)
                }
            }
        } else {
            units
        };
        BASE_COST.saturating_add(units)
    }
}

/// Opaque handle of a tenant. A removed tenant's handle is not reused (not before 2^32 more
/// tenants were added).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TenantId {
    index: u32,
    generation: u32,
}

/// Hashes [`TenantId`]s in a multiply per word. Maps keyed by them are looked up once per
/// scheduling round on the I/O path; the standard SipHash resists hash flooding, which ids the
/// scheduler hands out itself do not need, and cost about as much as the rest of a round's
/// bookkeeping.
#[derive(Debug, Default, Clone, Copy)]
pub struct TenantIdHasher(u64);

impl std::hash::Hasher for TenantIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        // Fibonacci hashing: the multiply spreads the words over the high bits, which the
        // table's control bytes use, and the rotation over the low ones, which pick the bucket.
        self.0 = (self.0.rotate_left(29) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

/// A map keyed by [`TenantId`] with [`TenantIdHasher`].
pub type TenantIdMap<V> =
    std::collections::HashMap<TenantId, V, std::hash::BuildHasherDefault<TenantIdHasher>>;

/// What a tenant is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimits {
    /// Share against other tenants (0 is taken as 1).
    pub weight: u32,
    /// Most requests per second.
    pub iops: Option<u64>,
    /// Most bytes read per second.
    pub read_bytes_per_s: Option<u64>,
    /// Most bytes written per second.
    pub write_bytes_per_s: Option<u64>,
    /// Most requests in flight (0 is taken as 1).
    pub max_in_flight: Option<u32>,
}

impl Default for TenantLimits {
    /// Weight 1, no limit.
    fn default() -> Self {
        Self { weight: 1, iops: None, read_bytes_per_s: None, write_bytes_per_s: None, max_in_flight: None }
    }
}

/// The answer to [`Scheduler::try_dispatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Submit it: it is charged and holds a slot until [`Scheduler::complete`].
    Go,
    /// A rate limit holds it: ask again at `until_ns` (or later); it will not go before.
    Wait {
        /// When the limits allow it, as things stand.
        until_ns: u64,
    },
    /// Not this turn: the tenant's deficit does not cover it, or the tenant (or the device)
    /// has no slot free. Move on to [`Scheduler::next_tenant`].
    Later,
}

/// A tenant's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantStats {
    /// Requests dispatched.
    pub dispatched: u64,
    /// Their total cost.
    pub dispatched_cost: u64,
    /// Bytes of the reads dispatched.
    pub read_bytes: u64,
    /// Bytes of the writes dispatched.
    pub write_bytes: u64,
    /// Time it was held by its limits: from a [`Dispatch::Wait`] to the [`Dispatch::Go`] that
    /// ends it (so it includes how late the caller asked again). A hold still open is not
    /// counted yet; one ended by [`Scheduler::set_has_work`]`(false)` counts up to the time
    /// the last `Wait` announced.
    pub throttled_ns: u64,
    /// Current deficit.
    pub deficit: u64,
    /// Requests in flight.
    pub in_flight: u32,
}

/// What a removed tenant's token buckets held (see [`Scheduler::remove_tenant_saving`]): a
/// tenant added again with the same key takes them back ([`Scheduler::restore_buckets`]), so
/// ending its last ring and opening a new one does not refill its buckets or forgive its debt.
#[derive(Debug, Clone)]
pub struct SavedBuckets {
    iops: Option<Bucket>,
    read: Option<Bucket>,
    write: Option<Bucket>,
    /// When every bucket is full again (from then on a fresh tenant is the same).
    pub full_at_ns: u64,
}

impl SavedBuckets {
    /// Moves the buckets to another clock (another I/O thread's): as if last refilled at `ns`
    /// of that clock.
    pub fn rebase(&mut self, ns: u64) {
        for b in [&mut self.iops, &mut self.read, &mut self.write].into_iter().flatten() {
            b.last_ns = Some(ns);
        }
    }
}

/// One token bucket. Levels are in nano-tokens (1e-9 token) so refills are exact.
#[derive(Debug, Clone)]
struct Bucket {
    /// Tokens per second (at least 1).
    rate: u64,
    /// Depth, in nano-tokens.
    cap: i128,
    /// Level, in nano-tokens, at most `cap`; negative is debt.
    level: i128,
    /// Time of the last refill; `None` before the first use (the bucket is full then).
    last_ns: Option<u64>,
}

impl Bucket {
    fn new(rate: u64, burst_ns: u64, min_tokens: u64) -> Self {
        let mut b = Bucket { rate: 1, cap: 0, level: 0, last_ns: None };
        b.set_rate(rate, burst_ns, min_tokens);
        b.level = b.cap;
        b
    }

    /// New rate and depth; the level carries over (credit above the new depth is lost, debt
    /// is kept whole).
    fn set_rate(&mut self, rate: u64, burst_ns: u64, min_tokens: u64) {
        self.rate = rate.max(1);
        self.cap = (i128::from(self.rate) * i128::from(burst_ns)).max(i128::from(min_tokens) * NS_PER_S);
        self.level = self.level.min(self.cap);
    }

    fn refill(&mut self, now: u64) {
        match self.last_ns {
            Some(last) if now > last => {
                let room = (self.cap - self.level) as u128;
                let add = u128::from(self.rate) * u128::from(now - last);
                self.level += add.min(room) as i128;
                self.last_ns = Some(now);
            }
            Some(_) => {}
            None => self.last_ns = Some(now),
        }
    }

    /// When a request of `n` tokens may go (after a refill at `now`); `None`: now.
    fn ready_at(&self, now: u64, n: u64) -> Option<u64> {
        let need = (i128::from(n) * NS_PER_S).min(self.cap);
        let short = need - self.level;
        (short > 0).then(|| {
            let wait = (short as u128).div_ceil(u128::from(self.rate));
            now.saturating_add(u64::try_from(wait).unwrap_or(u64::MAX))
        })
    }

    fn charge(&mut self, n: u64) {
        self.level -= i128::from(n) * NS_PER_S;
    }

    /// When it is full again (after a refill at `now`).
    fn full_at(&self, now: u64) -> u64 {
        let short = (self.cap - self.level).max(0) as u128;
        let wait = short.div_ceil(u128::from(self.rate));
        now.saturating_add(u64::try_from(wait).unwrap_or(u64::MAX))
    }
}

#[derive(Debug, Clone)]
struct Tenant {
    generation: u32,
    limits: TenantLimits,
    weight: u64,
    max_in_flight: u32,
    deficit: u64,
    /// Cost of the request it last asked for (bounds the deficit it may hoard).
    last_cost: u64,
    /// Cost of its requests at the device.
    cost_in_flight: u64,
    /// Still counted busy after its last request (`Some(0)`: since now, the next look sets
    /// the end).
    linger_until: Option<u64>,
    /// In the ring of tenants with work.
    active: bool,
    prev: usize,
    next: usize,
    /// Not to be visited before this (set by a `Wait`).
    throttled_until: u64,
    /// Held by a limit since (the first `Wait` not yet followed by a `Go`).
    throttled_since: Option<u64>,
    iops: Option<Bucket>,
    read: Option<Bucket>,
    write: Option<Bucket>,
    stats: TenantStats,
    /// Segment list slots (of the I/O thread's pool) its vectored requests hold.
    vec_slots: u32,
}

impl Tenant {
    fn grant(&self, quantum: u64) -> u64 {
        quantum.saturating_mul(self.weight)
    }

    /// Adopts `limits`, keeping what the buckets hold.
    fn apply(&mut self, limits: TenantLimits, now: Option<u64>, config: &SchedConfig) {
        self.weight = u64::from(limits.weight.max(1));
        self.max_in_flight = limits.max_in_flight.unwrap_or(u32::MAX).max(1);
        let update = |b: &mut Option<Bucket>, rate: Option<u64>, min_tokens: u64| match (b.as_mut(), rate) {
            (Some(bucket), Some(rate)) => {
                if let Some(now) = now {
                    bucket.refill(now);
                }
                bucket.set_rate(rate, config.burst_ns, min_tokens);
            }
            (None, Some(rate)) => *b = Some(Bucket::new(rate, config.burst_ns, min_tokens)),
            (_, None) => *b = None,
        };
        update(&mut self.iops, limits.iops, 1);
        update(&mut self.read, limits.read_bytes_per_s, config.burst_min_bytes);
        update(&mut self.write, limits.write_bytes_per_s, config.burst_min_bytes);
        self.limits = limits;
    }

    /// Closes a hold by a limit at `end`, if one is open.
    fn end_throttle(&mut self, end: u64) {
        if let Some(since) = self.throttled_since.take() {
            self.stats.throttled_ns += end.saturating_sub(since);
        }
    }
}

/// Deficit round robin between tenants, with token-bucket limits and queue-slot shares.
/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedConfig,
    tenants: Slab<Tenant>,
    next_generation: u32,
    /// The tenant the round visits next (`NIL`: no tenant has work).
    cursor: usize,
    /// Sum of the weights of the tenants with work.
    active_weight: u64,
    /// Sum of the weights of the busy tenants (with work, or with requests at the device).
    busy_weight: u64,
    /// How many tenants are busy.
    busy: u32,
    /// Requests in flight, all tenants.
    in_flight: u32,
    /// Tenants whose linger started (`linger_until` set to `Some(0)`): the next look sets its
    /// end. (A tenant removed or busy again since is skipped.)
    linger_starts: Vec<usize>,
    /// No linger ends before this (it may end later: a tenant that got work again stops
    /// lingering without updating it). Rounds before it skip the look at every tenant.
    linger_next: u64,
    /// No tenant is held by a limit from this time on (the latest `throttled_until` a `Wait`
    /// set): rounds after it skip the look at every tenant for the next wakeup.
    throttled_max: u64,
}

impl Scheduler {
    /// A scheduler without tenants. `device_slots` and `quantum` of 0 are taken as 1.
    pub fn new(mut config: SchedConfig) -> Self {
        config.device_slots = config.device_slots.max(1);
        config.quantum = config.quantum.max(1);
        Self {
            config,
            tenants: Slab::new(),
            next_generation: 0,
            cursor: NIL,
            active_weight: 0,
            busy_weight: 0,
            busy: 0,
            in_flight: 0,
            linger_starts: Vec::new(),
            linger_next: u64::MAX,
            throttled_max: 0,
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &SchedConfig {
        &self.config
    }

    /// Adds a tenant, without work. Its buckets start full at their first use.
    pub fn add_tenant(&mut self, limits: TenantLimits) -> TenantId {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let mut t = Tenant {
            generation,
            limits: TenantLimits::default(),
            weight: 1,
            max_in_flight: u32::MAX,
            deficit: 0,
            last_cost: 0,
            cost_in_flight: 0,
            linger_until: None,
            active: false,
            prev: NIL,
            next: NIL,
            throttled_until: 0,
            throttled_since: None,
            iops: None,
            read: None,
            write: None,
            stats: TenantStats::default(),
            vec_slots: 0,
        };
        t.apply(limits, None, &self.config);
        let index = self.tenants.insert(t);
        TenantId { index: u32::try_from(index).expect("fewer than 2^32 tenants"), generation }
    }

    /// Removes a tenant and returns its final figures. Its requests still in flight give their
    /// device slots back now: do not call [`complete`](Self::complete) for them.
    ///
    /// # Panics
    /// If `id` is not a current tenant (as every method taking a `TenantId`).
    pub fn remove_tenant(&mut self, id: TenantId) -> TenantStats {
        let i = self.index(id);
        self.unlink(i);
        let (was, w) = self.busy_before(i);
        let t = self.tenants.remove(i);
        if was {
            self.busy_weight -= w;
            self.busy -= 1;
        }
        self.in_flight -= t.stats.in_flight;
        TenantStats { deficit: t.deficit, ..t.stats }
    }

    /// As [`Scheduler::remove_tenant`], also giving what its buckets hold at `now` if any is
    /// not full (debt included), for [`Scheduler::restore_buckets`].
    pub fn remove_tenant_saving(&mut self, id: TenantId, now: u64) -> (TenantStats, Option<SavedBuckets>) {
        let i = self.index(id);
        let t = &mut self.tenants[i];
        let mut full_at = 0;
        for b in [&mut t.iops, &mut t.read, &mut t.write].into_iter().flatten() {
            // Never used: full.
            if b.last_ns.is_some() {
                b.refill(now);
                full_at = full_at.max(b.full_at(now));
            }
        }
        let saved = (full_at > now).then(|| SavedBuckets {
            iops: t.iops.clone(),
            read: t.read.clone(),
            write: t.write.clone(),
            full_at_ns: full_at,
        });
        (self.remove_tenant(id), saved)
    }

    /// Gives a tenant (just added with the key of a removed one) the levels its buckets had
    /// (refilled up to `now`), under its current rates and depths: debt is kept whole, credit
    /// above a depth is lost.
    pub fn restore_buckets(&mut self, id: TenantId, saved: SavedBuckets, now: u64) {
        let i = self.index(id);
        let t = &mut self.tenants[i];
        for (mine, old) in [(&mut t.iops, saved.iops), (&mut t.read, saved.read), (&mut t.write, saved.write)]
        {
            if let (Some(b), Some(mut old)) = (mine.as_mut(), old) {
                old.refill(now);
                b.level = old.level.min(b.cap);
                b.last_ns = Some(now);
            }
        }
    }

    /// Changes a tenant's limits, effective from its next request. Buckets are brought up to
    /// `now` at the old rates, then keep their level: credit above a new depth is lost, debt is
    /// kept whole (the bytes did move); a new limit starts full. A pending wait is cancelled
    /// (ask again: the new limits decide; a request still held stays counted as throttled).
    pub fn set_limits(&mut self, id: TenantId, now: u64, limits: TenantLimits) {
        let i = self.index(id);
        let (was, w) = self.busy_before(i);
        let t = &mut self.tenants[i];
        let old_weight = t.weight;
        t.apply(limits, Some(now), &self.config);
        t.throttled_until = t.throttled_until.min(now);
        if t.active {
            self.active_weight = self.active_weight - old_weight + t.weight;
        }
        self.busy_after(i, was, w);
    }

    /// A tenant's current limits.
    pub fn limits(&self, id: TenantId) -> &TenantLimits {
        &self.tenants[self.index(id)].limits
    }

    /// Says whether a tenant has requests waiting. A tenant that gets work joins the end of the
    /// current round; one that has none leaves the round and loses its deficit.
    pub fn set_has_work(&mut self, id: TenantId, has_work: bool) {
        let i = self.index(id);
        if has_work {
            self.link(i);
        } else {
            self.unlink(i);
            let t = &mut self.tenants[i];
            t.deficit = 0;
            t.end_throttle(t.throttled_until);
        }
    }

    /// Visits the next tenant with work that could dispatch something now (not held by a
    /// limit, under its queue-depth cap and its slot share), grants it its quantum, and
    /// returns it; `None` if no tenant can dispatch now (or the device queue is full). The
    /// caller then offers that tenant's requests to [`try_dispatch`](Self::try_dispatch) until
    /// one is not [`Dispatch::Go`]. One tenant alone is returned again and again.
    pub fn next_tenant(&mut self, now: u64) -> Option<TenantId> {
        self.expire_lingering(now);
        if self.cursor == NIL || self.in_flight >= self.config.device_slots {
            return None;
        }
        let start = self.cursor;
        let mut i = start;
        loop {
            let t = &self.tenants[i];
            let next = t.next;
            if t.throttled_until <= now && self.under_share(t) && self.cost_room(t, t.last_cost) {
                let grant = t.grant(self.config.quantum);
                self.cursor = next;
                let t = &mut self.tenants[i];
                t.deficit = t.deficit.saturating_add(grant).min(grant.saturating_add(t.last_cost));
                return Some(TenantId { index: i as u32, generation: t.generation });
            }
            i = next;
            if i == start {
                return None;
            }
        }
    }

    /// May this tenant submit a request of `bytes` bytes (a write if `write`) at `now`?
    /// [`Dispatch::Go`] charges it (deficit, buckets, a slot); the others charge nothing
    /// ([`Dispatch::Wait`] also keeps [`next_tenant`](Self::next_tenant) off the tenant until
    /// then).
    pub fn try_dispatch(&mut self, id: TenantId, now: u64, bytes: u64, write: bool) -> Dispatch {
        let i = self.index(id);
        let cost = self.config.cost(bytes, write);
        let device_full = self.in_flight >= self.config.device_slots;
        let under_share = self.under_share(&self.tenants[i]);
        let room = self.cost_room(&self.tenants[i], cost);
        let (was, w) = self.busy_before(i);
        let t = &mut self.tenants[i];
        t.last_cost = cost;
        if device_full || !under_share || !room {
            return Dispatch::Later;
        }
        let mut until: Option<u64> = None;
        let bytes_bucket = if bytes == 0 {
            None
        } else if write {
            t.write.as_mut().map(|b| (b, bytes))
        } else {
            t.read.as_mut().map(|b| (b, bytes))
        };
        for (b, n) in t.iops.as_mut().map(|b| (b, 1)).into_iter().chain(bytes_bucket) {
            b.refill(now);
            until = until.max(b.ready_at(now, n));
        }
        if let Some(until) = until {
            t.throttled_since.get_or_insert(now);
            t.throttled_until = until;
            self.throttled_max = self.throttled_max.max(until);
            return Dispatch::Wait { until_ns: until };
        }
        if t.deficit < cost {
            return Dispatch::Later;
        }
        t.end_throttle(now);
        t.throttled_until = t.throttled_until.min(now);
        t.deficit -= cost;
        if let Some(b) = t.iops.as_mut() {
            b.charge(1);
        }
        let s = &mut t.stats;
        if write {
            if let Some(b) = t.write.as_mut() {
                b.charge(bytes);
            }
            s.write_bytes += bytes;
        } else {
            if let Some(b) = t.read.as_mut() {
                b.charge(bytes);
            }
            s.read_bytes += bytes;
        }
        s.dispatched += 1;
        s.dispatched_cost += cost;
        s.in_flight += 1;
        t.cost_in_flight += cost;
        t.linger_until = None;
        self.in_flight += 1;
        self.busy_after(i, was, w);
        Dispatch::Go
    }

    /// A request of this tenant completed (`bytes` and `write` as it was dispatched with): its
    /// slot and its cost at the device are free again.
    ///
    /// # Panics
    /// If the tenant has nothing in flight.
    pub fn complete(&mut self, id: TenantId, bytes: u64, write: bool) {
        let cost = self.config.cost(bytes, write);
        self.complete_cost(id, cost);
    }

    /// Tests: a request of a tenant whose requests all cost the same completed.
    #[cfg(test)]
    fn complete_uniform(&mut self, id: TenantId) {
        let t = &self.tenants[self.index(id)];
        let cost = t.cost_in_flight / u64::from(t.stats.in_flight.max(1));
        self.complete_cost(id, cost);
    }

    fn complete_cost(&mut self, id: TenantId, cost: u64) {
        let i = self.index(id);
        let (was, w) = self.busy_before(i);
        let t = &mut self.tenants[i];
        assert!(t.stats.in_flight > 0, "completion without a request in flight");
        t.stats.in_flight -= 1;
        t.cost_in_flight = t.cost_in_flight.saturating_sub(cost);
        if t.stats.in_flight == 0 {
            t.cost_in_flight = 0;
            if !t.active && self.config.linger_ns > 0 && t.linger_until.replace(0) != Some(0) {
                self.linger_starts.push(i);
            }
        }
        self.in_flight -= 1;
        self.busy_after(i, was, w);
    }

    /// Whether [`try_dispatch`](Self::try_dispatch) could let this tenant go now as far as
    /// its limits, queue-depth cap, slot share and the device queue go (its deficit aside):
    /// for a caller deciding whether to sleep.
    pub fn can_dispatch(&self, id: TenantId, now: u64) -> bool {
        let t = &self.tenants[self.index(id)];
        self.in_flight < self.config.device_slots
            && t.throttled_until <= now
            && self.under_share(t)
            && self.cost_room(t, t.last_cost)
    }

    /// A tenant's figures.
    pub fn stats(&self, id: TenantId) -> TenantStats {
        let t = &self.tenants[self.index(id)];
        TenantStats { deficit: t.deficit, ..t.stats }
    }

    /// Most device slots the tenant may hold now, were it to dispatch (see the module docs).
    pub fn slot_share(&self, id: TenantId) -> u32 {
        self.share_of(&self.tenants[self.index(id)])
    }

    /// Whether the tenant may take one more of the `pool` segment list slots its thread has:
    /// as with device slots, at most its weight's share while others are busy (at least one),
    /// so one tenant's vectored requests cannot hold them all.
    pub fn vec_room(&self, id: TenantId, pool: u32) -> bool {
        let t = &self.tenants[self.index(id)];
        let share = u64::from(pool) * u64::from(self.share_of(t)) / u64::from(self.config.device_slots);
        u64::from(t.vec_slots) < share.max(1)
    }

    /// A vectored request of the tenant took a segment list slot ([`Scheduler::vec_room`]).
    pub fn vec_taken(&mut self, id: TenantId) {
        let i = self.index(id);
        self.tenants[i].vec_slots += 1;
    }

    /// A vectored request of the tenant completed and gave its slot back.
    pub fn vec_given_back(&mut self, id: TenantId) {
        let i = self.index(id);
        let t = &mut self.tenants[i];
        t.vec_slots = t.vec_slots.saturating_sub(1);
    }

    /// The earliest time after `now` at which a tenant with work stops being held by a limit,
    /// if any: when to wake up if [`next_tenant`](Self::next_tenant) found nobody and no
    /// completion is pending.
    pub fn next_wakeup(&self, now: u64) -> Option<u64> {
        if now >= self.throttled_max {
            return None; // every hold has ended
        }
        self.tenants
            .iter()
            .filter(|(_, t)| t.active && t.throttled_until > now)
            .map(|(_, t)| t.throttled_until)
            .min()
    }

    /// Requests in flight, all tenants.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Number of tenants.
    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    fn index(&self, id: TenantId) -> usize {
        let i = id.index as usize;
        match self.tenants.get(i) {
            Some(t) if t.generation == id.generation => i,
            _ => panic!("unknown tenant {id:?}"),
        }
    }

    /// The busy weight with `t` counted in.
    fn busy_total(&self, t: &Tenant) -> u64 {
        if busy(t) {
            self.busy_weight
        } else {
            self.busy_weight + t.weight
        }
    }

    /// Whether `t` may hold one more device slot: below its queue-depth cap and its share.
    /// (Both are at least 1, so a tenant with nothing in flight always may: no division then.)
    fn under_share(&self, t: &Tenant) -> bool {
        t.stats.in_flight == 0 || t.stats.in_flight < t.max_in_flight.min(self.share_of(t))
    }

    fn share_of(&self, t: &Tenant) -> u32 {
        let share = u64::from(self.config.device_slots) * t.weight / self.busy_total(t).max(1);
        u32::try_from(share).unwrap_or(u32::MAX).max(1)
    }

    /// Whether `t` may add a request of `cost` at the device: always if it has none there or no
    /// other tenant is busy; else while its cost there stays within its weight's part of
    /// [`SchedConfig::contended_cost`].
    fn cost_room(&self, t: &Tenant, cost: u64) -> bool {
        let others = self.busy - u32::from(busy(t));
        if t.cost_in_flight == 0 || others == 0 {
            return true;
        }
        if self.config.contended_cost == u64::MAX {
            return true;
        }
        let budget =
            u128::from(self.config.contended_cost) * u128::from(t.weight) / u128::from(self.busy_total(t));
        u128::from(t.cost_in_flight + cost) <= budget
    }

    /// Ends the linger of tenants idle for long enough (and starts the clock of those that just
    /// became idle).
    fn expire_lingering(&mut self, now: u64) {
        // Called every round: lingers that started are given their end; every tenant is looked
        // at only once one may have ended.
        let until = now.saturating_add(self.config.linger_ns).max(1);
        for i in self.linger_starts.drain(..) {
            if let Some(t) = self.tenants.get_mut(i).filter(|t| t.linger_until == Some(0)) {
                t.linger_until = Some(until);
                self.linger_next = self.linger_next.min(until);
            }
        }
        if now < self.linger_next {
            return;
        }
        let mut ended = Vec::new();
        let mut next = u64::MAX;
        for (i, t) in self.tenants.iter() {
            match t.linger_until {
                Some(until) if until <= now => ended.push(i),
                Some(until) => next = next.min(until),
                None => {}
            }
        }
        self.linger_next = next;
        for i in ended {
            let (was, w) = self.busy_before(i);
            self.tenants[i].linger_until = None;
            self.busy_after(i, was, w);
        }
    }

    /// Whether tenant `i` is busy now, and its weight (before a change).
    fn busy_before(&self, i: usize) -> (bool, u64) {
        let t = &self.tenants[i];
        (busy(t), t.weight)
    }

    /// Accounts tenant `i`'s busy state after a change (`was`, `weight`: before it).
    fn busy_after(&mut self, i: usize, was: bool, weight: u64) {
        let t = &self.tenants[i];
        let (now, w) = (busy(t), t.weight);
        if was {
            self.busy_weight -= weight;
            self.busy -= 1;
        }
        if now {
            self.busy_weight += w;
            self.busy += 1;
        }
    }

    /// Puts a tenant at the end of the round (before the cursor).
    fn link(&mut self, i: usize) {
        if self.tenants[i].active {
            return;
        }
        let (was, w) = self.busy_before(i);
        if self.cursor == NIL {
            let t = &mut self.tenants[i];
            (t.prev, t.next) = (i, i);
            self.cursor = i;
        } else {
            let c = self.cursor;
            let p = self.tenants[c].prev;
            (self.tenants[i].prev, self.tenants[i].next) = (p, c);
            self.tenants[p].next = i;
            self.tenants[c].prev = i;
        }
        self.tenants[i].active = true;
        self.active_weight += self.tenants[i].weight;
        self.busy_after(i, was, w);
    }

    fn unlink(&mut self, i: usize) {
        if !self.tenants[i].active {
            return;
        }
        let (was, w) = self.busy_before(i);
        let linger = self.config.linger_ns > 0;
        let t = &mut self.tenants[i];
        if t.stats.in_flight == 0 && linger && t.linger_until.replace(0) != Some(0) {
            self.linger_starts.push(i);
        }
        let (p, n) = (t.prev, t.next);
        (t.prev, t.next, t.active) = (NIL, NIL, false);
        self.active_weight -= t.weight;
        if n == i {
            self.cursor = NIL;
        } else {
            self.tenants[p].next = n;
            self.tenants[n].prev = p;
            if self.cursor == i {
                self.cursor = n;
            }
        }
        self.busy_after(i, was, w);
    }
}

/// Busy: with work waiting, or with requests at the device, or had some a moment ago.
fn busy(t: &Tenant) -> bool {
    t.active || t.stats.in_flight > 0 || t.linger_until.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_id_map_finds_every_id_and_spreads_them() {
        let mut m: TenantIdMap<u32> = TenantIdMap::default();
        let ids: Vec<TenantId> =
            (0..4096u32).map(|i| TenantId { index: i % 512, generation: i / 512 }).collect();
        for (n, id) in ids.iter().enumerate() {
            assert!(m.insert(*id, n as u32).is_none(), "two ids taken for one");
        }
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(m.get(id), Some(&(n as u32)));
        }
        // The low bits pick the bucket: consecutive ids must not pile into a few.
        use std::hash::BuildHasher;
        let b = std::hash::BuildHasherDefault::<TenantIdHasher>::default();
        let buckets: std::collections::HashSet<u64> =
            ids[..512].iter().map(|id| b.hash_one(id) & 1023).collect();
        assert!(buckets.len() > 300, "512 ids in {} of 1024 buckets", buckets.len());
    }
    use proptest::prelude::*;

    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    fn weighted(weight: u32) -> TenantLimits {
        TenantLimits { weight, ..TenantLimits::default() }
    }

    /// A tenant's backlog: endless requests, all alike.
    #[derive(Debug, Clone, Copy)]
    struct Load {
        bytes: u64,
        write: bool,
    }

    const READ_4K: Load = Load { bytes: 4 << 10, write: false };
    const READ_64K: Load = Load { bytes: 64 << 10, write: false };
    const READ_128K: Load = Load { bytes: 128 << 10, write: false };
    const WRITE_8K: Load = Load { bytes: 8 << 10, write: true };
    const WRITE_128K: Load = Load { bytes: 128 << 10, write: true };

    fn load_of(loads: &[(TenantId, Load)], t: TenantId) -> Load {
        loads.iter().find(|(id, _)| *id == t).expect("a tenant with a load").1
    }

    /// Visits tenants until none can dispatch now (the device queue is full, or every tenant is
    /// held), calling `go` for each request dispatched. Every tenant in `loads` has work.
    fn fill(
        s: &mut Scheduler,
        now: u64,
        loads: &[(TenantId, Load)],
        mut go: impl FnMut(&mut Scheduler, TenantId),
    ) {
        let mut visits = 0;
        while let Some(t) = s.next_tenant(now) {
            let l = load_of(loads, t);
            while s.try_dispatch(t, now, l.bytes, l.write) == Dispatch::Go {
                go(s, t);
            }
            visits += 1;
            assert!(visits < 1_000_000, "no progress");
        }
    }

    /// `n` visits with a device that completes every request at once; returns the tenants
    /// visited and how many requests each visit dispatched.
    fn visits(s: &mut Scheduler, now: u64, loads: &[(TenantId, Load)], n: usize) -> Vec<(TenantId, u32)> {
        let mut seen = Vec::new();
        for _ in 0..n {
            let Some(t) = s.next_tenant(now) else { break };
            let l = load_of(loads, t);
            let mut went = 0;
            while s.try_dispatch(t, now, l.bytes, l.write) == Dispatch::Go {
                s.complete_uniform(t);
                went += 1;
            }
            seen.push((t, went));
        }
        seen
    }

    /// A device that serves its commands in parallel: each tick moves every command in flight
    /// on by `per_slot` cost units (NVMe SSDs work on many commands at once).
    struct Device {
        per_slot: u64,
        running: Vec<(TenantId, u64)>,
    }

    impl Device {
        fn new(per_slot: u64) -> Self {
            Self { per_slot, running: Vec::new() }
        }

        fn submit(&mut self, s: &Scheduler, t: TenantId, l: Load) {
            self.running.push((t, s.config().cost(l.bytes, l.write)));
        }

        fn tick(&mut self, s: &mut Scheduler) {
            let per_slot = self.per_slot;
            self.running.retain_mut(|(t, left)| {
                *left = left.saturating_sub(per_slot);
                if *left == 0 {
                    s.complete_uniform(*t);
                }
                *left > 0
            });
        }
    }

    /// Runs `ticks` ticks of `tick_ns` against a [`Device`], every tenant saturated.
    fn saturate(s: &mut Scheduler, dev: &mut Device, loads: &[(TenantId, Load)], ticks: u64, tick_ns: u64) {
        for k in 0..ticks {
            dev.tick(s);
            fill(s, k * tick_ns, loads, |s, t| dev.submit(s, t, load_of(loads, t)));
        }
    }

    /// Offers one request of the only tenant with work, visiting it as often as its deficit
    /// needs.
    fn offer(s: &mut Scheduler, t: TenantId, now: u64, bytes: u64, write: bool) -> Dispatch {
        for _ in 0..100 {
            match s.try_dispatch(t, now, bytes, write) {
                Dispatch::Later => assert_eq!(s.next_tenant(now), Some(t)),
                d => return d,
            }
        }
        panic!("never dispatched");
    }

    fn cost_fraction(s: &Scheduler, a: TenantId, b: TenantId) -> f64 {
        let (ca, cb) = (s.stats(a).dispatched_cost as f64, s.stats(b).dispatched_cost as f64);
        ca / (ca + cb)
    }

    #[test]
    fn costs_follow_the_documented_model() {
        let c = SchedConfig::new(64);
        assert_eq!(c.cost(4 << 10, false), 16);
        assert_eq!(c.cost(128 << 10, false), 264);
        assert_eq!(c.cost(4 << 10, true), 24);
        assert_eq!(c.cost(128 << 10, true), 520);
        assert_eq!(c.cost(0, true), BASE_COST);
        assert_eq!(c.cost(1, false), BASE_COST + 1);
        assert_eq!(DEFAULT_QUANTUM, 520);
        assert_eq!(SchedConfig { write_cost_percent: 100, ..c.clone() }.cost(128 << 10, true), 264);
        assert_eq!(c.cost(u64::MAX, true), BASE_COST + (1 << 56));
        assert_eq!(SchedConfig { write_cost_percent: u32::MAX, ..c }.cost(u64::MAX, true), u64::MAX);
    }

    #[test]
    fn weights_one_to_three_split_the_cost_25_75() {
        let pairs = [(READ_4K, READ_4K), (READ_4K, WRITE_128K), (WRITE_128K, READ_4K), (READ_64K, WRITE_8K)];
        for (la, lb) in pairs {
            // A device that completes at once: only the round robin decides.
            let mut s = Scheduler::new(SchedConfig::new(1024));
            let (a, b) = (s.add_tenant(weighted(1)), s.add_tenant(weighted(3)));
            s.set_has_work(a, true);
            s.set_has_work(b, true);
            visits(&mut s, 0, &[(a, la), (b, lb)], 20_000);
            let f = cost_fraction(&s, a, b);
            assert!((f - 0.25).abs() < 0.02, "{la:?} vs {lb:?}: a got {f}");

            // A parallel device with a queue of 64: both the rounds and the slot shares count.
            let mut s = Scheduler::new(SchedConfig::new(64));
            let (a, b) = (s.add_tenant(weighted(1)), s.add_tenant(weighted(3)));
            s.set_has_work(a, true);
            s.set_has_work(b, true);
            // (8 units per tick divides every cost here: no capacity lost to the ticks.)
            let mut dev = Device::new(8);
            saturate(&mut s, &mut dev, &[(a, la), (b, lb)], 20_000, 50 * US);
            let f = cost_fraction(&s, a, b);
            assert!((f - 0.25).abs() < 0.02, "device, {la:?} vs {lb:?}: a got {f}");
        }
    }

    /// Runs one tenant with a device that completes at once, from 0 to `end`, with ticks drawn
    /// by `tick`; returns its figures.
    fn run_limited(limits: TenantLimits, load: Load, end: u64, mut tick: impl FnMut() -> u64) -> TenantStats {
        let mut s = Scheduler::new(SchedConfig::new(1024));
        let t = s.add_tenant(limits);
        s.set_has_work(t, true);
        let mut now = 0;
        while now <= end {
            fill(&mut s, now, &[(t, load)], |s, t| s.complete_uniform(t));
            now += tick();
        }
        s.stats(t)
    }

    /// xorshift64: irregular ticks without a dependency.
    fn rng(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// Draws the next tick length.
    type Tick = Box<dyn FnMut() -> u64>;

    #[test]
    fn iops_limit_holds_whatever_the_tick() {
        let limits = TenantLimits { iops: Some(20_000), ..TenantLimits::default() };
        let mut r = rng(0x9e37_79b9_7f4a_7c15);
        let mut r2 = rng(12345);
        let ticks: [(&str, Tick); 3] = [
            ("1 ms", Box::new(|| MS)),
            ("0-3 ms", Box::new(move || r() % (3 * MS))),
            ("0-20 us", Box::new(move || r2() % (20 * US))),
        ];
        for (name, tick) in ticks {
            let st = run_limited(limits, READ_4K, 10 * S, tick);
            // Exactly: the full bucket (10 ms, 200 requests) plus 20k per second.
            assert!(st.dispatched <= 200_200, "{name}: {}", st.dispatched);
            assert!(st.dispatched.abs_diff(200_000) <= 2_000, "{name}: {}", st.dispatched);
            assert!(st.throttled_ns > 9 * S, "{name}: throttled {}", st.throttled_ns);
        }
    }

    #[test]
    fn byte_limits_hold_for_128k_requests() {
        let mut r = rng(7);
        for (name, load, limits, rate) in [
            (
                "read",
                READ_128K,
                TenantLimits { read_bytes_per_s: Some(50_000_000), ..TenantLimits::default() },
                50e6,
            ),
            (
                "write",
                WRITE_128K,
                TenantLimits { write_bytes_per_s: Some(20_000_000), ..TenantLimits::default() },
                20e6,
            ),
        ] {
            for irregular in [false, true] {
                let st = run_limited(limits, load, 10 * S, || if irregular { r() % (2 * MS) } else { MS });
                let moved = (st.read_bytes + st.write_bytes) as f64;
                assert!((moved / (rate * 10.0) - 1.0).abs() < 0.01, "{name}: moved {moved}");
                // Depth 10 ms of the rate; at most rate * t + depth.
                assert!(moved <= rate * 10.0 + rate / 100.0, "{name}: moved {moved}");
            }
        }
        // A read limit does not hold writes, nor a write limit reads.
        let mut s = Scheduler::new(SchedConfig::new(1024));
        let t = s.add_tenant(TenantLimits {
            read_bytes_per_s: Some(1),
            write_bytes_per_s: Some(1),
            ..TenantLimits::default()
        });
        s.set_has_work(t, true);
        assert_eq!(offer(&mut s, t, 0, 128 << 10, false), Dispatch::Go); // the full bucket
        assert_eq!(offer(&mut s, t, 0, 128 << 10, true), Dispatch::Go);
        assert!(matches!(s.try_dispatch(t, 0, 512, false), Dispatch::Wait { .. }));
        assert!(matches!(s.try_dispatch(t, 0, 512, true), Dispatch::Wait { .. }));
        // A request moving no data is held by the iops limit only.
        assert_eq!(offer(&mut s, t, 0, 0, true), Dispatch::Go);
    }

    #[test]
    fn burst_after_idle_is_bounded() {
        // 1000 IOPS: a 10-request bucket.
        let mut s = Scheduler::new(SchedConfig::new(1024));
        let t = s.add_tenant(TenantLimits { iops: Some(1000), ..TenantLimits::default() });
        s.set_has_work(t, true);
        let load = [(t, READ_4K)];
        for k in 0..=1000 {
            fill(&mut s, k * MS, &load, |s, t| s.complete_uniform(t));
        }
        let before = s.stats(t).dispatched;
        assert!(before <= 1010);
        // Idle for a second, then all it may at once: the bucket, no more.
        let start = 2 * S;
        fill(&mut s, start, &load, |s, t| s.complete_uniform(t));
        assert_eq!(s.stats(t).dispatched - before, 10);
        let mut now = start;
        let mut r = rng(99);
        while now < start + S {
            now += r() % (2 * MS);
            fill(&mut s, now, &load, |s, t| s.complete_uniform(t));
            let allowed = 10 + 1000 * (now - start) / S;
            assert!(s.stats(t).dispatched - before <= allowed, "at {now}");
        }

        // 100 MB/s of reads: a 1 MB bucket (10 ms), so 244 reads of 4 KiB at once after idling.
        let mut s = Scheduler::new(SchedConfig::new(1024));
        let t = s.add_tenant(TenantLimits { read_bytes_per_s: Some(100_000_000), ..TenantLimits::default() });
        s.set_has_work(t, true);
        let load = [(t, READ_4K)];
        fill(&mut s, 0, &load, |s, t| s.complete_uniform(t));
        assert_eq!(s.stats(t).dispatched, 1_000_000 / 4096);
        fill(&mut s, S, &load, |s, t| s.complete_uniform(t));
        let second = s.stats(t).dispatched;
        // One second on: the leftover 576 bytes plus a full bucket, never the second's worth.
        assert_eq!(second, 2 * (1_000_000 / 4096));
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_into_debt() {
        let mut s = Scheduler::new(SchedConfig::new(64));
        let t = s.add_tenant(TenantLimits { read_bytes_per_s: Some(100_000), ..TenantLimits::default() });
        s.set_has_work(t, true);
        let mib = 1 << 20;
        // The bucket holds 128 KiB (10 ms of 100 KB/s is less); 1 MiB still goes when it is full.
        assert_eq!(offer(&mut s, t, 0, mib, false), Dispatch::Go);
        assert_eq!(s.stats(t).read_bytes, mib);
        s.complete_uniform(t);
        // Now in debt by 1 MiB - 128 KiB: a 4 KiB read waits until the debt is paid and 4 KiB more.
        let small = (mib - (128 << 10) + 4096) * S / 100_000;
        assert_eq!(s.try_dispatch(t, 0, 4096, false), Dispatch::Wait { until_ns: small });
        // The next 1 MiB waits until the bucket is full again: 10.49 s.
        let big = mib * S / 100_000;
        assert_eq!(s.try_dispatch(t, S, mib, false), Dispatch::Wait { until_ns: big });
        assert_eq!(s.next_tenant(big - 1), None);
        assert_eq!(s.next_wakeup(0), Some(big));
        assert_eq!(s.try_dispatch(t, big - 1, mib, false), Dispatch::Wait { until_ns: big });
        assert_eq!(s.stats(t).throttled_ns, 0); // still held
        assert_eq!(offer(&mut s, t, big, mib, false), Dispatch::Go);
        // Held from the first `Wait` at 0 to the `Go` at `big`.
        assert_eq!(s.stats(t).throttled_ns, big);
    }

    #[test]
    fn a_busy_tenant_alone_gets_everything() {
        for weight in [1, 7, 1000] {
            let mut s = Scheduler::new(SchedConfig::new(64));
            let busy = s.add_tenant(weighted(weight));
            let idle = s.add_tenant(weighted(1000));
            let _gone = s.add_tenant(weighted(5));
            s.set_has_work(busy, true);
            let mut dev = Device::new(40);
            let loads = [(busy, WRITE_128K), (idle, READ_4K)];
            saturate(&mut s, &mut dev, &loads, 2_000, 50 * US);
            // It fills the whole queue, every tick: the device never waits for it.
            assert_eq!(s.in_flight(), 64);
            let cost = s.stats(busy).dispatched_cost;
            let capacity = 2_000 * 64 * 40;
            assert!(cost >= capacity, "weight {weight}: {cost} of {capacity}");
            assert_eq!(s.stats(idle), TenantStats::default());
        }
        // The others' limits do not hold it back either.
        let mut s = Scheduler::new(SchedConfig::new(1024));
        let busy = s.add_tenant(weighted(1));
        let held = s.add_tenant(TenantLimits { weight: 100, iops: Some(1000), ..TenantLimits::default() });
        s.set_has_work(busy, true);
        s.set_has_work(held, true);
        let seen = visits(&mut s, 0, &[(busy, READ_4K), (held, READ_4K)], 100);
        assert_eq!(seen.len(), 100);
        assert_eq!(s.stats(held).dispatched, 10);
        assert!(seen[2..].iter().all(|&(t, _)| t == busy));
    }

    #[test]
    fn idle_tenants_earn_no_credit() {
        let mut s = Scheduler::new(SchedConfig::new(64));
        let a = s.add_tenant(weighted(3));
        s.set_has_work(a, true);
        assert_eq!(s.next_tenant(0), Some(a));
        assert_eq!(s.stats(a).deficit, 3 * DEFAULT_QUANTUM);
        // Visits without asking for anything: one grant, no more.
        for _ in 0..10 {
            s.next_tenant(0);
        }
        assert_eq!(s.stats(a).deficit, 3 * DEFAULT_QUANTUM);
        s.set_has_work(a, false);
        assert_eq!(s.stats(a).deficit, 0);
        assert_eq!(s.next_tenant(0), None);
    }

    #[test]
    fn a_tenant_with_requests_at_the_device_counts_for_the_slot_shares() {
        let mut s = Scheduler::new(SchedConfig::new(32));
        let writer = s.add_tenant(TenantLimits::default());
        let reader = s.add_tenant(TenantLimits::default());
        // The reader's one request is at the device; it has nothing waiting.
        s.set_has_work(reader, true);
        assert_eq!(s.next_tenant(0), Some(reader));
        assert_eq!(s.try_dispatch(reader, 0, 4096, false), Dispatch::Go);
        s.set_has_work(reader, false);
        // The writer alone has work, but the reader is busy: half the slots each.
        s.set_has_work(writer, true);
        assert_eq!(s.slot_share(writer), 16);
        s.complete(reader, 4096, false);
        // It still counts for a moment (a QD1 client between two requests), then no more.
        s.next_tenant(0);
        assert_eq!(s.slot_share(writer), 16, "the reader lingers");
        s.next_tenant(DEFAULT_LINGER_NS + 1);
        assert_eq!(s.slot_share(writer), 32, "the reader is idle again");
    }

    #[test]
    fn each_linger_ends_at_its_own_time_and_a_removed_tenant_stops_counting() {
        const L: u64 = DEFAULT_LINGER_NS;
        let mut s = Scheduler::new(SchedConfig::new(60));
        let w = s.add_tenant(TenantLimits::default());
        let [a, b, c] = [(); 3].map(|()| s.add_tenant(TenantLimits::default()));
        // a, b and c each have one request at the device and nothing waiting.
        for t in [a, b, c] {
            s.set_has_work(t, true);
            assert_eq!(offer(&mut s, t, 0, 4096, false), Dispatch::Go);
            s.set_has_work(t, false);
        }
        s.set_has_work(w, true);
        assert_eq!(s.slot_share(w), 15, "four busy tenants");
        s.complete(a, 4096, false);
        s.next_tenant(0); // a lingers until L
        s.complete(b, 4096, false);
        s.next_tenant(L / 2); // b until L / 2 + L
        s.complete(c, 4096, false);
        s.remove_tenant(c); // c lingered: removed, it counts no more
        assert_eq!(s.slot_share(w), 20);
        s.next_tenant(L - 1);
        assert_eq!(s.slot_share(w), 20, "a and b linger");
        s.next_tenant(L);
        assert_eq!(s.slot_share(w), 30, "a's linger ended, b's not");
        s.next_tenant(L / 2 + L - 1);
        assert_eq!(s.slot_share(w), 30);
        s.next_tenant(L / 2 + L);
        assert_eq!(s.slot_share(w), 60, "only w is busy");
        // A tenant that becomes busy again while it lingers stops lingering, and lingers anew
        // from its next idle time.
        s.set_has_work(w, false);
        s.set_has_work(a, true);
        assert_eq!(offer(&mut s, a, 2 * L, 4096, false), Dispatch::Go);
        s.set_has_work(a, false);
        s.set_has_work(w, true);
        s.complete(a, 4096, false);
        s.next_tenant(3 * L);
        assert_eq!(s.slot_share(w), 30);
        s.next_tenant(4 * L - 1);
        assert_eq!(s.slot_share(w), 30, "lingers from 3L, not from its first linger");
        s.next_tenant(4 * L);
        assert_eq!(s.slot_share(w), 60);
    }

    #[test]
    fn a_contended_cost_cap_keeps_a_heavy_queue_short_beside_a_light_tenant() {
        let mut s = Scheduler::new(SchedConfig { contended_cost: 1024, ..SchedConfig::new(32) });
        let writer = s.add_tenant(TenantLimits::default());
        let reader = s.add_tenant(TenantLimits::default());
        s.set_has_work(writer, true);
        // Alone, the writer may fill the queue.
        let mut n = 0;
        while s.next_tenant(0) == Some(writer) && s.try_dispatch(writer, 0, 128 << 10, true) == Dispatch::Go {
            n += 1;
            if n == 3 {
                break;
            }
        }
        assert_eq!(n, 3);
        for _ in 0..3 {
            s.complete(writer, 128 << 10, true);
        }
        // With the reader busy, the writer keeps at most its part of the cap (here: one write,
        // the least it may always have), so a read never waits behind a deep queue of writes.
        s.set_has_work(reader, true);
        // A round visits both (deficits granted), in whatever order.
        let visited = [s.next_tenant(0), s.next_tenant(0)];
        assert!(visited.contains(&Some(reader)) && visited.contains(&Some(writer)), "{visited:?}");
        assert_eq!(s.try_dispatch(reader, 0, 4096, false), Dispatch::Go);
        assert_eq!(s.try_dispatch(writer, 0, 128 << 10, true), Dispatch::Go);
        assert_eq!(s.try_dispatch(writer, 0, 128 << 10, true), Dispatch::Later);
        s.complete(reader, 4096, false);
        s.set_has_work(reader, false);
        // The reader gone idle (after its linger): the writer may queue deeper again.
        assert_eq!(s.next_tenant(0), None, "the writer is at its part while the reader lingers");
        assert_eq!(s.next_tenant(DEFAULT_LINGER_NS + 1), Some(writer));
        assert_eq!(s.try_dispatch(writer, 0, 128 << 10, true), Dispatch::Go);
    }

    #[test]
    fn a_light_tenant_is_never_starved() {
        let mut s = Scheduler::new(SchedConfig::new(64));
        let light = s.add_tenant(weighted(1));
        let heavy = s.add_tenant(weighted(1000));
        s.set_has_work(light, true);
        s.set_has_work(heavy, true);
        let loads = [(light, WRITE_128K), (heavy, READ_4K)];
        // Every round (two visits) the light tenant dispatches a request, even its largest.
        let seen = visits(&mut s, 0, &loads, 1000);
        for round in seen.chunks(2) {
            assert_eq!(round.len(), 2);
            assert!(round.iter().any(|&(t, n)| t == light && n >= 1), "{round:?}");
        }
        // With a device: the heavy tenant holds 63 of the 64 slots, the light one keeps one and
        // gets a request through every time it completes (a 128 KiB write takes 13 ticks here).
        let mut dev = Device::new(40);
        let mut last = s.stats(light).dispatched;
        for k in 0..200 {
            saturate(&mut s, &mut dev, &loads, 1, 0);
            let _ = k;
            let now = s.stats(light).dispatched;
            if k % 13 == 12 {
                assert!(now > last, "tick {k}");
                last = now;
            }
        }
        assert_eq!(s.stats(light).in_flight, 1);
        assert_eq!(s.stats(heavy).in_flight, 63);
    }

    #[test]
    fn max_in_flight_caps_a_tenant() {
        let mut s = Scheduler::new(SchedConfig::new(64));
        let t = s.add_tenant(TenantLimits { max_in_flight: Some(4), ..TenantLimits::default() });
        s.set_has_work(t, true);
        let mut gone = 0;
        fill(&mut s, 0, &[(t, READ_4K)], |_, _| gone += 1);
        assert_eq!(gone, 4);
        assert_eq!(s.next_tenant(0), None);
        assert_eq!(s.try_dispatch(t, 0, 4096, false), Dispatch::Later);
        s.complete_uniform(t);
        assert_eq!(s.next_tenant(0), Some(t));
        assert_eq!(s.try_dispatch(t, 0, 4096, false), Dispatch::Go);
        assert_eq!(s.try_dispatch(t, 0, 4096, false), Dispatch::Later);
        assert_eq!(s.stats(t).in_flight, 4);
        // 0 is taken as 1.
        let one = s.add_tenant(TenantLimits { max_in_flight: Some(0), ..TenantLimits::default() });
        s.set_has_work(one, true);
        assert_eq!(s.next_tenant(0), Some(one));
        assert_eq!(s.try_dispatch(one, 0, 4096, false), Dispatch::Go);
        assert_eq!(s.try_dispatch(one, 0, 4096, false), Dispatch::Later);
    }

    #[test]
    fn segment_list_slots_are_shared_like_device_slots() {
        let mut s = Scheduler::new(SchedConfig::new(64));
        let a = s.add_tenant(weighted(1));
        let b = s.add_tenant(weighted(3));
        // Alone, a may take the whole pool of 16.
        s.set_has_work(a, true);
        for _ in 0..16 {
            assert!(s.vec_room(a, 16));
            s.vec_taken(a);
        }
        assert!(!s.vec_room(a, 16));
        // b busy too: a's share is a quarter (4), b's three quarters (12).
        s.set_has_work(b, true);
        assert!(!s.vec_room(a, 16));
        for _ in 0..12 {
            s.vec_given_back(a);
        }
        assert!(!s.vec_room(a, 16), "4 held: at its share");
        s.vec_given_back(a);
        assert!(s.vec_room(a, 16));
        assert!(s.vec_room(b, 16));
        // At least one, however small the pool.
        assert!(s.vec_room(b, 1));
    }

    #[test]
    fn device_slots_are_shared_by_weight_among_tenants_with_work() {
        let mut s = Scheduler::new(SchedConfig::new(64));
        let a = s.add_tenant(weighted(1));
        let b = s.add_tenant(weighted(3));
        let loads = [(a, READ_4K), (b, READ_4K)];
        // Alone, a fills the queue.
        s.set_has_work(a, true);
        assert_eq!(s.slot_share(a), 64);
        assert_eq!(s.slot_share(b), 48); // were it to ask
        fill(&mut s, 0, &loads, |_, _| {});
        assert_eq!(s.stats(a).in_flight, 64);
        // b gets work: a may hold a quarter now, and gets nothing more until it is below it.
        s.set_has_work(b, true);
        assert_eq!((s.slot_share(a), s.slot_share(b)), (16, 48));
        assert_eq!(s.next_tenant(0), None); // the queue is full
        for _ in 0..10 {
            s.complete_uniform(a);
        }
        fill(&mut s, 0, &loads, |_, _| {});
        assert_eq!((s.stats(a).in_flight, s.stats(b).in_flight), (54, 10));
        for _ in 0..54 {
            s.complete_uniform(a);
        }
        fill(&mut s, 0, &loads, |_, _| {});
        assert_eq!((s.stats(a).in_flight, s.stats(b).in_flight), (16, 48));
        // At least one slot each, however light.
        let c = s.add_tenant(weighted(1));
        s.set_has_work(c, true);
        s.set_limits(b, 0, weighted(1000));
        assert_eq!((s.slot_share(a), s.slot_share(c)), (1, 1));
        // A removed tenant gives its slots back.
        let st = s.remove_tenant(b);
        assert_eq!(st.in_flight, 48);
        assert_eq!(s.in_flight(), 16);
    }

    #[test]
    fn set_limits_takes_effect_on_the_next_dispatch() {
        let mut s = Scheduler::new(SchedConfig::new(1024));
        let t = s.add_tenant(TenantLimits { iops: Some(1000), ..TenantLimits::default() });
        s.set_has_work(t, true);
        let load = [(t, READ_4K)];
        fill(&mut s, 0, &load, |s, t| s.complete_uniform(t));
        assert_eq!(s.stats(t).dispatched, 10);
        assert_eq!(s.try_dispatch(t, 0, 4096, false), Dispatch::Wait { until_ns: MS });
        // Raised at 0.5 ms: the bucket keeps its level (0.5 requests), the new rate fills the rest.
        s.set_limits(t, MS / 2, TenantLimits { iops: Some(1_000_000), ..TenantLimits::default() });
        assert_eq!(s.next_wakeup(MS / 2), None); // the old wait is cancelled
        assert_eq!(s.try_dispatch(t, MS / 2, 4096, false), Dispatch::Wait { until_ns: MS / 2 + 500 });
        assert_eq!(offer(&mut s, t, MS / 2 + 500, 4096, false), Dispatch::Go);
        assert_eq!(s.stats(t).throttled_ns, MS / 2 + 500);
        s.complete_uniform(t);
        // Lowered: credit above the new depth is dropped, so one second at 10 IOPS allows at
        // most the 1-request bucket and 10 more (10 here: the full bucket overflows until the
        // first tick).
        s.set_limits(t, MS, TenantLimits { iops: Some(10), ..TenantLimits::default() });
        let before = s.stats(t).dispatched;
        for k in 1..=1000 {
            fill(&mut s, MS + k * MS, &load, |s, t| s.complete_uniform(t));
        }
        assert_eq!(s.stats(t).dispatched - before, 10);
        // Lifted while held: goes at once.
        let now = MS + 1000 * MS;
        assert!(matches!(s.try_dispatch(t, now, 4096, false), Dispatch::Wait { .. }));
        s.set_limits(t, now, TenantLimits::default());
        assert_eq!(offer(&mut s, t, now, 4096, false), Dispatch::Go);

        // Debt survives a change of rate, and is repaid at the new one.
        let mut s = Scheduler::new(SchedConfig::new(64));
        let t = s.add_tenant(TenantLimits { write_bytes_per_s: Some(100_000), ..TenantLimits::default() });
        s.set_has_work(t, true);
        assert_eq!(offer(&mut s, t, 0, 1 << 20, true), Dispatch::Go);
        let debt = (1 << 20) - (128 << 10) + 4096;
        s.set_limits(t, 0, TenantLimits { write_bytes_per_s: Some(1_000_000), ..TenantLimits::default() });
        assert_eq!(s.try_dispatch(t, 0, 4096, true), Dispatch::Wait { until_ns: debt * S / 1_000_000 });

        // A new weight changes the share at once.
        let mut s = Scheduler::new(SchedConfig::new(64));
        let a = s.add_tenant(weighted(1));
        let b = s.add_tenant(weighted(1));
        s.set_has_work(a, true);
        s.set_has_work(b, true);
        assert_eq!(s.slot_share(a), 32);
        s.set_limits(a, 0, weighted(3));
        assert_eq!(s.slot_share(a), 48);
        assert_eq!(s.next_tenant(0), Some(a));
        assert_eq!(s.stats(a).deficit, 3 * DEFAULT_QUANTUM);
    }

    #[test]
    fn the_round_visits_tenants_in_turn_and_newcomers_join_the_back() {
        let mut s = Scheduler::new(SchedConfig::new(64));
        let ids: Vec<_> = (0..4).map(|_| s.add_tenant(weighted(1))).collect();
        for &t in &ids[..3] {
            s.set_has_work(t, true);
        }
        assert_eq!(s.next_tenant(0), Some(ids[0]));
        s.set_has_work(ids[3], true);
        let order: Vec<_> = (0..5).map(|_| s.next_tenant(0).unwrap()).collect();
        // As in DRR's FIFO of tenants: ids[0] went to the back when visited, ids[3] behind it.
        assert_eq!(order, [ids[1], ids[2], ids[0], ids[3], ids[1]]);
        s.set_has_work(ids[2], false);
        s.remove_tenant(ids[3]);
        let order: Vec<_> = (0..3).map(|_| s.next_tenant(0).unwrap()).collect();
        assert_eq!(order, [ids[0], ids[1], ids[0]]);
        s.set_has_work(ids[0], false);
        s.set_has_work(ids[1], false);
        assert_eq!(s.next_tenant(0), None);
        assert_eq!(s.tenant_count(), 3);
    }

    #[test]
    #[should_panic(expected = "unknown tenant")]
    fn a_removed_tenant_id_is_refused() {
        let mut s = Scheduler::new(SchedConfig::new(64));
        let t = s.add_tenant(TenantLimits::default());
        s.remove_tenant(t);
        let u = s.add_tenant(TenantLimits::default()); // same slab slot, new generation
        assert_ne!(t, u);
        s.stats(t);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Advance(u64),
        Visit { dispatches: u8 },
        Dispatch { tenant: usize, bytes: u64, write: bool },
        Complete { tenant: usize },
        HasWork { tenant: usize, yes: bool },
    }

    fn op() -> impl Strategy<Value = Op> {
        let bytes = prop_oneof![Just(0u64), 1u64..=4096, Just(128 << 10), 1u64..=(256 << 10)];
        prop_oneof![
            (0u64..3 * MS).prop_map(Op::Advance),
            (0u8..20).prop_map(|dispatches| Op::Visit { dispatches }),
            (0usize..3, bytes, any::<bool>()).prop_map(|(tenant, bytes, write)| Op::Dispatch {
                tenant,
                bytes,
                write
            }),
            (0usize..3).prop_map(|tenant| Op::Complete { tenant }),
            (0usize..3, any::<bool>()).prop_map(|(tenant, yes)| Op::HasWork { tenant, yes }),
        ]
    }

    fn limits() -> impl Strategy<Value = TenantLimits> {
        (
            1u32..10,
            proptest::option::of(prop_oneof![1u64..100, 100u64..50_000]),
            proptest::option::of(prop_oneof![1u64..10_000, 10_000u64..20_000_000]),
            proptest::option::of(prop_oneof![1u64..10_000, 10_000u64..20_000_000]),
            proptest::option::of(1u32..8),
        )
            .prop_map(|(weight, iops, read_bytes_per_s, write_bytes_per_s, max_in_flight)| {
                TenantLimits { weight, iops, read_bytes_per_s, write_bytes_per_s, max_in_flight }
            })
    }

    /// Whether a request of `n` tokens going at `now` keeps within a bucket of `rate` (depth
    /// `DEFAULT_BURST_NS` of it, at least `min_tokens`), given what went before, `(time, n)`:
    /// over every window from an earlier request on, what went in the window plus what this
    /// request needed in the bucket (all of it, or the full depth if it is larger) came from
    /// one depth and the refill: `<= depth + rate * (now - start)`.
    fn within(rate: Option<u64>, min_tokens: u64, went: &[(u64, u64)], n: u64, now: u64) -> bool {
        let Some(rate) = rate else { return true };
        let rate = u128::from(rate.max(1));
        let depth = (rate * u128::from(DEFAULT_BURST_NS)).max(u128::from(min_tokens) * 1_000_000_000);
        let needed = (u128::from(n) * 1_000_000_000).min(depth);
        let mut sum = 0u128;
        went.iter().rev().all(|&(start, m)| {
            sum += u128::from(m) * 1_000_000_000;
            sum + needed <= depth + rate * u128::from(now - start)
        })
    }

    proptest! {
        /// Whatever the arrivals and completions: no tenant over its `max_in_flight` or its slot
        /// share, the device queue never over-full, no limited tenant past `rate * t + depth` over
        /// any window (see `within`), and a `Wait { until }` is honest: asked again then, the
        /// same request is not held.
        #[test]
        fn limits_hold_under_random_sequences(
            slots in 1u32..16,
            lims in proptest::collection::vec(limits(), 3),
            ops in proptest::collection::vec(op(), 1..400),
        ) {
            let mut s = Scheduler::new(SchedConfig::new(slots));
            let ids: Vec<TenantId> = lims.iter().map(|l| s.add_tenant(*l)).collect();
            let mut active = [false; 3];
            let mut now = 0u64;
            // Per tenant, what went: `(time, tokens)` for its iops, read and write buckets.
            let mut went: Vec<[Vec<(u64, u64)>; 3]> = vec![Default::default(); 3];
            let mut try_one = |s: &mut Scheduler, active: &[bool; 3], i: usize, now: u64, bytes: u64, write: bool| {
                let t = ids[i];
                let before = s.stats(t);
                let share = {
                    let w: u64 = (0..3).filter(|&j| active[j] || j == i).map(|j| u64::from(lims[j].weight)).sum();
                    (u64::from(slots) * u64::from(lims[i].weight) / w).max(1) as u32
                };
                let probe = s.clone();
                let d = s.try_dispatch(t, now, bytes, write);
                match d {
                    Dispatch::Go => {
                        let after = s.stats(t);
                        prop_assert!(after.in_flight <= lims[i].max_in_flight.unwrap_or(u32::MAX));
                        prop_assert!(after.in_flight <= share, "{} > share {}", after.in_flight, share);
                        prop_assert!(s.in_flight() <= slots);
                        let w = &mut went[i];
                        prop_assert!(within(lims[i].iops, 1, &w[0], 1, now));
                        w[0].push((now, 1));
                        if bytes > 0 {
                            let (rate, k) =
                                if write { (lims[i].write_bytes_per_s, 2) } else { (lims[i].read_bytes_per_s, 1) };
                            prop_assert!(within(rate, DEFAULT_BURST_MIN_BYTES, &w[k], bytes, now));
                            w[k].push((now, bytes));
                        }
                        prop_assert_eq!(after.deficit, before.deficit - s.config().cost(bytes, write));
                    }
                    Dispatch::Wait { until_ns } => {
                        prop_assert!(until_ns > now);
                        prop_assert_eq!(s.stats(t).dispatched, before.dispatched);
                        let mut p = probe;
                        let again = p.try_dispatch(t, until_ns, bytes, write);
                        prop_assert!(!matches!(again, Dispatch::Wait { .. }), "{:?} at {}", again, until_ns);
                    }
                    Dispatch::Later => prop_assert_eq!(s.stats(t), TenantStats { ..before }),
                }
                Ok(d)
            };
            for op in ops {
                match op {
                    Op::Advance(dt) => now += dt,
                    Op::Visit { dispatches } => {
                        if let Some(t) = s.next_tenant(now) {
                            let i = ids.iter().position(|&x| x == t).unwrap();
                            prop_assert!(active[i]);
                            for k in 0..dispatches {
                                let bytes = [4096, 512, 128 << 10, 0][usize::from(k) % 4];
                                if try_one(&mut s, &active, i, now, bytes, k % 3 == 0)? != Dispatch::Go {
                                    break;
                                }
                            }
                        } else {
                            prop_assert!(s.next_wakeup(now).is_none_or(|w| w > now));
                        }
                    }
                    Op::Dispatch { tenant, bytes, write } => {
                        try_one(&mut s, &active, tenant, now, bytes, write)?;
                    }
                    Op::Complete { tenant } => {
                        if s.stats(ids[tenant]).in_flight > 0 {
                            s.complete_uniform(ids[tenant]);
                        }
                    }
                    Op::HasWork { tenant, yes } => {
                        s.set_has_work(ids[tenant], yes);
                        active[tenant] = yes;
                    }
                }
            }
        }
    }
}
