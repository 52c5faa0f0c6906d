//! What an I/O queue connection has queued to send, in order, and which commands each part
//! answers: a command's slot and id are free again once the bytes up to the end of its answer
//! are written (the host then has the answer and may give both to a new command at once), also
//! when a write ends inside later answers gathered with it.

use std::collections::VecDeque;

/// One part of what is queued.
#[derive(Debug)]
pub(crate) enum Tx {
    /// PDU bytes, the first `.1` of them written.
    Bytes(Vec<u8>, usize),
    /// `len` bytes of the data buffer at `at`, `sent` of them written.
    Data { at: u64, len: u32, sent: u32 },
}

/// Bytes appended to the last queued PDU bytes, up to this: answers go out in few large writes.
const GATHER: usize = 4096;

/// The send queue of a connection.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    parts: VecDeque<Tx>,
    /// Bytes ever queued, and ever written.
    queued: u64,
    written: u64,
    /// Slots whose answers end at these counts of bytes queued, in order.
    answers: VecDeque<(u64, u16)>,
}

impl Outbox {
    /// Whether nothing is left to write.
    pub(crate) fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The parts left, in order, the written part of the first one included.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Tx> {
        self.parts.iter()
    }

    /// Queues PDU bytes that `f` appends, after the last bytes queued when nothing is queued
    /// after them; `answers`: the slot whose answer they end.
    pub(crate) fn push_bytes(&mut self, f: impl FnOnce(&mut Vec<u8>), answers: Option<u16>) {
        if !matches!(self.parts.back(), Some(Tx::Bytes(v, _)) if v.len() < GATHER) {
            self.parts.push_back(Tx::Bytes(Vec::with_capacity(512), 0));
        }
        let Some(Tx::Bytes(v, _)) = self.parts.back_mut() else { unreachable!("bytes just queued") };
        let before = v.len();
        f(v);
        self.queued += (v.len() - before) as u64;
        if let Some(slot) = answers {
            self.answers.push_back((self.queued, slot));
        }
    }

    /// Queues `len` bytes of the data buffer at `at`.
    pub(crate) fn push_data(&mut self, at: u64, len: u32) {
        self.parts.push_back(Tx::Data { at, len, sent: 0 });
        self.queued += u64::from(len);
    }

    /// `wrote` more bytes went out: drops the parts wholly written and calls `freed` with each
    /// slot whose answer now is.
    pub(crate) fn advance(&mut self, wrote: usize, mut freed: impl FnMut(u16)) {
        self.written += wrote as u64;
        let mut left = wrote;
        while left > 0 {
            let done = match self.parts.front_mut() {
                Some(Tx::Bytes(v, sent)) => {
                    let k = (v.len() - *sent).min(left);
                    *sent += k;
                    left -= k;
                    *sent == v.len()
                }
                Some(Tx::Data { len, sent, .. }) => {
                    let k = ((*len - *sent) as usize).min(left);
                    *sent += k as u32;
                    left -= k;
                    *sent == *len
                }
                None => unreachable!("written bytes beyond the queued PDUs"),
            };
            if done {
                self.parts.pop_front();
            }
        }
        while let Some(&(end, slot)) = self.answers.front() {
            if end > self.written {
                break;
            }
            self.answers.pop_front();
            freed(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_frees_its_slot_once_written_also_inside_a_gathered_write() {
        let mut out = Outbox::default();
        // Three answers of 24 bytes gathered in one write, then 100 bytes of data, then one more.
        for slot in 1..=3u16 {
            out.push_bytes(|v| v.extend_from_slice(&[slot as u8; 24]), Some(slot));
        }
        out.push_data(0, 100);
        out.push_bytes(|v| v.extend_from_slice(&[4; 24]), Some(4));
        assert_eq!(out.iter().count(), 3, "the first three answers are one write");
        let mut freed = Vec::new();
        // The write ends inside the second answer: the first one is the host's, its slot free.
        out.advance(30, |s| freed.push(s));
        assert_eq!(freed, [1]);
        out.advance(18, |s| freed.push(s));
        assert_eq!(freed, [1, 2]);
        // The rest of the third answer and part of the data.
        out.advance(24 + 50, |s| freed.push(s));
        assert_eq!(freed, [1, 2, 3]);
        assert_eq!(out.iter().count(), 2);
        out.advance(50 + 23, |s| freed.push(s));
        assert_eq!(freed, [1, 2, 3], "the last answer is one byte short");
        out.advance(1, |s| freed.push(s));
        assert_eq!(freed, [1, 2, 3, 4]);
        assert!(out.is_empty());
    }
}
