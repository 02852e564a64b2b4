//! The write-ahead log on disk: one append-only file per generation, `<generation:020>.wal` in
//! the store's `wal/` directory, made of frames.
//!
//! A frame is `[payload length: u32][CRC-32 of the payload: u32][payload]` (little-endian), and a
//! payload is one or more whole write requests, so that a request is in the log entirely or not
//! at all:
//!
//! - `0x00` then entries of the data tree;
//! - `0x01`, the `u32` length of the data part, the data tree's entries, then the metadata tree's
//!   entries (a request that changes both, such as a hand-over with its marker).
//!
//! Entries are encoded as [`encode_entry`] and [`encode_patch`] write them: a value, a deletion,
//! or a patch of the value the same key was given earlier in the same generation (a series'
//! cursor, rewritten with every batch that merges into its series, is logged as the bytes that
//! changed: see [`super::codec::cursor_patch`]). A patch never refers to another generation:
//! the writer patches only a value of its active memtable layer, which holds exactly the current
//! generation's writes. The writer appends the frames of a
//! whole group with one `write` and makes them durable with one `fdatasync`: that is the only
//! disk wait of an acknowledgement, whatever the size of the group.
//!
//! A crash can leave the newest generation with a torn tail: a last frame whose length runs past
//! the end or whose CRC does not match, or bytes the file system never wrote (zeros). Those
//! bytes were never acknowledged, and reading stops there. A bad frame that a whole, valid frame
//! follows is not a torn tail: the log went on after it, so it was synced and acknowledged, and
//! that is corruption and an error (as is any bad frame in an older generation, which was
//! complete and synced before the next one was created). An error leaves the file as it is.

use super::memtable::Entry;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Payload kind: entries of the data tree only.
const DATA: u8 = 0;
/// Payload kind: entries of the data tree, then of the metadata tree.
const DATA_AND_META: u8 = 1;
/// Bytes of a frame header.
const HEADER: usize = 8;
/// File name suffix of a generation.
const SUFFIX: &str = ".wal";

/// The value-length word of a deletion.
const DELETED: u32 = u32::MAX;
/// The value-length word of a patch.
const PATCHED: u32 = u32::MAX - 1;

/// Appends one entry: the `u32` key length, the key, then [`DELETED`] for a deletion or the `u32`
/// value length and the value; all big-endian.
pub fn encode_entry(key: &[u8], value: Option<&[u8]>, out: &mut Vec<u8>) {
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    match value {
        Some(value) => {
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
        None => out.extend_from_slice(&DELETED.to_be_bytes()),
    }
}

/// Appends `value` of `key` as a patch of the key's previous value `old`, where `value` is
/// `value[..head]`, then `old[from..from + len]`, then `value[head + len..]`: the `u32` key
/// length, the key, [`PATCHED`], then the `u32`s head length, `from`, `len` and tail length, with
/// the head after the first and the tail after the last; all big-endian.
pub fn encode_patch(key: &[u8], value: &[u8], (head, from, len): (usize, usize, usize), out: &mut Vec<u8>) {
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&PATCHED.to_be_bytes());
    out.extend_from_slice(&(head as u32).to_be_bytes());
    out.extend_from_slice(&value[..head]);
    out.extend_from_slice(&(from as u32).to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    let tail = &value[head + len..];
    out.extend_from_slice(&(tail.len() as u32).to_be_bytes());
    out.extend_from_slice(tail);
}

/// Appends `entries`, each as [`encode_entry`] writes it.
pub fn encode_entries<'a>(entries: impl IntoIterator<Item = &'a Entry>, out: &mut Vec<u8>) {
    for (key, value) in entries {
        encode_entry(key, value.as_deref(), out);
    }
}

/// An entry's value as read back from the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Logged<'a> {
    /// A value.
    Put(Vec<u8>),
    /// A deletion.
    Delete,
    /// The new value is `head`, then `old[from..from + len]` of the key's previous value `old`,
    /// then `tail` (see [`encode_patch`]).
    Patch { head: &'a [u8], from: usize, len: usize, tail: &'a [u8] },
}

