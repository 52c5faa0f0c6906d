//! Connections still in their handshake (ICReq and the Connect capsule not all received yet):
//! when every connection slot is taken, a new connection pushes out the oldest of them, so
//! peers that connect and say nothing cannot lock hosts out (established connections are never
//! pushed out).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::task::AbortHandle;

use crate::server::lock;

/// The list: each connection's id and, once its task is spawned, what ends it.
type List = Arc<Mutex<VecDeque<(u64, Option<AbortHandle>)>>>;

/// The connections in their handshake, oldest first: an id and, once its task is spawned, what
/// ends it.
#[derive(Debug, Default)]
pub(crate) struct Handshakes {
    list: List,
    next: std::sync::atomic::AtomicU64,
}

/// A connection's place in [`Handshakes`]: it leaves the list by [`InHandshake::finish`] (its
/// Connect is in), or when dropped (the connection ended).
#[derive(Debug)]
pub(crate) struct InHandshake {
    list: List,
    id: u64,
}

impl Drop for InHandshake {
    fn drop(&mut self) {
        lock(&self.list).retain(|(id, _)| *id != self.id);
    }
}

impl Handshakes {
    /// Lists a new connection (its task is named with [`Handshakes::started`]).
    pub(crate) fn begin(&self) -> InHandshake {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.list).push_back((id, None));
        InHandshake { list: self.list.clone(), id }
    }

    /// Names the task serving `h`'s connection (unless it is out of its handshake already).
    pub(crate) fn started(&self, h_id: u64, task: AbortHandle) {
        if let Some(e) = lock(&self.list).iter_mut().find(|(id, _)| *id == h_id) {
            e.1 = Some(task);
        }
    }

    /// Ends the oldest connection still in its handshake; false if there is none.
    pub(crate) fn push_out_oldest(&self) -> bool {
        let mut list = lock(&self.list);
        let Some(i) = list.iter().position(|(_, t)| t.is_some()) else { return false };
        let (_, task) = list.remove(i).expect("found above");
        task.expect("found above").abort();
        true
    }
}

impl InHandshake {
    /// Its id (for [`Handshakes::started`]).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Leaves the list: true if the connection was still in it, false if it was pushed out
    /// meanwhile (its task is being ended: it must not go on).
    pub(crate) fn finish(self) -> bool {
        let mut list = lock(&self.list);
        let listed = list.iter().position(|(id, _)| *id == self.id).map(|i| list.remove(i)).is_some();
        drop(list);
        listed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_started_handshake_is_pushed_out_and_a_finished_one_never() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let h = Handshakes::default();
            let (a, b) = (h.begin(), h.begin());
            let ta = tokio::spawn(std::future::pending::<()>());
            let tb = tokio::spawn(std::future::pending::<()>());
            h.started(a.id(), ta.abort_handle());
            h.started(b.id(), tb.abort_handle());
            // `a` finished its handshake: only `b` may be pushed out.
            assert!(a.finish());
            assert!(h.push_out_oldest());
            assert!(tb.await.unwrap_err().is_cancelled());
            assert!(!ta.is_finished());
            assert!(!h.push_out_oldest(), "nothing left in a handshake");
            assert!(!b.finish(), "a pushed-out connection learns it when it finishes");
            ta.abort();
        });
    }
}
