//! The memtable in front of the data tree, and what a checkpoint applies.
//!
//! Writing every merged point into sled's B-tree at acknowledgement time cost three tree inserts
//! per point (its point key, the series' cursor, the rewritten minute state), and sled's inserts
//! were three quarters of the node's CPU (docs/benchmarks-history.md). Now an acknowledged
//! write is:
//!
//! 1. its entries (raw key and value, or a deletion) appended to the current write-ahead
//!    generation, a file of checksummed frames (see [`super::wal`]), synced once per group of
//!    requests;
//! 2. the same entries put into the memtable, a sorted map that readers consult before the
//!    data tree, so the write is visible at once.
//!
//! A checkpoint, when a generation holds `checkpoint_bytes` or is `checkpoint_interval` old,
//! freezes the memtable, starts the next generation, and a checkpointer thread applies the
//! frozen map to the data tree and flushes sled: a key rewritten many times within a generation
//! (a series' cursor, its open minute) reaches the B-tree once. Then the generation's file is
//! removed and the frozen map released. At open, every generation still on disk is read back
//! into a frozen map, in order, and checkpointed the same way: replay is idempotent because the
//! entries are whole values applied in the order they were written (a cursor logged as a patch
//! is rebuilt whole from its value earlier in the same generation, see [`super::wal`]).
//!
//! The memtable holds nothing that is not also in a synced write-ahead generation or in the
//! flushed data tree.

use super::wal::Logged;
use std::collections::{btree_map, BTreeMap};
use std::ops::Bound;
use std::sync::{Arc, RwLock};

/// One write of the data tree: a value, or a deletion (`None`).
pub type Entry = (Vec<u8>, Option<Vec<u8>>);

/// Approximate memory of one map entry: its bytes plus the map's per-entry overhead.
fn entry_bytes(key: &[u8], value: &Option<Vec<u8>>) -> usize {
    key.len() + value.as_ref().map_or(0, Vec::len) + 64
}

/// A key of the memtable: its bytes, ordered as bytes are, its first eight bytes kept beside them.
///
/// Keys begin with their kind, vnode and series id (or partition), so two keys nearly always differ
/// in their first eight bytes: comparing those as one big-endian integer settles the comparison
/// without a call to `memcmp`, which each of an insert's two dozen comparisons made (a tenth of the
/// node's instructions under figure 1's load, docs/benchmarks-history.md, step 23). Holding that
/// integer in the key itself, in the map's node, also spares each comparison a visit to the key's
/// bytes elsewhere on the heap (a cache miss, in a memtable of a few hundred thousand keys). The
/// order is exactly the bytes' lexicographic order, so the map is looked up and ranged with plain
/// `&[u8]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// The first eight bytes as a big-endian integer, zero-padded when the key is shorter.
    head: u64,
    bytes: Vec<u8>,
}

impl Key {
    pub fn new(bytes: Vec<u8>) -> Key {
        let mut head = [0u8; 8];
        let n = bytes.len().min(8);
        head[..n].copy_from_slice(&bytes[..n]);
        Key { head: u64::from_be_bytes(head), bytes }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Key) -> std::cmp::Ordering {
        // Different heads differ at a byte both keys have, or where the shorter one was padded
        // with a zero the longer one does not have there: the bytes' order either way. Equal
        // heads (a shared prefix, or a zero against padding) leave it to the bytes.
        self.head.cmp(&other.head).then_with(|| self.bytes.cmp(&other.bytes))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        &self.bytes
    }
}

/// A memtable frozen for a checkpoint.
#[derive(Debug, Default)]
pub struct Frozen {
    /// Every entry, the newest value of each key.
    pub entries: BTreeMap<Key, Option<Vec<u8>>>,
    /// Approximate memory.
    pub bytes: usize,
}

impl Frozen {
    /// Puts an entry (a later put of the same key replaces it).
    pub fn put(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.put_with(key, value, |_, _, _| {});
    }

