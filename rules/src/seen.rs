//! The point keys a series accepted within its lateness window ([`SeenKeys`]), kept in the form a
//! cursor is stored in.
//!
//! A series exported every 10 s with the default 10-minute window remembers about 60 keys, and the
//! owner writes the series' cursor with every batch that merges into it. Kept as a `VecDeque` of
//! 16-byte keys, every write walked all of them to encode them again; kept as their encoding, a
//! write copies one contiguous slice, and the keys take about 6 bytes each instead of 16.

use crate::normalize::PointKey;
use crate::varint;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Consumed step bytes kept at the front before they are dropped (then only when they are at
/// least half of the buffer), so that forgetting the oldest key does not move the others each time.
const COMPACT_AFTER: usize = 256;

/// Point keys in ascending order, held as the oldest key and, for each later key, its steps from
/// the key before it: the time step as unsigned LEB128, then the start step (two's complement
/// difference) as zigzag LEB128. These are postcard's encodings of `u64` and `i64`, and the stored
/// cursor's (the node's `codec::encode_cursor` copies [`SeenKeys::steps`]).
///
/// Adding a key at least as new as the newest, and forgetting the oldest, take constant time;
/// looking a key up, or adding one older than the newest, decodes the keys before its place (a
/// retried export or a point out of order), and adding one moves the bytes after it, as a
/// `VecDeque` moved its keys.
///
/// It also remembers the time before which it forgot keys ([`SeenKeys::forgotten_before`]): a
/// point older than that may have been merged, and cannot be told from one that was not. Stored,
/// it is a first key that no point can have, [`SeenKeys::watermark`] (a start after its time).
#[derive(Clone)]
pub struct SeenKeys {
    /// The oldest key; `None` when empty.
    first: Option<PointKey>,
    /// The newest key, when not empty.
    last: PointKey,
    len: usize,
    /// Steps of the keys after the oldest, from `head` on.
    steps: Vec<u8>,
    head: usize,
    /// Keys with a time before this were forgotten; 0 when none was.
    forgotten_before: u64,
}

impl Default for SeenKeys {
    fn default() -> SeenKeys {
        SeenKeys {
            first: None,
            last: PointKey { time_ns: 0, start_ns: 0 },
            len: 0,
            steps: Vec::new(),
            head: 0,
            forgotten_before: 0,
        }
    }
}

impl SeenKeys {
    /// No keys.
    pub fn new() -> SeenKeys {
        SeenKeys::default()
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The oldest key.
    pub fn front(&self) -> Option<PointKey> {
        self.first
    }

    /// The newest key.
    pub fn back(&self) -> Option<PointKey> {
        self.first.map(|_| self.last)
    }

    /// The keys, oldest first.
    pub fn iter(&self) -> Iter<'_> {
        Iter { next: self.first, remaining: self.len, steps: self.steps() }
    }

    /// The encoded steps of every key after the oldest (see [`SeenKeys`]).
    pub fn steps(&self) -> &[u8] {
        &self.steps[self.head..]
    }

    /// The time before which keys were forgotten (0 when none was): a point older than it may
    /// have been merged already.
    pub fn forgotten_before(&self) -> u64 {
        self.forgotten_before
    }

    /// Records that keys before `time_ns` were forgotten (a watermark read back, or keys left out
    /// when a cursor was read); an earlier time than the one recorded changes nothing.
    pub fn set_forgotten_before(&mut self, time_ns: u64) {
        self.forgotten_before = self.forgotten_before.max(time_ns);
    }

    /// The key a stored [`SeenKeys`] begins with when it forgot keys: its start is after its time
    /// (by one), which no point's is (a point whose start is after its time is rejected), at the
    /// time before the watermark, and never after the oldest key kept, so that the steps from it
    /// stay forward (and short: its start is near the keys'). Read back, it gives its time plus
    /// one as the watermark ([`SeenKeys::watermark_of`]); a node that predates it reads it as a
    /// key no point matches, forgotten in its turn. `None` when no key was forgotten.
    pub fn watermark(&self) -> Option<PointKey> {
        let before = self.forgotten_before.checked_sub(1)?;
        let time_ns = self.first.map_or(before, |first| before.min(first.time_ns));
        Some(PointKey { time_ns, start_ns: time_ns + 1 })
    }

    /// The watermark a stored first key stands for, when it is one ([`SeenKeys::watermark`]).
    pub fn watermark_of(key: PointKey) -> Option<u64> {
        (key.start_ns > key.time_ns).then(|| key.time_ns + 1)
    }

    /// The step from `from` to `to`, as the steps are encoded (for a stored cursor that begins
    /// with a [`SeenKeys::watermark`]).
    pub fn push_step(out: &mut Vec<u8>, from: PointKey, to: PointKey) {
        push_step(out, from, to);
    }

    /// Whether `key` is one of the keys.
    pub fn contains(&self, key: &PointKey) -> bool {
        match self.first {
            Some(first) if first <= *key && *key <= self.last => {
                self.iter().take_while(|k| k <= key).any(|k| k == *key)
            }
            _ => false,
        }
    }

    /// Adds `key` in its place (after the keys equal to it).
    pub fn insert(&mut self, key: PointKey) {
        match self.first {
            None => {
                self.steps.clear();
                self.head = 0;
                self.first = Some(key);
                self.last = key;
                self.len = 1;
            }
            Some(_) if key >= self.last => {
                push_step(&mut self.steps, self.last, key);
                self.last = key;
                self.len += 1;
            }
            Some(first) if key < first => {
                let mut step = Vec::with_capacity(20);
                push_step(&mut step, key, first);
                self.steps.splice(self.head..self.head, step);
                self.first = Some(key);
                self.len += 1;
            }
            Some(first) => {
                // Between the last key not after it and the next one (which exists: `key` is
                // older than the newest): that one step becomes two.
                let (mut previous, mut at) = (first, self.head);
                loop {
                    let (next, used) = step(previous, &self.steps[at..]);
                    if next > key {
                        let mut steps = Vec::with_capacity(40);
                        push_step(&mut steps, previous, key);
                        push_step(&mut steps, key, next);
                        self.steps.splice(at..at + used, steps);
                        break;
                    }
                    previous = next;
                    at += used;
                }
                self.len += 1;
            }
        }
    }

    /// Removes and returns the oldest key.
    pub fn pop_front(&mut self) -> Option<PointKey> {
        let first = self.first?;
        if self.len == 1 {
            self.first = None;
            self.len = 0;
            self.steps.clear();
            self.head = 0;
            return Some(first);
        }
        let (next, used) = step(first, &self.steps[self.head..]);
        self.first = Some(next);
        self.head += used;
        self.len -= 1;
        if self.head >= COMPACT_AFTER && 2 * self.head >= self.steps.len() {
            self.steps.drain(..self.head);
            self.head = 0;
        }
        Some(first)
    }

    /// Forgets the keys whose time is before `oldest_ns` (the oldest ones: keys sort by time), and
    /// remembers that it did.
    pub fn forget_before(&mut self, oldest_ns: u64) {
        while self.first.is_some_and(|k| k.time_ns < oldest_ns) {
            self.pop_front();
            self.forgotten_before = self.forgotten_before.max(oldest_ns);
        }
    }
}

impl FromIterator<PointKey> for SeenKeys {
    fn from_iter<I: IntoIterator<Item = PointKey>>(keys: I) -> SeenKeys {
        let mut seen = SeenKeys::new();
        for key in keys {
            seen.insert(key);
        }
        seen
    }
}

impl PartialEq for SeenKeys {
    fn eq(&self, other: &SeenKeys) -> bool {
        self.len == other.len && self.forgotten_before == other.forgotten_before && self.iter().eq(other.iter())
    }
}

impl Eq for SeenKeys {}

impl fmt::Debug for SeenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.forgotten_before == 0 {
            return f.debug_list().entries(self.iter()).finish();
        }
        f.debug_struct("SeenKeys")
            .field("keys", &self.iter().collect::<Vec<_>>())
            .field("forgotten_before", &self.forgotten_before)
            .finish()
    }
}

