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

/// What the operating system counts for this process, as Prometheus' process collector exports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessFigures {
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident memory, bytes.
    pub resident_bytes: u64,
    /// Virtual memory, bytes.
    pub virtual_bytes: u64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The limit of open file descriptors (the soft limit), when there is one.
    pub max_fds: Option<u64>,
    /// When the process started, Unix seconds.
    pub start_time_seconds: f64,
}

/// This process's figures, read from `/proc` (Linux); `None` elsewhere or when `/proc` cannot be
/// read.
pub fn process_figures() -> Option<ProcessFigures> {
    #[cfg(target_os = "linux")]
    {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let system = std::fs::read_to_string("/proc/stat").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        parse_process(&stat, &system, &limits, open_fds, ticks, rustix::param::page_size() as u64)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// [`process_figures`] from the texts of `/proc/self/stat`, `/proc/stat` and `/proc/self/limits`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_process(
    stat: &str,
    system: &str,
    limits: &str,
    open_fds: u64,
    ticks: f64,
    page: u64,
) -> Option<ProcessFigures> {
    // The command name (field 2) is in parentheses and may hold spaces and parentheses itself;
    // the fields after it start with the state (field 3).
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    let field = |number: usize| fields.get(number - 3)?.parse::<u64>().ok();
    let boot_time: u64 = system.lines().find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())?;
    let max_fds =
        limits.lines().find_map(|line| line.strip_prefix("Max open files")?.split_whitespace().next()?.parse().ok());
    Some(ProcessFigures {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        resident_bytes: field(24)? * page,
        virtual_bytes: field(23)?,
        threads: field(20)?,
        open_fds,
        max_fds,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_process_figures_from_the_texts_of_proc() {
        // A command name with a space and a parenthesis, as /proc writes it.
        let stat = "4242 (tollgate (x) y) S 1 4242 4242 0 -1 4194560 2048 0 0 0 1234 567 0 0 20 0 17 0 \
                    250000 1073741824 51200 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let system = "cpu  1 2 3\nbtime 1796000000\nprocesses 9\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max cpu time              unlimited            unlimited            seconds\n\
                      Max open files            1048576              1048576              files\n";
        let figures = parse_process(stat, system, limits, 12, 100.0, 4096).unwrap();
        assert_eq!(
            figures,
            ProcessFigures {
                cpu_seconds: 18.01,
                resident_bytes: 51200 * 4096,
                virtual_bytes: 1 << 30,
                threads: 17,
                open_fds: 12,
                max_fds: Some(1_048_576),
                start_time_seconds: 1_796_002_500.0,
            }
        );
        let unlimited = limits.replace("1048576              1048576", "unlimited            unlimited");
        assert_eq!(parse_process(stat, system, &unlimited, 12, 100.0, 4096).unwrap().max_fds, None);
        assert_eq!(parse_process("4242 (x) S 1", system, limits, 12, 100.0, 4096), None, "a short line");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn test_process_figures_of_this_process() {
        let figures = process_figures().expect("/proc is readable");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(figures.resident_bytes > 1 << 20 && figures.virtual_bytes >= figures.resident_bytes, "{figures:?}");
        assert!(figures.threads >= 1 && figures.open_fds >= 1, "{figures:?}");
        assert!(figures.max_fds.is_none_or(|max| max >= figures.open_fds), "{figures:?}");
        assert!(figures.start_time_seconds <= now + 1.0 && figures.start_time_seconds > now - 3600.0, "{figures:?}");
        assert!(figures.cpu_seconds >= 0.0, "{figures:?}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn test_transparent_huge_pages_are_off_afterwards() {
        disable_transparent_huge_pages().expect("prctl(PR_SET_THP_DISABLE) succeeds");
        assert!(rustix::thread::transparent_huge_pages_are_disabled().expect("prctl(PR_GET_THP_DISABLE) succeeds"));
    }
}
