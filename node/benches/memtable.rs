//! The memtable's map under figure 1's write pattern (docs/benchmarks-history.md, step 38): the
//! single writer puts every acknowledged entry into it, and owners and queries look keys up in it.
//!
//! `cargo bench -p tollgate --bench memtable` (`SERIES`, `ROUNDS` in the environment). 10 800
//! series (200 gateway pods of 54) export 100 times, 10 s of data time apart, as in figure 1:
//! each export rewrites the series' minute state (a new key every sixth export) and its cursor.
//! Every put is timed into the memtable's map ([`Frozen`]) and, as the baseline, into the plain
//! `BTreeMap<Vec<u8>, Option<Vec<u8>>>` it replaced; then every key is looked up in both, in a
//! random order. Five attempts; the figures and the ratio are their medians. Single-threaded, so
//! the figures are the writer's own work per entry.

// A benchmark reports on standard output.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tollgate::store::codec;
use tollgate::store::memtable::Frozen;
use tollgate::store::Resolution;
use tollgate_rules::fleet::Xorshift;
use tollgate_rules::SeriesId;

// The allocator the node runs with (`node/src/main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The entries of one export round, in the order the owners batch them: per pod (a partition),
/// each series' minute state then its cursor.
fn round(series: &[(u16, u64, SeriesId)], round: u64) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let minute = round / 6;
    let mut entries = Vec::with_capacity(series.len() * 2);
    for &(vnode, partition, id) in series {
        entries.push((codec::state_key(vnode, id, Resolution::Minute, minute), Some(vec![round as u8; 180])));
        entries.push((codec::cursor_key(vnode, partition, id), Some(vec![round as u8; 400])));
    }
    entries
}

/// What one map took.
struct Timing {
    /// Putting every round's entries.
    put: Duration,
    /// Looking every key up once.
    get: Duration,
    /// Keys found.
    found: u64,
}

/// Time of putting every round into `put`, then of looking every key up with `get`.
fn run<M>(
    series: &[(u16, u64, SeriesId)],
    rounds: u64,
    map: &mut M,
    put: fn(&mut M, Vec<u8>, Option<Vec<u8>>),
    get: fn(&M, &[u8]) -> bool,
) -> Timing {
    let mut putting = Duration::ZERO;
    let mut keys = Vec::new();
    for r in 0..rounds {
        let entries = round(series, r);
        if r % 6 == 0 || r + 1 == rounds {
            keys.extend(entries.iter().map(|(key, _)| key.clone()));
        }
        let start = Instant::now();
        for (key, value) in entries {
            put(map, key, value);
        }
        putting += start.elapsed();
    }
    keys.sort();
    keys.dedup();
    // Looked up in a random order, as owners and queries do, not walking the map in its order.
    let mut random = Xorshift::new(keys.len() as u64);
    for i in (1..keys.len()).rev() {
        keys.swap(i, random.below(i as u64 + 1) as usize);
    }
    let start = Instant::now();
    let found = keys.iter().filter(|key| get(map, key)).count() as u64;
    Timing { put: putting, get: start.elapsed(), found }
}

fn main() {
    let series_count = env_or("SERIES", 10_800);
    let rounds = env_or("ROUNDS", 100);
    let mut random = Xorshift::new(38);
    // 54 series per pod, as the gateway's; a pod's series share its vnode and partition.
    let series: Vec<(u16, u64, SeriesId)> = (0..series_count)
        .map(|i| {
            let pod = i / 54;
            let partition = pod.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let id = SeriesId((u128::from(random.next_u64()) << 64) | u128::from(random.next_u64()));
            ((partition % 1024) as u16, partition, id)
        })
        .collect();
    let puts = series_count * rounds * 2;
    println!("memtable: {series_count} series, {rounds} rounds, {puts} puts");

    let plain = |series: &[(u16, u64, SeriesId)]| {
        let mut map: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let timing = run(
            series,
            rounds,
            &mut map,
            |map, key, value| drop(map.insert(key, value)),
            |map, key| map.contains_key(key),
        );
        (timing, map.len())
    };
    let memtable = |series: &[(u16, u64, SeriesId)]| {
        let mut frozen = Frozen::default();
        let timing = run(
            series,
            rounds,
            &mut frozen,
            |map, key, value| map.put(key, value),
            |map, key| map.entries.contains_key(key),
        );
        (timing, frozen.entries.len())
    };
    // Five attempts, the baseline first in every other one, so that neither side always runs
    // after the other's memory was given back.
    let mut results: Vec<(Timing, Timing)> = Vec::new();
    for attempt in 0..5 {
        let ((measured, keys), (baseline, plain_keys)) = if attempt % 2 == 0 {
            let baseline = plain(&series);
            (memtable(&series), baseline)
        } else {
            let measured = memtable(&series);
            (measured, plain(&series))
        };
        assert_eq!(keys, plain_keys, "both maps hold the same keys");
        assert_eq!(measured.found, baseline.found, "both maps find the same keys");
        println!(
            "  attempt {attempt}: {keys} keys; put {:.0} ns (plain map {:.0} ns), get {:.0} ns (plain map {:.0} ns)",
            measured.put.as_nanos() as f64 / puts as f64,
            baseline.put.as_nanos() as f64 / puts as f64,
            measured.get.as_nanos() as f64 / measured.found as f64,
            baseline.get.as_nanos() as f64 / baseline.found as f64,
        );
        results.push((measured, baseline));
    }
    // Medians over the attempts: this machine's other work slows single attempts by a third.
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let lookups = results[0].0.found as f64;
    let per = |pick: fn(&Timing) -> Duration, side: usize, per: f64| {
        median(
            results
                .iter()
                .map(|pair| pick(if side == 0 { &pair.0 } else { &pair.1 }).as_nanos() as f64 / per)
                .collect(),
        )
    };
    let ratio = |pick: fn(&Timing) -> Duration| {
        median(results.iter().map(|(m, b)| pick(m).as_nanos() as f64 / pick(b).as_nanos() as f64).collect())
    };
    let (put, put_plain, put_ratio) =
        (per(|t| t.put, 0, puts as f64), per(|t| t.put, 1, puts as f64), ratio(|t| t.put));
    let (get, get_plain, get_ratio) = (per(|t| t.get, 0, lookups), per(|t| t.get, 1, lookups), ratio(|t| t.get));
    println!(
        "bench memtable_put: {put:.0} ns/entry (baseline plain map {put_plain:.0} ns/entry, ratio {put_ratio:.2})"
    );
    println!("bench memtable_get: {get:.0} ns/key (baseline plain map {get_plain:.0} ns/key, ratio {get_ratio:.2})");
}