    /// [`Frozen::put`], first calling `each` with the key, its value in this layer before it
    /// (`None` when absent or deleted), and the new value.
    fn put_with(
        &mut self,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        each: impl FnOnce(&[u8], Option<&[u8]>, Option<&[u8]>),
    ) {
        let added = entry_bytes(&key, &value);
        let value_len = value.as_ref().map_or(0, Vec::len);
        match self.entries.entry(Key::new(key)) {
            btree_map::Entry::Occupied(mut occupied) => {
                each(occupied.key().as_slice(), occupied.get().as_deref(), value.as_deref());
                let previous = occupied.insert(value);
                // The key and the map's overhead were counted already; only the value changes.
                self.bytes = self.bytes + value_len - previous.map_or(0, |v| v.len());
            }
            btree_map::Entry::Vacant(vacant) => {
                each(vacant.key().as_slice(), None, value.as_deref());
                vacant.insert(value);
                self.bytes += added;
            }
        }
    }

    /// Puts an entry read back from the write-ahead log, resolving a patch against the key's
    /// value in this layer (a patch refers to a value of its own generation, read before it).
    pub fn replay(&mut self, key: Vec<u8>, logged: Logged<'_>) -> Result<(), String> {
        let previous = match &logged {
            Logged::Patch { .. } => self.entries.get(key.as_slice()).and_then(|value| value.as_deref()),
            _ => None,
        };
        let value = logged.resolve(previous)?;
        self.put(key, value);
        Ok(())
    }
}

/// What the memtable knows of a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Its newest value.
    Value(Vec<u8>),
    /// Deleted since the data tree was last written.
    Deleted,
    /// Not in the memtable: the data tree has the answer.
    Absent,
}

#[derive(Debug, Default)]
struct Layers {
    active: Frozen,
    /// Frozen maps being checkpointed, oldest first.
    frozen: Vec<Arc<Frozen>>,
}

impl Layers {
    /// The active layer, then the frozen ones from newest to oldest.
    fn newest_first(&self) -> impl Iterator<Item = &Frozen> {
        std::iter::once(&self.active).chain(self.frozen.iter().rev().map(|layer| layer.as_ref()))
    }
}

/// The entries written since the data tree was last checkpointed, newest layer first.
#[derive(Debug, Default)]
pub struct Memtable {
    layers: RwLock<Layers>,
}

impl Memtable {
    /// Puts entries into the active layer.
    #[cfg(test)]
    pub fn apply(&self, entries: impl IntoIterator<Item = Entry>) {
        self.apply_with(entries, |_, _, _| {});
    }

    /// Puts entries into the active layer, first calling `each` with each entry's key, the
    /// key's value in the active layer before it (`None` when absent or deleted), and its value.
    /// The active layer holds exactly the writes of the current write-ahead generation, so that
    /// the writer can log a value as a patch of the one before it ([`super::wal::encode_patch`]).
    pub fn apply_with(
        &self,
        entries: impl IntoIterator<Item = Entry>,
        mut each: impl FnMut(&[u8], Option<&[u8]>, Option<&[u8]>),
    ) {
        let mut layers = self.layers.write().expect("memtable lock");
        for (key, value) in entries {
            layers.active.put_with(key, value, &mut each);
        }
    }

    /// Adds a frozen layer (a generation read back at open), newer than those present.
    pub fn push_frozen(&self, frozen: Arc<Frozen>) {
        self.layers.write().expect("memtable lock").frozen.push(frozen);
    }

    /// Freezes the active layer (it becomes the newest frozen layer) and returns it.
    pub fn freeze(&self) -> Arc<Frozen> {
        let mut layers = self.layers.write().expect("memtable lock");
        let frozen = Arc::new(std::mem::take(&mut layers.active));
        layers.frozen.push(Arc::clone(&frozen));
        frozen
    }

    /// Drops a frozen layer once the data tree holds its entries.
    pub fn release(&self, frozen: &Arc<Frozen>) {
        self.layers.write().expect("memtable lock").frozen.retain(|layer| !Arc::ptr_eq(layer, frozen));
    }

    /// Approximate memory of the active and frozen layers.
    pub fn bytes(&self) -> (usize, usize) {
        let layers = self.layers.read().expect("memtable lock");
        (layers.active.bytes, layers.frozen.iter().map(|layer| layer.bytes).sum())
    }

    /// The newest value of `key`.
    pub fn get(&self, key: &[u8]) -> Lookup {
        let layers = self.layers.read().expect("memtable lock");
        for layer in layers.newest_first() {
            if let Some(value) = layer.entries.get(key) {
                return match value {
                    Some(value) => Lookup::Value(value.clone()),
                    None => Lookup::Deleted,
                };
            }
        }
        Lookup::Absent
    }

