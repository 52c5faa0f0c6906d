//! Waiting for completions: spinning, yielding the CPU to threads that share it, and sleeping
//! on the completion doorbell with a wake index (the broker writes it only once the CQ holds
//! what the wait needs).

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nvmed_proto::layout::{CLIENT_CQ_WAITING, CLIENT_CQ_WAKE_AT};
use nvmed_proto::wakeup::{
    adapt_poll, announce_sleep, announce_sleep_until, end_sleep, yield_cpu, SharedFlags, YIELD_AFTER,
};

use crate::{session, Completion, Error, NvmeRing, Result};

/// How much longer than its spin budget a wait may go on spinning and yielding (see
/// [`NvmeRing::wait`]) before it sleeps.
const YIELD_WALL_FACTOR: u32 = 16;

/// Whether a wait that began `elapsed` ago, `given` of which other threads ran in its yields,
/// may spin on: its own spinning is within the spin budget, and the whole wait within
/// `YIELD_WALL_FACTOR` times it (threads that all wait, yielding to one another, then sleep
/// too).
fn spinning_allowed(elapsed: Duration, given: Duration, budget: Duration) -> bool {
    elapsed.saturating_sub(given) < budget && elapsed < budget.saturating_mul(YIELD_WALL_FACTOR)
}

impl NvmeRing {
    /// Waits until at least `min` completions were moved into `out` (spinning briefly, see
    /// [`RingOptions::spin`](crate::RingOptions::spin), then sleeping on the completion doorbell, asking the broker to
    /// write it only once the CQ holds what the wait still needs). `None` waits forever. On an error, the completions
    /// already moved into `out` (with a faulted ring: every completion the broker posted) stay
    /// there.
    ///
    /// A broker that went away is reconnected to within the wait ([`crate::Reconnect`]): that
    /// part is bounded by the session's reconnect budget, not by `timeout`.
    pub fn wait(
        &mut self,
        min: usize,
        out: &mut Vec<Completion>,
        timeout: Option<Duration>,
    ) -> Result<usize> {
        let mut got = self.poll(out)?;
        if got >= min {
            // Satisfied at once (a busy ring): no clock read.
            self.spin_paid();
            return Ok(got);
        }
        // Requests queued but not submitted never complete: a wait for them would never end.
        let outstanding = self.pending.len().saturating_sub(self.sq.unpublished() as usize);
        if min - got > outstanding {
            return Err(Error::WaitBeyondOutstanding { wanted: min - got, outstanding });
        }
        // Read at the first clock check (after 64 looks), not now: a wait its first looks
        // satisfy (most of them, for a busy ring) reads no clock. Timeouts and the spin budget
        // count from there, a few microseconds late.
        let mut start: Option<Instant> = None;
        let mut spins = 0u32;
        let mut spun_out = false;
        // Satisfied by the yield made before sleeping (see below).
        let mut last_chance = false;
        // Time this wait's yields gave to other threads: not spent spinning.
        let mut given = Duration::ZERO;
        while got < min {
            // Spin first, reading the clock only every 64 polls, and then also offering the CPU
            // to other threads (see `yield_cpu`).
            spins += 1;
            if !spins.is_multiple_of(64) && !spun_out {
                std::hint::spin_loop();
                got += self.poll(out)?;
                continue;
            }
            let elapsed = start.get_or_insert_with(Instant::now).elapsed();
            if !spun_out && spinning_allowed(elapsed, given, self.spin_now) {
                if self.yield_early || elapsed >= YIELD_AFTER {
                    let d = yield_cpu();
                    // Others were waiting for this CPU: offer it at once next time too.
                    self.yield_early = !d.is_zero();
                    given += d;
                } else {
                    std::hint::spin_loop();
                }
                got += self.poll(out)?;
                continue;
            }
            if !spun_out {
                spun_out = true;
                // Before sleeping, let the threads that share this CPU run once: among many busy
                // threads the completions often come meanwhile, and a wait that needed no sleep
                // lets the ring spin (and yield) again next time, instead of a ring that once
                // slept sleeping for good while its neighbours take turns.
                if self.spin > Duration::ZERO && !yield_cpu().is_zero() {
                    got += self.poll(out)?;
                    if got >= min {
                        last_chance = true;
                        break;
                    }
                }
            }
            // Woken once the CQ holds what this wait needs, not at each completion: many clients
            // sharing few CPUs then sleep through a batch. Never more than is outstanding, nor
            // more than the CQ holds (the broker stops at a full CQ until it is reaped).
            let need = (min - got).min(self.pending.len()).min(self.cq_entries as usize).max(1) as u32;
            let epoch = self.epoch;
            announce_sleep_until(
                &SharedFlags::client(&self.mem),
                CLIENT_CQ_WAITING,
                CLIENT_CQ_WAKE_AT,
                self.cq.head().wrapping_add(need),
            );
            let n = self.poll(out);
            if n.as_ref().map_or(true, |n| got + n >= min) {
                // Done (or failed) without sleeping: stop asking the broker for wakeups.
                end_sleep(&SharedFlags::client(&self.mem), CLIENT_CQ_WAITING | CLIENT_CQ_WAKE_AT);
            }
            let n = n?;
            got += n;
            if got >= min {
                break;
            }
            if n > 0 || self.epoch != epoch {
                // A poll reads one published batch and stops at its end without looking at
                // the slot after it, which the broker may have filled before it saw the bits:
                // only a look that finds nothing makes sleeping safe. Look again (announcing
                // the index anew) before sleeping. The same if that poll reconnected to a
                // restarted broker: the announcement went to the old ring, and the new one
                // would never ring its doorbell.
                continue;
            }
            if let Some(e) = self.fault_error() {
                end_sleep(&SharedFlags::client(&self.mem), CLIENT_CQ_WAITING | CLIENT_CQ_WAKE_AT);
                // The broker posts a closing ring's last completions before its fault word:
                // move those that came after the poll above into `out` too, then report it.
                let _ = self.reap(out);
                return Err(e);
            }
            let remaining = match timeout {
                Some(t) => match t.checked_sub(start.get_or_insert_with(Instant::now).elapsed()) {
                    Some(r) => PollTimeout::try_from(r.as_millis().clamp(1, 60_000) as i32).unwrap(),
                    None => {
                        end_sleep(&SharedFlags::client(&self.mem), CLIENT_CQ_WAITING | CLIENT_CQ_WAKE_AT);
                        return Err(Error::Timeout);
                    }
                },
                None => PollTimeout::from(1000u16),
            };
            let mut fds = [
                PollFd::new(self.complete_fd.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.sock.as_fd(), PollFlags::empty()),
            ];
            let _ = poll(&mut fds, remaining);
            let sock_gone = session::hung_up(&fds[1]);
            nvmed_proto::eventfd::drain_doorbell(&self.complete_fd);
            end_sleep(&SharedFlags::client(&self.mem), CLIENT_CQ_WAITING | CLIENT_CQ_WAKE_AT);
            let n = self.poll(out)?;
            got += n;
            // Spin longer next time if spinning for the whole wait (spin and sleep) would have
            // caught these completions, less if not; a wakeup that brought none (a signal, the
            // fallback timeout, a hang-up) counts as a long wait.
            let waited = if n > 0 { start.get_or_insert_with(Instant::now).elapsed() } else { Duration::MAX };
            self.spin_now = adapt_poll(self.spin_now, waited, self.spin);
            if sock_gone && got < min {
                got += self.recover(out)?;
            }
        }
        if !spun_out || last_chance {
            self.spin_paid();
        }
        Ok(got)
    }

