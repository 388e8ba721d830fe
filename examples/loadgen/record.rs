//! Recording: per-route HDR histograms by status, sharded by virtual user.

use super::*;

pub(crate) fn new_hist() -> Histogram<u64> {
    // 3 significant digits over 1 µs .. 300 s. Bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap_or_else(|_| unreachable!())
}

#[derive(Default)]
pub(crate) struct RouteStats {
    pub(crate) by_status: BTreeMap<u16, Histogram<u64>>,
    /// Transport failures by kind (connect, io, timeout), with their latencies.
    pub(crate) transport: BTreeMap<&'static str, Histogram<u64>>,
}

impl RouteStats {
    pub(crate) fn merge(&mut self, other: &RouteStats) {
        for (k, h) in &other.by_status {
            let _ = self.by_status.entry(*k).or_insert_with(new_hist).add(h);
        }
        for (k, h) in &other.transport {
            let _ = self.transport.entry(*k).or_insert_with(new_hist).add(h);
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Status(u16),
    Transport(&'static str),
}

/// Sharded by VU so 10,000 users do not contend on one lock.
pub(crate) struct Recorder {
    pub(crate) shards: Vec<Mutex<HashMap<&'static str, RouteStats>>>,
}

impl Recorder {
    pub(crate) fn new(shards: usize) -> Self {
        Self { shards: (0..shards.max(1)).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    pub(crate) fn record(&self, shard: usize, route: &'static str, outcome: Outcome, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        let Ok(mut map) = self.shards[shard % self.shards.len()].lock() else { return };
        let stats = map.entry(route).or_default();
        let h = match outcome {
            Outcome::Status(s) => stats.by_status.entry(s).or_insert_with(new_hist),
            Outcome::Transport(k) => stats.transport.entry(k).or_insert_with(new_hist),
        };
        h.saturating_record(us);
    }

    pub(crate) fn merged(&self) -> BTreeMap<&'static str, RouteStats> {
        let mut out: BTreeMap<&'static str, RouteStats> = BTreeMap::new();
        for shard in &self.shards {
            if let Ok(map) = shard.lock() {
                for (route, stats) in map.iter() {
                    out.entry(route).or_default().merge(stats);
                }
            }
        }
        out
    }
}