    /// The newest entries with keys in the range, in key order, deletions included: the first
    /// `limit` keys of the range (`usize::MAX`: all of them). A copy: a caller walking a large
    /// range takes it a bounded piece at a time.
    /// Empty when `to` is before `from` (`BTreeMap::range` would panic).
    pub fn range(&self, from: Bound<&[u8]>, to: Bound<&[u8]>, limit: usize) -> Vec<Entry> {
        let layers = self.layers.read().expect("memtable lock");
        if limit == 0 || layers.newest_first().all(|layer| layer.entries.is_empty()) || inverted(from, to) {
            return Vec::new();
        }
        // The first `limit` keys of the union are among the first `limit` keys of each layer.
        let mut merged: BTreeMap<&[u8], &Option<Vec<u8>>> = BTreeMap::new();
        for layer in layers.newest_first() {
            for (key, value) in layer.entries.range::<[u8], _>((from, to)).take(limit) {
                merged.entry(key.as_slice()).or_insert(value);
            }
        }
        merged.into_iter().take(limit).map(|(key, value)| (key.to_vec(), value.clone())).collect()
    }
}

/// Whether a range's end comes before its start (or both exclude the one key they name).
fn inverted(from: Bound<&[u8]>, to: Bound<&[u8]>) -> bool {
    match (from, to) {
        (Bound::Included(from), Bound::Included(to)) => from > to,
        (Bound::Included(from) | Bound::Excluded(from), Bound::Included(to) | Bound::Excluded(to)) => from >= to,
        _ => false,
    }
}

/// Merges the data tree's entries of a range with the memtable's (which win), skipping deleted
/// keys; both inputs sorted in the same direction (`reverse` for descending keys).
pub(crate) struct Merged<I: Iterator> {
    tree: std::iter::Peekable<I>,
    overlay: std::iter::Peekable<std::vec::IntoIter<Entry>>,
    reverse: bool,
}

impl<I> Merged<I>
where
    I: Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
{
    /// `overlay` in ascending key order; it is reversed here when `reverse`.
    pub(crate) fn new(tree: I, mut overlay: Vec<Entry>, reverse: bool) -> Merged<I> {
        if reverse {
            overlay.reverse();
        }
        Merged { tree: tree.peekable(), overlay: overlay.into_iter().peekable(), reverse }
    }
}

impl<I> Iterator for Merged<I>
where
    I: Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
{
    type Item = sled::Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering;
        loop {
            let order = match (self.tree.peek(), self.overlay.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) => Ordering::Less,
                (Some(Ok(_)), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(Ok((tree_key, _))), Some((overlay_key, _))) => {
                    let order = tree_key.as_ref().cmp(overlay_key.as_slice());
                    if self.reverse {
                        order.reverse()
                    } else {
                        order
                    }
                }
            };
            match order {
                Ordering::Less => {
                    let entry = self.tree.next().expect("peeked");
                    return Some(entry.map(|(key, value)| (key.to_vec(), value.to_vec())));
                }
                Ordering::Equal | Ordering::Greater => {
                    if order == Ordering::Equal {
                        self.tree.next();
                    }
                    let (key, value) = self.overlay.next().expect("peeked");
                    if let Some(value) = value {
                        return Some(Ok((key, value)));
                    }
                }
            }
        }
    }
}

/// The smallest key after `key`.
pub fn key_after(key: &[u8]) -> Vec<u8> {
    [key, &[0]].concat()
}