    /// A wait was satisfied without sleeping: spinning pays, allow more of it.
    fn spin_paid(&mut self) {
        self.spin_now = self.spin_now.saturating_mul(2).max(Duration::from_micros(1)).min(self.spin);
    }

    /// The completion doorbell, for a caller that sleeps in its own event loop (epoll) instead of
    /// in [`NvmeRing::wait`]. The broker writes it only while the ring is armed with
    /// [`NvmeRing::arm_completion_fd`], so a busy ring costs no doorbell write per completion.
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        self.complete_fd.as_fd()
    }

    /// Asks the broker to write [`NvmeRing::completion_fd`] at the next completion, then polls
    /// once more (a completion posted just before the request would not write it). Returns how
    /// many completions that poll moved into `out`: when more than zero the ring is disarmed
    /// again and the caller handles them instead of sleeping; when zero it may sleep until the
    /// fd is readable and then calls [`NvmeRing::disarm_completion_fd`].
    ///
    /// A ring the broker faulted fails here, instead of arming a sleep that no completion would
    /// end. A broker that exited (killed, crashed) sets no fault: an event loop that sleeps on
    /// the completion fd alone asks [`NvmeRing::broker_closed`] first, or also watches
    /// [`NvmeRing::control_socket`] for a hang-up (as nvmed-vhost and nvmed-tcp do).
    ///
    /// If its poll reconnected to a restarted broker, the new ring is the one armed, and
    /// [`NvmeRing::completion_fd`] is a new descriptor ([`NvmeRing::connection_epoch`] changed).
    pub fn arm_completion_fd(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        if let Some(e) = self.fault_error() {
            return Err(e);
        }
        let epoch = self.epoch;
        announce_sleep(&SharedFlags::client(&self.mem), CLIENT_CQ_WAITING);
        let n = self.poll(out);
        if !matches!(n, Ok(0)) {
            end_sleep(&SharedFlags::client(&self.mem), CLIENT_CQ_WAITING | CLIENT_CQ_WAKE_AT);
        } else if self.epoch != epoch {
            // The poll reconnected: the ring (and its completion fd) is new and not armed yet.
            return self.arm_completion_fd(out);
        }
        n
    }

    /// Ends a sleep begun with [`NvmeRing::arm_completion_fd`]: empties the doorbell and stops the
    /// broker's wakeups. Poll afterwards.
    pub fn disarm_completion_fd(&mut self) {
        nvmed_proto::eventfd::drain_doorbell(&self.complete_fd);
        end_sleep(&SharedFlags::client(&self.mem), CLIENT_CQ_WAITING | CLIENT_CQ_WAKE_AT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_spins_on_its_own_budget_and_yields_do_not_count() {
        let us = Duration::from_micros;
        // Own spinning within the budget: go on; past it: sleep.
        assert!(spinning_allowed(us(30), Duration::ZERO, us(50)));
        assert!(!spinning_allowed(us(50), Duration::ZERO, us(50)));
        // 200 us waited, 180 of them other threads ran in this wait's yields: 20 us spun.
        assert!(spinning_allowed(us(200), us(180), us(50)));
        // But never past YIELD_WALL_FACTOR budgets of wall time, however much was given away.
        let wall = us(50) * YIELD_WALL_FACTOR;
        assert!(!spinning_allowed(wall, wall, us(50)));
        // No budget: no spinning at all.
        assert!(!spinning_allowed(Duration::ZERO, Duration::ZERO, Duration::ZERO));
    }
}
