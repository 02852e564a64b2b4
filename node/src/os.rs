//! Settings of the process that the operating system holds.

/// Turns transparent huge pages off for this process (Linux; elsewhere there is nothing to do).
///
/// The allocator (mimalloc) asks for huge pages on its arenas, and gives memory back to the
/// system a second after it is freed. With huge pages, each fault on memory it takes back
/// zeroes a whole 2 MiB page: under ingest load that zeroing (`clear_page_erms`) was 6.5 % of
/// the node's CPU, and 0.2 % without huge pages (docs/benchmarks-history.md, step 20). The
/// setting holds for the whole process and its children; it is made first thing in `main`,
/// before the runtime starts.
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn test_transparent_huge_pages_are_off_afterwards() {
        disable_transparent_huge_pages().expect("prctl(PR_SET_THP_DISABLE) succeeds");
        assert!(rustix::thread::transparent_huge_pages_are_disabled().expect("prctl(PR_GET_THP_DISABLE) succeeds"));
    }
}
