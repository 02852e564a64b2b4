//! The data directory's format stamp: `<data_dir>/FORMAT`, one line, `tollgate data format N`.
//!
//! A version of Tollgate that changes how anything in the data directory is written (the data
//! tree's records, the write-ahead log's frames, the Raft store) in a way older versions cannot
//! read raises [`DATA_FORMAT`]. A node checks the stamp before it opens anything: a directory
//! written by a newer version is refused with both numbers, instead of being read as a corrupt
//! store (or, worse, half read) after a downgrade. A directory without a stamp is new, or was
//! written before stamps existed, in a format this version reads: it is stamped.

use crate::error::Error;
use std::io::Write as _;
use std::path::Path;

/// The format this version writes and the newest it reads.
pub const DATA_FORMAT: u32 = 1;

/// The stamp's file name in the data directory.
pub const FORMAT_FILE: &str = "FORMAT";

const PREFIX: &str = "tollgate data format ";

/// The stamp's text for format `n`.
fn stamp(n: u32) -> String {
    format!("{PREFIX}{n}\n")
}

/// The format number of a stamp's text.
fn parse(text: &str) -> Option<u32> {
    text.trim_end_matches('\n').strip_prefix(PREFIX)?.parse().ok()
}

/// Checks the stamp of the data directory `dir` (created if missing) and stamps a directory that
/// has none. Run before anything in `dir` is opened.
pub fn check_and_stamp(dir: &Path) -> Result<(), Error> {
    let path = dir.join(FORMAT_FILE);
    let io = |what: &str, e: std::io::Error| Error::Unavailable(format!("storage: {what} {}: {e}", path.display()));
    match std::fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let Some(found) = parse(&text) else {
                return Err(Error::InvalidArgument(format!(
                    "the data directory {} has a format stamp {} that is not `{}N`: {:?}; it was not \
                     written by Tollgate, or it was damaged (restore it from a backup)",
                    dir.display(),
                    path.display(),
                    PREFIX,
                    text.chars().take(80).collect::<String>()
                )));
            };
            if found > DATA_FORMAT {
                return Err(Error::InvalidArgument(format!(
                    "the data directory {} holds data format {found}, written by a newer version of \
                     Tollgate; this version reads data format {DATA_FORMAT} and older. Run a version \
                     that reads format {found}, or restore a backup taken before the upgrade",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
            // Written whole or not at all: a temporary file, synced, renamed, the directory synced.
            let temporary = dir.join(format!("{FORMAT_FILE}.tmp"));
            let mut file = std::fs::File::create(&temporary).map_err(|e| io("writing", e))?;
            file.write_all(stamp(DATA_FORMAT).as_bytes()).map_err(|e| io("writing", e))?;
            file.sync_all().map_err(|e| io("syncing", e))?;
            std::fs::rename(&temporary, &path).map_err(|e| io("renaming into", e))?;
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("syncing the directory of", e))?;
            Ok(())
        }
        Err(e) => Err(io("reading", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_new_directory_is_stamped_and_then_accepted() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        check_and_stamp(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join(FORMAT_FILE)).unwrap(), "tollgate data format 1\n");
        assert!(!dir.join("FORMAT.tmp").exists());
        check_and_stamp(&dir).unwrap();
    }

    #[test]
    fn test_an_existing_directory_without_a_stamp_is_stamped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sled")).unwrap();
        check_and_stamp(dir.path()).unwrap();
        assert_eq!(parse(&std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap()), Some(DATA_FORMAT));
    }

    #[test]
    fn test_a_newer_format_is_refused_with_both_numbers_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FORMAT_FILE), stamp(DATA_FORMAT + 1)).unwrap();
        let error = check_and_stamp(dir.path()).unwrap_err().to_string();
        assert!(error.contains("holds data format 2"), "{error}");
        assert!(error.contains("reads data format 1 and older"), "{error}");
        assert_eq!(std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap(), stamp(2));
    }

    #[test]
    fn test_a_stamp_that_does_not_parse_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["", "tollgate data format x\n", "something else\n", "tollgate data format -1\n"] {
            std::fs::write(dir.path().join(FORMAT_FILE), text).unwrap();
            let error = check_and_stamp(dir.path()).unwrap_err().to_string();
            assert!(error.contains("is not `tollgate data format N`"), "{text:?}: {error}");
        }
        assert_eq!(parse("tollgate data format 1"), Some(1), "the newline is optional");
        assert_eq!(parse(&stamp(7)), Some(7));
    }
}