impl Logged<'_> {
    /// The value (`None` for a deletion), a patch applied to `previous`, the key's value before.
    pub fn resolve(self, previous: Option<&[u8]>) -> Result<Option<Vec<u8>>, String> {
        match self {
            Logged::Put(value) => Ok(Some(value)),
            Logged::Delete => Ok(None),
            Logged::Patch { head, from, len, tail } => {
                let previous = previous.ok_or("a patch of a key without a value before it")?;
                let kept = from.checked_add(len).and_then(|end| previous.get(from..end)).ok_or_else(|| {
                    format!("a patch of bytes {from}..{from}+{len} of a {}-byte value", previous.len())
                })?;
                let mut value = Vec::with_capacity(head.len() + len + tail.len());
                value.extend_from_slice(head);
                value.extend_from_slice(kept);
                value.extend_from_slice(tail);
                Ok(Some(value))
            }
        }
    }
}

/// Decodes what [`encode_entry`] and [`encode_patch`] wrote, in order.
pub fn decode_entries(
    mut bytes: &[u8],
    out: &mut impl FnMut(Vec<u8>, Logged<'_>) -> Result<(), String>,
) -> Result<(), String> {
    fn take<'a>(bytes: &mut &'a [u8], len: usize) -> Result<&'a [u8], String> {
        if bytes.len() < len {
            return Err(format!("write-ahead entry truncated: {} bytes left, {len} needed", bytes.len()));
        }
        let (head, tail) = bytes.split_at(len);
        *bytes = tail;
        Ok(head)
    }
    fn length(bytes: &mut &[u8]) -> Result<u32, String> {
        Ok(u32::from_be_bytes(take(bytes, 4)?.try_into().expect("four bytes")))
    }
    while !bytes.is_empty() {
        let key_len = length(&mut bytes)? as usize;
        let key = take(&mut bytes, key_len)?.to_vec();
        let value = match length(&mut bytes)? {
            DELETED => Logged::Delete,
            PATCHED => {
                let head_len = length(&mut bytes)? as usize;
                let head = take(&mut bytes, head_len)?;
                let from = length(&mut bytes)? as usize;
                let len = length(&mut bytes)? as usize;
                let tail_len = length(&mut bytes)? as usize;
                let tail = take(&mut bytes, tail_len)?;
                Logged::Patch { head, from, len, tail }
            }
            len => Logged::Put(take(&mut bytes, len as usize)?.to_vec()),
        };
        out(key, value)?;
    }
    Ok(())
}

/// The file of a generation.
pub fn path(dir: &Path, generation: u64) -> PathBuf {
    // Zero-padded so that names sort like generations.
    dir.join(format!("{generation:020}{SUFFIX}"))
}

/// The generations in `dir`, oldest first.
pub fn generations(dir: &Path) -> io::Result<Vec<u64>> {
    let mut generations = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(generation) = name.to_str().and_then(|n| n.strip_suffix(SUFFIX)).and_then(|n| n.parse().ok()) {
            generations.push(generation);
        }
    }
    generations.sort_unstable();
    Ok(generations)
}

/// Makes the directory's entries (files created or removed) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The open generation: frames are staged in memory, then written and synced together.
#[derive(Debug)]
pub struct WalFile {
    file: File,
    generation: u64,
    /// Where the file is, to tell a deleted one from a filesystem that reports no links.
    path: PathBuf,
    /// Frames staged since the last sync.
    staged: Vec<u8>,
    /// Bytes in the file, synced or not.
    len: usize,
}

impl WalFile {
    /// Creates the file of `generation` (it must not exist) and makes its name durable.
    pub fn create(dir: &Path, generation: u64) -> io::Result<WalFile> {
        let path = path(dir, generation);
        let file = OpenOptions::new().append(true).create_new(true).open(&path)?;
        sync_dir(dir)?;
        Ok(WalFile { file, generation, path, staged: Vec::new(), len: 0 })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes in the generation, staged ones included.
    pub fn bytes(&self) -> usize {
        self.len + self.staged.len()
    }

    /// Stages a frame of data-tree entries.
    #[cfg(test)]
    pub fn stage_data<'a>(&mut self, entries: impl IntoIterator<Item = &'a Entry>) {
        self.stage_data_with(|payload| encode_entries(entries, payload));
    }