/// As a sequence of keys, as the `VecDeque<PointKey>` it replaces, led by the
/// [`SeenKeys::watermark`] when keys were forgotten.
impl Serialize for SeenKeys {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.watermark().into_iter().chain(self.iter()))
    }
}

impl<'de> Deserialize<'de> for SeenKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SeenKeys, D::Error> {
        let mut keys = Vec::<PointKey>::deserialize(deserializer)?.into_iter().peekable();
        let watermark = keys.peek().and_then(|first| SeenKeys::watermark_of(*first));
        if watermark.is_some() {
            keys.next();
        }
        let mut seen: SeenKeys = keys.collect();
        seen.set_forgotten_before(watermark.unwrap_or(0));
        Ok(seen)
    }
}

/// The keys of a [`SeenKeys`], oldest first.
#[derive(Debug)]
pub struct Iter<'a> {
    next: Option<PointKey>,
    remaining: usize,
    steps: &'a [u8],
}

impl Iterator for Iter<'_> {
    type Item = PointKey;

    fn next(&mut self) -> Option<PointKey> {
        let current = self.next?;
        self.remaining -= 1;
        if self.remaining == 0 {
            self.next = None;
        } else {
            let (next, used) = step(current, self.steps);
            self.next = Some(next);
            self.steps = &self.steps[used..];
        }
        Some(current)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Iter<'_> {}

fn push_step(steps: &mut Vec<u8>, from: PointKey, to: PointKey) {
    let start_step = to.start_ns.wrapping_sub(from.start_ns) as i64;
    varint::push(steps, to.time_ns - from.time_ns);
    varint::push(steps, ((start_step << 1) ^ (start_step >> 63)) as u64);
}

/// The key after `from`, from the steps at the start of `bytes`, and the bytes they took.
fn step(from: PointKey, bytes: &[u8]) -> (PointKey, usize) {
    // The steps were written whole by `push_step`.
    let (time_step, a) = varint::read(bytes).expect("a step's time");
    let (zigzag, b) = varint::read(&bytes[a..]).expect("a step's start");
    let start_step = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
    let key = PointKey { time_ns: from.time_ns + time_step, start_ns: from.start_ns.wrapping_add(start_step as u64) };
    (key, a + b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Xorshift;
    use std::collections::VecDeque;

    fn key(time_ns: u64, start_ns: u64) -> PointKey {
        PointKey { time_ns, start_ns }
    }

    /// Postcard's encoding of the steps, written the obvious way.
    fn model_steps(keys: &VecDeque<PointKey>) -> Vec<u8> {
        let mut out = Vec::new();
        for (previous, key) in keys.iter().zip(keys.iter().skip(1)) {
            out.extend(postcard::to_allocvec(&(key.time_ns - previous.time_ns)).unwrap());
            out.extend(postcard::to_allocvec(&(key.start_ns.wrapping_sub(previous.start_ns) as i64)).unwrap());
        }
        out
    }

    fn assert_same(seen: &SeenKeys, model: &VecDeque<PointKey>, context: &str) {
        assert_eq!(seen.len(), model.len(), "{context}");
        assert_eq!(seen.is_empty(), model.is_empty(), "{context}");
        assert_eq!(seen.front(), model.front().copied(), "{context}");
        assert_eq!(seen.back(), model.back().copied(), "{context}");
        assert_eq!(seen.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>(), "{context}");
        assert_eq!(seen.steps(), model_steps(model).as_slice(), "{context}");
    }

    /// Random operations, against a sorted `VecDeque` doing what normalisation did with one:
    /// push the newest, insert older keys at their binary-search place, pop the oldest.
    #[test]
    fn test_seen_keys_match_a_sorted_deque_under_random_operations() {
        let mut random = Xorshift::new(7);
        for round in 0..300 {
            let mut seen = SeenKeys::new();
            let mut model: VecDeque<PointKey> = VecDeque::new();
            // Near the ends of u64 in some rounds, where steps and wrapping differences are widest.
            let base = match round % 3 {
                0 => 1_764_151_200_000_000_000,
                1 => 0,
                _ => u64::MAX - 20_000_000_000_000,
            };
            let mut time = base;
            for op in 0..400 {
                let context = format!("round {round}, operation {op}");
                match random.below(10) {
                    0..=5 => {
                        time += random.below(3) * random.below(20_000_000_000);
                        let start = match random.below(4) {
                            0 => 0,
                            1 => base / 2,
                            2 => u64::MAX - random.below(5),
                            _ => random.below(1_000_000),
                        };
                        let new = key(time, start);
                        seen.insert(new);
                        let position = model.partition_point(|k| *k <= new);
                        model.insert(position, new);
                    }
                    6 => {
                        let older = key(time.saturating_sub(random.below(40_000_000_000)), random.below(3));
                        assert_eq!(seen.contains(&older), model.contains(&older), "{context}");
                        seen.insert(older);
                        let position = model.partition_point(|k| *k <= older);
                        model.insert(position, older);
                    }
                    7 => assert_eq!(seen.pop_front(), model.pop_front(), "{context}"),
                    8 => {
                        let oldest = time.saturating_sub(random.below(60_000_000_000));
                        seen.forget_before(oldest);
                        while model.front().is_some_and(|k| k.time_ns < oldest) {
                            model.pop_front();
                        }
                    }
                    _ => {
                        let probe = match model.get(random.below(model.len() as u64 + 1) as usize) {
                            Some(k) if random.below(2) == 0 => *k,
                            Some(k) => key(k.time_ns, k.start_ns.wrapping_add(1)),
                            None => key(time + 1, 0),
                        };
                        assert_eq!(seen.contains(&probe), model.contains(&probe), "{context}");
                    }
                }
                assert_same(&seen, &model, &context);
            }
        }
    }

    #[test]
    fn test_seen_keys_forget_many_and_start_again() {
        let mut seen = SeenKeys::new();
        for i in 0..10_000u64 {
            seen.insert(key(i * 10_000_000_000, 5));
            seen.forget_before((i * 10_000_000_000).saturating_sub(600_000_000_000));
        }
        assert_eq!(seen.len(), 61);
        assert_eq!(seen.front(), Some(key(9_939 * 10_000_000_000, 5)));
        // The consumed steps were dropped on the way: the buffer holds about the live keys only.
        assert!(seen.steps.len() < 2 * COMPACT_AFTER + 6 * 61, "buffer of {} bytes", seen.steps.len());
        seen.forget_before(u64::MAX);
        assert!(seen.is_empty());
        assert_eq!(seen.back(), None);
        assert!(!seen.contains(&key(9_999 * 10_000_000_000, 5)));
        seen.insert(key(3, 4));
        assert_eq!(seen.iter().collect::<Vec<_>>(), vec![key(3, 4)]);
        assert!(seen.steps().is_empty());
    }

    #[test]
    fn test_seen_keys_serialize_as_a_sequence_of_keys() {
        let keys = vec![key(10, 1), key(20, 1), key(20, 2), key(35, 0)];
        let seen: SeenKeys = keys.iter().copied().collect();
        let bytes = postcard::to_allocvec(&seen).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&keys).unwrap());
        assert_eq!(postcard::from_bytes::<SeenKeys>(&bytes).unwrap(), seen);
        assert_eq!(format!("{seen:?}"), format!("{keys:?}"));
        // Keys forgotten before 10: led by the watermark key, which reads back as the watermark.
        let mut forgot = seen.clone();
        forgot.set_forgotten_before(10);
        let bytes = postcard::to_allocvec(&forgot).unwrap();
        let stored = [vec![key(9, 10)], keys].concat();
        assert_eq!(bytes, postcard::to_allocvec(&stored).unwrap());
        let back = postcard::from_bytes::<SeenKeys>(&bytes).unwrap();
        assert_eq!((back.forgotten_before(), &back), (10, &forgot));
        assert_ne!(back, seen);
    }
}