/// The smallest key greater than every key starting with `prefix` (`None`: no such key).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys compare as their bytes do: random keys of every length around eight bytes, most
    /// sharing long prefixes, as the store's keys do.
    #[test]
    fn test_key_order_is_the_bytes_order() {
        let mut random = tollgate_rules::fleet::Xorshift::new(11);
        let keys: Vec<Vec<u8>> = (0..400)
            .map(|_| {
                let len = random.below(20) as usize;
                // Few distinct bytes, so that prefixes are shared and ties reach every byte.
                (0..len).map(|_| [0u8, 1, 0x7f, 0x80, 0xff][random.below(5) as usize]).collect()
            })
            .collect();
        for a in &keys {
            for b in &keys {
                assert_eq!(Key::new(a.clone()).cmp(&Key::new(b.clone())), a.cmp(b), "{a:?} against {b:?}");
            }
        }
        let mut frozen = Frozen::default();
        for key in &keys {
            frozen.put(key.clone(), Some(key.clone()));
        }
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(frozen.entries.keys().map(|key| key.as_slice().to_vec()).collect::<Vec<_>>(), sorted);
        for key in &keys {
            assert_eq!(frozen.entries.get(key.as_slice()), Some(&Some(key.clone())));
        }
    }

    #[test]
    fn test_newest_layer_wins_and_deletions_hide_older_values() {
        let memtable = Memtable::default();
        memtable.apply([(b"a".to_vec(), Some(b"1".to_vec())), (b"b".to_vec(), Some(b"1".to_vec()))]);
        let frozen = memtable.freeze();
        memtable.apply([(b"a".to_vec(), Some(b"2".to_vec())), (b"b".to_vec(), None), (b"c".to_vec(), None)]);
        assert_eq!(memtable.get(b"a"), Lookup::Value(b"2".to_vec()));
        assert_eq!(memtable.get(b"b"), Lookup::Deleted);
        assert_eq!(memtable.get(b"z"), Lookup::Absent);
        let range = memtable.range(Bound::Included(b"a"), Bound::Excluded(b"c"), usize::MAX);
        assert_eq!(range, vec![(b"a".to_vec(), Some(b"2".to_vec())), (b"b".to_vec(), None)]);
        // The first keys of a range across both layers, the newest value of each.
        let first = |limit| memtable.range(Bound::Included(b"a"), Bound::Unbounded, limit);
        assert_eq!(first(0), vec![]);
        assert_eq!(first(1), vec![(b"a".to_vec(), Some(b"2".to_vec()))]);
        assert_eq!(first(2), range);
        assert_eq!(first(3), [range.clone(), vec![(b"c".to_vec(), None)]].concat());
        assert_eq!(first(4), first(3));
        assert_eq!(
            memtable.range(Bound::Excluded(b"a"), Bound::Unbounded, 1),
            vec![(b"b".to_vec(), None)],
            "a key only the older layer has a value for, deleted in the newer one"
        );
        // A range whose end is before its start is empty (`BTreeMap::range` panics on it).
        assert_eq!(memtable.range(Bound::Included(b"c"), Bound::Excluded(b"a"), usize::MAX), vec![]);
        assert_eq!(memtable.range(Bound::Excluded(b"b"), Bound::Excluded(b"b"), usize::MAX), vec![]);
        assert_eq!(memtable.range(Bound::Included(b"b"), Bound::Included(b"b"), usize::MAX).len(), 1);
        memtable.release(&frozen);
        assert_eq!(memtable.get(b"a"), Lookup::Value(b"2".to_vec()));
        assert_eq!(memtable.bytes().1, 0);
    }

    #[test]
    fn test_merge_with_the_tree_in_both_directions() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).temporary(true).open().unwrap();
        for key in [b"a", b"c", b"e"] {
            db.insert(key, b"tree".to_vec()).unwrap();
        }
        let overlay = vec![
            (b"b".to_vec(), Some(b"mem".to_vec())),
            (b"c".to_vec(), None),
            (b"e".to_vec(), Some(b"mem".to_vec())),
            (b"f".to_vec(), None),
        ];
        let forward: Vec<(Vec<u8>, Vec<u8>)> =
            Merged::new(db.iter(), overlay.clone(), false).collect::<Result<_, _>>().unwrap();
        let expected =
            vec![(b"a".to_vec(), b"tree".to_vec()), (b"b".to_vec(), b"mem".to_vec()), (b"e".to_vec(), b"mem".to_vec())];
        assert_eq!(forward, expected);
        let backward: Vec<(Vec<u8>, Vec<u8>)> =
            Merged::new(db.iter().rev(), overlay, true).collect::<Result<_, _>>().unwrap();
        assert_eq!(backward, expected.into_iter().rev().collect::<Vec<_>>());
    }

    #[test]
    fn test_prefix_end() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 255]), Some(vec![2]));
        assert_eq!(prefix_end(&[255, 255]), None);
        assert_eq!(key_after(b"ab"), b"ab\0".to_vec());
    }
}