    /// Stages a frame of data-tree entries, which `write_data` appends to the payload
    /// ([`encode_entry`], [`encode_patch`]).
    pub fn stage_data_with(&mut self, write_data: impl FnOnce(&mut Vec<u8>)) {
        self.stage(|payload| {
            payload.push(DATA);
            write_data(payload);
        });
    }

    /// Stages a frame of data-tree and metadata-tree entries, applied together or not at all.
    #[cfg(test)]
    pub fn stage_data_and_meta(&mut self, data: &[Entry], meta: &[Entry]) {
        self.stage_data_and_meta_with(|payload| encode_entries(data, payload), meta);
    }

    /// [`WalFile::stage_data_with`], with metadata-tree entries.
    pub fn stage_data_and_meta_with(&mut self, write_data: impl FnOnce(&mut Vec<u8>), meta: &[Entry]) {
        self.stage(|payload| {
            payload.push(DATA_AND_META);
            let length_at = payload.len();
            payload.extend_from_slice(&[0; 4]);
            write_data(payload);
            let data_len = (payload.len() - length_at - 4) as u32;
            payload[length_at..length_at + 4].copy_from_slice(&data_len.to_le_bytes());
            encode_entries(meta, payload);
        });
    }

    fn stage(&mut self, write_payload: impl FnOnce(&mut Vec<u8>)) {
        let start = self.staged.len();
        self.staged.extend_from_slice(&[0; HEADER]);
        write_payload(&mut self.staged);
        let payload = &self.staged[start + HEADER..];
        let header = [(payload.len() as u32).to_le_bytes(), crc32fast::hash(payload).to_le_bytes()].concat();
        self.staged[start..start + HEADER].copy_from_slice(&header);
    }

    /// Writes the staged frames and waits until they are on disk: an error when the file was
    /// deleted (its data directory removed under the running node), whose writes succeed but go
    /// nowhere a restart reads. They were acknowledged until the next checkpoint, up to 30 s later,
    /// found the directory gone.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.staged)?;
        self.file.sync_data()?;
        self.check_not_deleted()?;
        self.len += self.staged.len();
        self.staged.clear();
        Ok(())
    }

    /// Fails when the file has no link left and its path is gone or names another file. The link
    /// count alone is a hint: some FUSE filesystems report 0 for every file, and the path is only
    /// looked up then. (NFS keeps a deleted open file under another name, with its link: not
    /// seen.)
    fn check_not_deleted(&self) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let open = self.file.metadata()?;
        if open.nlink() != 0 {
            return Ok(());
        }
        let same = match std::fs::metadata(&self.path) {
            Ok(named) => (named.dev(), named.ino()) == (open.dev(), open.ino()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => false,
            Err(error) => return Err(error),
        };
        if same {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "the write-ahead log file of generation {} was deleted (was the data directory removed?): nothing \
             written since is stored",
            self.generation
        )))
    }
}

/// What reading a generation found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadReport {
    pub frames: usize,
    /// Bytes of a torn last frame that were ignored (the newest generation only).
    pub torn_bytes: usize,
}

/// Reads a generation's frames in order: `data` gets each data-tree entry, `meta` each
/// metadata-tree entry. `newest`: a torn last frame is ignored (and reported) rather than an
/// error.
pub fn read(
    dir: &Path,
    generation: u64,
    newest: bool,
    data: &mut impl FnMut(Vec<u8>, Logged<'_>) -> Result<(), String>,
    meta: &mut impl FnMut(Vec<u8>, Logged<'_>) -> Result<(), String>,
) -> Result<ReadReport, String> {
    let file_path = path(dir, generation);
    let mut bytes = Vec::new();
    File::open(&file_path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(|e| format!("reading {}: {e}", file_path.display()))?;
    let mut report = ReadReport::default();
    let mut at = 0;
    while at < bytes.len() {
        let frame = frame_at(&bytes, at);
        let Some(payload) = frame else {
            let after = next_frame(&bytes, at);
            if newest && after.is_none() {
                report.torn_bytes = bytes.len() - at;
                break;
            }
            let path = file_path.display();
            return Err(match after {
                Some(next) => format!(
                    "{path}: the frame at byte {at} is truncated or fails its checksum, and a valid frame follows \
                     at byte {next}: the log is damaged, not torn, and its {} bytes from byte {at} on hold \
                     acknowledged writes. Restore the data directory from a backup; or, to start without those \
                     writes, cut the log there (`truncate -s {at} {path}`)",
                    bytes.len() - at
                ),
                None => format!(
                    "{path}: the frame at byte {at} is truncated or fails its checksum in a generation that was complete"
                ),
            });
        };
        let frame_start = at;
        at += HEADER + payload.len();
        report.frames += 1;
        let context = |e: String| format!("{}: frame at byte {frame_start}: {e}", file_path.display());
        match payload.split_first() {
            Some((&DATA, entries)) => decode_entries(entries, data).map_err(context)?,
            Some((&DATA_AND_META, rest)) if rest.len() >= 4 => {
                let data_len = u32::from_le_bytes(rest[..4].try_into().expect("four bytes")) as usize;
                let rest = &rest[4..];
                if data_len > rest.len() {
                    return Err(context(format!("data part of {data_len} bytes in {} bytes", rest.len())));
                }
                decode_entries(&rest[..data_len], data).map_err(context)?;
                decode_entries(&rest[data_len..], meta).map_err(context)?;
            }
            _ => return Err(context("unknown payload kind".into())),
        }
    }
    Ok(report)
}

/// Cuts the torn tail [`read`] reported off the end of a generation, so that it is not in the
/// middle of the log once later generations exist.
pub fn cut_torn_tail(dir: &Path, generation: u64, torn_bytes: usize) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path(dir, generation))?;
    file.set_len(file.metadata()?.len() - torn_bytes as u64)?;
    file.sync_all()
}

/// The payload of the frame at `at`, if it is whole and its checksum matches. A payload holds at
/// least its kind, so an empty one (a header of zeros, which its CRC matches) is no frame.
fn frame_at(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let header = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("four bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("four bytes"));
    let payload = bytes.get(at + HEADER..(at + HEADER).checked_add(len)?)?;
    (len > 0 && crc32fast::hash(payload) == crc).then_some(payload)
}

/// Where the first whole, valid frame after the bad one at `bad` starts, if one does: evidence
/// that the log went on after it. Every byte offset is tried, since the bad frame's own length
/// cannot be trusted; a payload of a kind no frame has does not count.
fn next_frame(bytes: &[u8], bad: usize) -> Option<usize> {
    (bad + 1..bytes.len().saturating_sub(HEADER))
        .find(|&at| frame_at(bytes, at).is_some_and(|payload| matches!(payload[0], DATA | DATA_AND_META)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: Option<&str>) -> Entry {
        (key.as_bytes().to_vec(), value.map(|v| v.as_bytes().to_vec()))
    }

    /// Collects whole entries (a patch is an error: none was written).
    fn whole_into(entries: &mut Vec<Entry>) -> impl FnMut(Vec<u8>, Logged<'_>) -> Result<(), String> + '_ {
        |key, value| {
            entries.push((key, value.resolve(None)?));
            Ok(())
        }
    }

    fn read_all(dir: &Path, generation: u64, newest: bool) -> Result<(Vec<Entry>, Vec<Entry>, ReadReport), String> {
        let (mut data, mut meta) = (Vec::new(), Vec::new());
        let report = read(dir, generation, newest, &mut whole_into(&mut data), &mut whole_into(&mut meta))?;
        Ok((data, meta, report))
    }

    #[test]
    fn test_entries_round_trip_and_truncation_is_an_error() {
        let entries: Vec<Entry> = (0..500u32)
            .map(|i| (i.to_be_bytes().to_vec(), if i % 7 == 0 { None } else { Some(vec![i as u8; i as usize % 50]) }))
            .collect();
        let mut bytes = Vec::new();
        encode_entries(&entries, &mut bytes);
        let mut decoded = Vec::new();
        decode_entries(&bytes, &mut whole_into(&mut decoded)).unwrap();
        assert_eq!(decoded, entries);
        let error = decode_entries(&bytes[..bytes.len() - 3], &mut |_, _| Ok(())).unwrap_err();
        assert!(error.contains("truncated"), "{error}");
    }

    #[test]
    fn test_wal_frames_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalFile::create(dir.path(), 7).unwrap();
        wal.stage_data(&[entry("a", Some("1")), entry("b", None)]);
        wal.stage_data_and_meta(&[entry("c", Some("3"))], &[entry("marker", Some("m")), entry("old", None)]);
        wal.sync().unwrap();
        wal.stage_data(&[entry("a", Some("2"))]);
        wal.sync().unwrap();
        assert_eq!(wal.bytes(), std::fs::metadata(path(dir.path(), 7)).unwrap().len() as usize);
        assert!(WalFile::create(dir.path(), 7).is_err(), "a generation is never reopened for writing");
        assert_eq!(generations(dir.path()).unwrap(), vec![7]);
        let (data, meta, report) = read_all(dir.path(), 7, false).unwrap();
        assert_eq!(data, vec![entry("a", Some("1")), entry("b", None), entry("c", Some("3")), entry("a", Some("2"))]);
        assert_eq!(meta, vec![entry("marker", Some("m")), entry("old", None)]);
        assert_eq!(report, ReadReport { frames: 3, torn_bytes: 0 });
    }

    #[test]
    fn test_a_deleted_wal_file_fails_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalFile::create(dir.path(), 3).unwrap();
        wal.stage_data(&[entry("a", Some("1"))]);
        wal.sync().unwrap();
        std::fs::remove_dir_all(dir.path()).unwrap();
        wal.stage_data(&[entry("b", Some("2"))]);
        let error = wal.sync().unwrap_err().to_string();
        assert!(error.contains("generation 3 was deleted"), "{error}");
        // Deleted, and another file made at its path (a directory made again): the same.
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalFile::create(dir.path(), 4).unwrap();
        std::fs::remove_file(path(dir.path(), 4)).unwrap();
        std::fs::write(path(dir.path(), 4), b"").unwrap();
        wal.stage_data(&[entry("c", Some("3"))]);
        let error = wal.sync().unwrap_err().to_string();
        assert!(error.contains("generation 4 was deleted"), "{error}");
    }

    #[test]
    fn test_wal_torn_tail_is_ignored_only_in_the_newest_generation() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalFile::create(dir.path(), 1).unwrap();
        wal.stage_data(&[entry("kept", Some("1"))]);
        wal.stage_data(&[entry("torn", Some("2"))]);
        wal.sync().unwrap();
        let file = path(dir.path(), 1);
        let full = std::fs::read(&file).unwrap();
        let first_frame = HEADER + 1 + 4 + 4 + 4 + 1;
        for cut in [first_frame + 3, full.len() - 1] {
            std::fs::write(&file, &full[..cut]).unwrap();
            let (data, _, report) = read_all(dir.path(), 1, true).unwrap();
            assert_eq!(data, vec![entry("kept", Some("1"))], "cut at {cut}");
            assert_eq!(report, ReadReport { frames: 1, torn_bytes: cut - first_frame });
            let error = read_all(dir.path(), 1, false).unwrap_err();
            assert!(error.contains(&format!("frame at byte {first_frame}")), "{error}");
        }
        // A flipped bit fails the checksum.
        let mut flipped = full.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&file, &flipped).unwrap();
        assert_eq!(read_all(dir.path(), 1, true).unwrap().2.torn_bytes, full.len() - first_frame);
        assert!(read_all(dir.path(), 1, false).is_err());
        // Blocks the file system allocated but never wrote: zeros.
        let mut zeros = full[..first_frame].to_vec();
        zeros.extend_from_slice(&[0; 4096]);
        std::fs::write(&file, &zeros).unwrap();
        let (data, _, report) = read_all(dir.path(), 1, true).unwrap();
        assert_eq!(data, vec![entry("kept", Some("1"))]);
        assert_eq!(report, ReadReport { frames: 1, torn_bytes: 4096 });
    }

    #[test]
    fn test_wal_damage_followed_by_valid_frames_is_an_error_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = WalFile::create(dir.path(), 1).unwrap();
        for i in 0..5 {
            wal.stage_data(&[entry(&format!("key-{i}"), Some("a value of some length"))]);
            wal.sync().unwrap();
        }
        let file = path(dir.path(), 1);
        let full = std::fs::read(&file).unwrap();
        let frame = full.len() / 5;
        // A flipped bit in the second frame's payload, and one in its length.
        for damaged_at in [frame + HEADER + 3, frame] {
            let mut damaged = full.clone();
            damaged[damaged_at] ^= 0x40;
            std::fs::write(&file, &damaged).unwrap();
            let error = read_all(dir.path(), 1, true).unwrap_err();
            assert!(error.contains(&format!("the frame at byte {frame} ")), "{error}");
            assert!(error.contains(&format!("a valid frame follows at byte {}", 2 * frame)), "{error}");
            assert!(error.contains(&format!("truncate -s {frame} ")), "{error}");
            assert_eq!(std::fs::read(&file).unwrap(), damaged, "the file is left as it is");
        }
        // Damage in the last frame is a torn tail.
        let mut damaged = full.clone();
        damaged[4 * frame + HEADER + 3] ^= 0x40;
        std::fs::write(&file, &damaged).unwrap();
        let (data, _, report) = read_all(dir.path(), 1, true).unwrap();
        assert_eq!(data.len(), 4);
        assert_eq!(report, ReadReport { frames: 4, torn_bytes: frame });
    }

    #[test]
    fn test_patches_round_trip_and_need_the_value_before_them() {
        let old = b"0123456789abcdefghij".to_vec();
        // The new value: a new head, bytes 4..14 of the old one, a new tail.
        let new = [b"HEAD".as_slice(), &old[4..14], b"tail!"].concat();
        let mut bytes = Vec::new();
        encode_entry(b"k", Some(&old), &mut bytes);
        encode_patch(b"k", &new, (4, 4, 10), &mut bytes);
        encode_entry(b"gone", None, &mut bytes);
        let mut logged = Vec::new();
        decode_entries(&bytes, &mut |key, value| {
            logged.push((key, format!("{value:?}")));
            Ok(())
        })
        .unwrap();
        assert_eq!(logged.len(), 3);
        let mut values: Vec<Option<Vec<u8>>> = Vec::new();
        decode_entries(&bytes, &mut |_, value| {
            let previous = values.last().cloned().flatten();
            values.push(value.resolve(previous.as_deref())?);
            Ok(())
        })
        .unwrap();
        assert_eq!(values, vec![Some(old.clone()), Some(new.clone()), None]);
        // Encoded: key length, key, the patch marker, then head, from, len and tail.
        let patch_at = 4 + 1 + 4 + old.len();
        assert_eq!(&bytes[patch_at + 5..patch_at + 9], &PATCHED.to_be_bytes());

        let patch = Logged::Patch { head: b"h", from: 4, len: 10, tail: b"t" };
        let error = patch.resolve(None).unwrap_err();
        assert!(error.contains("without a value before it"), "{error}");
        let patch = Logged::Patch { head: b"h", from: 15, len: 10, tail: b"t" };
        let error = patch.resolve(Some(&old)).unwrap_err();
        assert!(error.contains("bytes 15..15+10 of a 20-byte value"), "{error}");
        let patch = Logged::Patch { head: b"h", from: usize::MAX, len: 2, tail: b"t" };
        assert!(patch.resolve(Some(&old)).is_err());
        // A patch cut short is a truncated entry.
        let error = decode_entries(&bytes[..patch_at + 20], &mut |_, _| Ok(())).unwrap_err();
        assert!(error.contains("truncated"), "{error}");
    }
}
