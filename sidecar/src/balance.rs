//! Endpoint picking inside one priority: the algorithms a TrafficPolicy names.
//!
//! Pure and synchronous: a [`Balancer`] is built from the endpoints of one priority when the
//! config changes and picks with no lock on the request path. Load (outstanding requests) and
//! latency (peak EWMA) live in [`EndpointStats`], shared across config updates so a new EDS
//! version does not forget what the proxy measured.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::policy::{MAX_EJECTION, Outcome, OutlierPolicy};

/// Balancing algorithms (the names TrafficPolicy uses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency × (outstanding + 1). The default.
    #[default]
    PeakEwma,
    /// Round robin.
    RoundRobin,
    /// Power of two choices over outstanding requests.
    LeastRequest,
    /// Uniform random.
    Random,
    /// Consistent hashing on a ring (virtual nodes per endpoint).
    RingHash,
    /// Maglev consistent hashing (a lookup table of prime size).
    Maglev,
}

impl Algorithm {
    /// Parses the control plane's name (`weft.xds.v1.ClusterMeta.algorithm`); unknown -> PeakEWMA.
    pub fn from_name(s: &str) -> Self {
        match s {
            "RoundRobin" => Algorithm::RoundRobin,
            "LeastRequest" => Algorithm::LeastRequest,
            "Random" => Algorithm::Random,
            "RingHash" => Algorithm::RingHash,
            "Maglev" => Algorithm::Maglev,
            _ => Algorithm::PeakEwma,
        }
    }

    /// Whether the algorithm uses a request hash.
    pub fn hashing(self) -> bool {
        matches!(self, Algorithm::RingHash | Algorithm::Maglev)
    }
}

/// How fast the latency estimate forgets: the decay time constant of the EWMA.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Latency assumed for an endpoint never measured, when neither of two candidates has been
/// (a measured rival lends its estimate instead: see [`p2c`]).
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Two choices with as many requests in flight whose latencies are within this factor of each
/// other are a tie, broken at random: latency estimates on a quiet link differ by noise, and a
/// strict comparison would send every sequential request to whichever endpoint last looked
/// faster by a few microseconds.
pub const TIE_FACTOR: f64 = 2.0;
/// One two-choice pick in this many takes either candidate at random, costs aside, when the
/// one it takes has nothing in flight: an estimate raised by one hiccup is measured again (and
/// fades) instead of keeping its endpoint out of rotation at low load until time decays it.
/// Four (the coin then sends one pick in eight to the worse of an idle pair): a simulation of
/// 300 sequential requests over two equal loopback endpoints whose samples now and then spike
/// 5–100× (a descheduled thread) put one of them under 30 % in up to 17 % of runs at 16 and
/// 0.5 % at 4; a 10× slower endpoint at 8 concurrent still gets about 2 %, as it is rarely idle.
pub const EXPLORE_PAIR_ONE_IN: u64 = 4;
/// How many of its own durations a latency estimate is trusted while no new sample arrives
/// (it then decays toward zero, so the endpoint is measured again).
pub const IDLE_HORIZON: f64 = 20.0;
/// How far an idle estimate decays at most: to this share of itself.
pub const IDLE_FLOOR: f64 = 0.5;
/// The least share of the way a sample below the estimate moves it (per sample, whatever the
/// time since the last one): a peak fades within a few samples once it is no longer seen.
/// Three quarters: one normal sample after a spike brings the estimate back within
/// [`TIE_FACTOR`] of its rival for spikes up to about 5×.
pub const FADE_PER_SAMPLE: f64 = 0.75;

/// What the proxy measured of one endpoint.
#[derive(Debug)]
pub struct EndpointStats {
    outstanding: AtomicU32,
    /// 5xx answers in a row.
    fails_5xx: AtomicU32,
    /// Gateway errors in a row.
    fails_gateway: AtomicU32,
    /// Ejected until this many ns after `epoch` (0: never ejected).
    ejected_until_ns: AtomicU64,
    /// Times ejected (each ejection lasts longer).
    ejections: AtomicU32,
    /// Peak-EWMA latency, nanoseconds, as f64 bits (0: never measured).
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, ns since `epoch`.
    stamp_ns: AtomicU64,
    epoch: Instant,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            outstanding: AtomicU32::new(0),
            fails_5xx: AtomicU32::new(0),
            fails_gateway: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(0),
            stamp_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// The clock [`EJECTION_HORIZON_NS`] counts from.
static EJECTION_EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
/// Until when (ns after [`EJECTION_EPOCH`]) some endpoint of this process may be ejected. One
/// for the process, not per cluster: endpoints of one address share their stats across the
/// clusters that list it, so an ejection seen through one cluster changes every one of them.
static EJECTION_HORIZON_NS: AtomicU64 = AtomicU64::new(0);

/// Notes that some endpoint was ejected for `length`.
fn note_ejection(length: Duration) {
    let until = (EJECTION_EPOCH.elapsed() + length).as_nanos() as u64;
    EJECTION_HORIZON_NS.fetch_max(until, Ordering::Relaxed);
}

/// Whether any endpoint may be ejected now: while it may, a cluster's priority load is computed
/// live (ejected endpoints count as unhealthy); after the horizon, the precomputed load holds.
pub fn ejections_possible() -> bool {
    let horizon = EJECTION_HORIZON_NS.load(Ordering::Relaxed);
    horizon != 0 && (EJECTION_EPOCH.elapsed().as_nanos() as u64) < horizon
}

/// Marks a request outstanding on an endpoint until dropped.
pub struct InFlight(Arc<EndpointStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointStats {
    /// Counts a request as outstanding until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Requests in flight.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// The latency estimate ([`DEFAULT_RTT`] while never measured).
    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(self.latency().unwrap_or(DEFAULT_RTT.as_nanos() as f64) as u64)
    }

    /// The measured latency estimate in ns, if any sample arrived, decayed by the time since
    /// the last sample in units of the estimate itself: an estimate is trusted for about
    /// [`IDLE_HORIZON`] of its own durations, so an endpoint kept out by one slow sample is
    /// tried again soon at loopback speeds and only after seconds at tens of milliseconds;
    /// it decays no lower than [`IDLE_FLOOR`] of itself, so a burst after a long quiet spell
    /// does not all land on an endpoint that merely was not measured lately.
    fn latency(&self) -> Option<f64> {
        self.latency_at(Instant::now())
    }

    /// [`Self::latency`] as of `now` (one clock read serves both choices of a pick).
    fn latency_at(&self, now: Instant) -> Option<f64> {
        let l = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        if l <= 0.0 {
            return None;
        }
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let idle = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
        Some(l * (-idle / (IDLE_HORIZON * l)).exp().max(IDLE_FLOOR))
    }

    /// Feeds one observed latency: a sample above the estimate replaces it at once (peak),
    /// one below decays it exponentially with the time since the last sample, and at least
    /// by [`FADE_PER_SAMPLE`].
    pub fn observe(&self, rtt: Duration) {
        self.observe_at(rtt, Instant::now());
    }

    /// [`Self::observe`] of a sample taken at `now` (the caller's clock read serves both).
    pub fn observe_at(&self, rtt: Duration, now: Instant) {
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let prev_stamp = self.stamp_ns.swap(now, Ordering::Relaxed);
        let rtt = rtt.as_nanos() as f64;
        let old = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let new = if rtt > old || old == 0.0 {
            rtt
        } else {
            let dt = now.saturating_sub(prev_stamp) as f64;
            let w = (-dt / EWMA_DECAY.as_nanos() as f64)
                .exp()
                .min(1.0 - FADE_PER_SAMPLE);
            old * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(new.to_bits(), Ordering::Relaxed);
    }

    /// Whether outlier detection has the endpoint ejected now.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        until != 0 && (self.epoch.elapsed().as_nanos() as u64) < until
    }

    /// How much longer the endpoint stays ejected (zero when it is not).
    pub fn ejected_for(&self) -> Duration {
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        Duration::from_nanos(until.saturating_sub(self.epoch.elapsed().as_nanos() as u64))
    }

    /// Times ejected so far.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Feeds an attempt's outcome to outlier detection; returns true when this outcome ejected
    /// the endpoint. `may_eject` says whether the cluster's ejection cap allows one more.
    pub fn record_outcome(
        &self,
        outcome: Outcome,
        policy: Option<&OutlierPolicy>,
        may_eject: impl FnOnce() -> bool,
    ) -> bool {
        if !outcome.is_5xx() {
            self.fails_5xx.store(0, Ordering::Relaxed);
            self.fails_gateway.store(0, Ordering::Relaxed);
            return false;
        }
        let f5 = self.fails_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        let fg = if outcome.is_gateway_error() {
            self.fails_gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.fails_gateway.store(0, Ordering::Relaxed);
            0
        };
        let Some(p) = policy else { return false };
        let tripped = (p.consecutive_5xx > 0 && f5 >= p.consecutive_5xx)
            || (p.consecutive_gateway > 0 && fg >= p.consecutive_gateway);
        if !tripped || self.is_ejected() || !may_eject() {
            return false;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = p.base_ejection.saturating_mul(n).min(MAX_EJECTION);
        let until = self.epoch.elapsed() + length;
        self.ejected_until_ns
            .store(until.as_nanos() as u64, Ordering::Relaxed);
        note_ejection(length);
        self.fails_5xx.store(0, Ordering::Relaxed);
        self.fails_gateway.store(0, Ordering::Relaxed);
        true
    }

    /// P2C cost: latency × (outstanding + 1).
    fn cost(&self) -> f64 {
        self.ewma().as_nanos() as f64 * f64::from(self.outstanding() + 1)
    }
}

/// Peak-EWMA's two choices: whether `a` wins over `b`. Cost is latency × (outstanding + 1);
/// an endpoint never measured borrows its rival's latency (so a new endpoint is explored at
/// low load, yet a burst does not all land on it: its outstanding requests count). With as
/// many requests in flight on each, latencies within [`TIE_FACTOR`] of each other are a tie
/// broken at random. `r` is random bits: the lowest breaks ties, and one pick in
/// [`EXPLORE_PAIR_ONE_IN`] is the coin's alone — when the coin's choice has nothing in
/// flight (an endpoint that hangs without failing is not fed by exploration).
pub fn p2c(a: &EndpointStats, b: &EndpointStats, r: u64) -> bool {
    let coin = r & 1 == 0;
    let (oa, ob) = (a.outstanding(), b.outstanding());
    if (r >> 1).is_multiple_of(EXPLORE_PAIR_ONE_IN) && (if coin { oa } else { ob }) == 0 {
        return coin;
    }
    let now = Instant::now();
    let (la, lb) = match (a.latency_at(now), b.latency_at(now)) {
        (Some(la), Some(lb)) => (la, lb),
        (Some(l), None) | (None, Some(l)) => (l, l),
        (None, None) => {
            let d = DEFAULT_RTT.as_nanos() as f64;
            (d, d)
        }
    };
    if oa == ob && la.max(lb) <= la.min(lb) * TIE_FACTOR {
        return coin;
    }
    la * f64::from(oa + 1) < lb * f64::from(ob + 1)
}

/// How an endpoint on another network is reached: through one of its cluster's gateways
/// ([`crate::tunnel`]), which must prove `identity`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Via {
    /// The gateways, tried in turn from a random one.
    pub gateways: Vec<SocketAddr>,
    /// The SPIFFE ID they prove.
    pub identity: Arc<str>,
}

/// One pickable endpoint.
#[derive(Clone, Debug)]
pub struct Target {
    /// Address.
    pub addr: SocketAddr,
    /// The cluster it lives in ("" when unknown).
    pub origin: Arc<str>,
    /// The SPIFFE ID its sidecar presents, when it terminates mTLS.
    pub mtls_identity: Option<Arc<str>>,
    /// Its sidecar accepts only mTLS on this port: never sent plaintext.
    pub strict: bool,
    /// On another network: reached through a gateway.
    pub via: Option<Arc<Via>>,
    /// Load counters of its cluster and locality (load reports).
    pub load: Arc<crate::load::LocalityLoad>,
    /// Cached metric handles of its 200s in this cluster.
    pub hot: Arc<crate::metrics::HotCache>,
    /// Measurements.
    pub stats: Arc<EndpointStats>,
}

/// Across clusters, one peak-EWMA pick in this many explores a random cluster.
pub const EXPLORE_ONE_IN: u64 = 16;

/// Virtual nodes per endpoint on a hash ring.
pub const RING_REPLICAS: usize = 128;
/// Maglev table size (prime, ≥ 100 × endpoints for small meshes).
pub const MAGLEV_SIZE: usize = 65_537;

/// A balancer over the healthy endpoints of one priority.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    targets: Vec<Target>,
    /// Target indices per origin cluster, when the targets span more than one cluster.
    clusters: Vec<Vec<usize>>,
    next: AtomicUsize,
    /// (point, index) sorted by point.
    ring: Vec<(u64, u32)>,
    /// Maglev lookup table: slot -> index.
    table: Vec<u32>,
}

/// A stable 64-bit hash (SipHash with fixed keys: the same on every proxy).
pub fn hash64(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    h.write(bytes);
    h.finish()
}

impl Balancer {
    /// Builds a balancer (rings and tables are built here, never on the request path).
    pub fn new(algorithm: Algorithm, targets: Vec<Target>) -> Self {
        let mut by_cluster: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, t) in targets.iter().enumerate() {
            by_cluster.entry(&t.origin).or_default().push(i);
        }
        let clusters = match by_cluster.len() {
            0 | 1 => Vec::new(),
            _ => by_cluster.into_values().collect(),
        };
        let mut b = Balancer {
            algorithm,
            clusters,
            targets,
            next: AtomicUsize::new(0),
            ring: Vec::new(),
            table: Vec::new(),
        };
        match algorithm {
            Algorithm::RingHash => b.build_ring(),
            Algorithm::Maglev => b.build_maglev(),
            _ => {}
        }
        b
    }

    /// The endpoints it picks from.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    fn build_ring(&mut self) {
        let mut ring = Vec::with_capacity(self.targets.len() * RING_REPLICAS);
        for (i, t) in self.targets.iter().enumerate() {
            for r in 0..RING_REPLICAS {
                ring.push((hash64(format!("{}#{r}", t.addr).as_bytes()), i as u32));
            }
        }
        ring.sort_unstable();
        self.ring = ring;
    }

    fn build_maglev(&mut self) {
        let n = self.targets.len();
        if n == 0 {
            return;
        }
        let m = MAGLEV_SIZE as u64;
        let perms: Vec<(u64, u64)> = self
            .targets
            .iter()
            .map(|t| {
                let key = t.addr.to_string();
                let offset = hash64(format!("{key}/offset").as_bytes()) % m;
                let skip = hash64(format!("{key}/skip").as_bytes()) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; MAGLEV_SIZE];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                let (offset, skip) = perms[i];
                let mut slot = ((offset + next[i] * skip) % m) as usize;
                while table[slot] != u32::MAX {
                    next[i] += 1;
                    slot = ((offset + next[i] * skip) % m) as usize;
                }
                table[slot] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == MAGLEV_SIZE {
                    break 'fill;
                }
            }
        }
        self.table = table;
    }

    /// Peak EWMA across clusters at one priority (remote clusters after a failover): the
    /// cluster that looks cheapest (the better of two sampled endpoints each), then two
    /// choices inside it. One pick in [`EXPLORE_ONE_IN`] goes to a random cluster, so the
    /// estimate of a cluster not chosen stays fresh and a change in distance is noticed.
    fn pick_cluster_then(&self, rand: u64) -> usize {
        let sample = |group: &[usize], r: u64| {
            let a = group[(r % group.len() as u64) as usize];
            let b = group[((r >> 16) % group.len() as u64) as usize];
            let (sa, sb) = (&self.targets[a].stats, &self.targets[b].stats);
            if p2c(sa, sb, r >> 48) {
                (a, sa.cost())
            } else {
                (b, sb.cost())
            }
        };
        let mix = |k: usize| {
            rand.rotate_left(13 * k as u32 + 7) ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        };
        if rand.is_multiple_of(EXPLORE_ONE_IN) {
            let g = &self.clusters[((rand >> 40) % self.clusters.len() as u64) as usize];
            return sample(g, mix(99)).0;
        }
        self.clusters
            .iter()
            .enumerate()
            .map(|(k, g)| sample(g, mix(k)))
            .min_by(|x, y| x.1.total_cmp(&y.1))
            .map_or(0, |(i, _)| i)
    }

    /// Picks an endpoint. `rand` is a uniform random number; `hash` the request's hash key
    /// (hashing algorithms without a key fall back to random).
    pub fn pick(&self, rand: u64, hash: Option<u64>) -> Option<&Target> {
        let n = self.targets.len();
        if n == 0 {
            return None;
        }
        let i = match (self.algorithm, hash) {
            (Algorithm::RingHash, Some(h)) => {
                let at = self.ring.partition_point(|(p, _)| *p < h);
                self.ring
                    .get(at)
                    .or_else(|| self.ring.first())
                    .map_or(0, |(_, i)| *i as usize)
            }
            (Algorithm::Maglev, Some(h)) => self
                .table
                .get((h % MAGLEV_SIZE as u64) as usize)
                .map_or(0, |i| *i as usize),
            (Algorithm::RoundRobin, _) => self.next.fetch_add(1, Ordering::Relaxed) % n,
            (Algorithm::PeakEwma, _) if !self.clusters.is_empty() => self.pick_cluster_then(rand),
            (Algorithm::LeastRequest, _) | (Algorithm::PeakEwma, _) if n > 1 => {
                let a = (rand % n as u64) as usize;
                let mut b = ((rand >> 32) % (n as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let (ta, tb) = (&self.targets[a], &self.targets[b]);
                let a_wins = if self.algorithm == Algorithm::LeastRequest {
                    ta.stats.outstanding() <= tb.stats.outstanding()
                } else {
                    p2c(&ta.stats, &tb.stats, rand >> 20)
                };
                if a_wins { a } else { b }
            }
            _ => (rand % n as u64) as usize,
        };
        // An ejected endpoint is skipped for the next one that is not (the ring's next point
        // for ring hash); when every endpoint is ejected the pick stands (fail open).
        if self.targets[i].stats.is_ejected() {
            if self.algorithm == Algorithm::RingHash && !self.ring.is_empty() {
                let h = hash.unwrap_or(rand);
                let start = self.ring.partition_point(|(p, _)| *p < h);
                let len = self.ring.len();
                for k in 0..len {
                    let (_, j) = self.ring[(start + k) % len];
                    if !self.targets[j as usize].stats.is_ejected() {
                        return self.targets.get(j as usize);
                    }
                }
            } else {
                for k in 1..n {
                    let j = (i + k) % n;
                    if !self.targets[j].stats.is_ejected() {
                        return self.targets.get(j);
                    }
                }
            }
        }
        self.targets.get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn targets(n: usize) -> Vec<Target> {
        (0..n)
            .map(|i| Target {
                addr: SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)),
                origin: Arc::from(""),
                mtls_identity: None,
                strict: false,
                via: None,
                stats: Arc::new(EndpointStats::default()),
                load: Arc::new(crate::load::LocalityLoad::new("")),
                hot: Arc::default(),
            })
            .collect()
    }

    fn spread(b: &Balancer, picks: u64, hashed: bool) -> HashMap<SocketAddr, u64> {
        let mut counts = HashMap::new();
        for i in 0..picks {
            let r = hash64(&i.to_le_bytes());
            let h = hashed.then_some(hash64(&(i + 7).to_le_bytes()));
            *counts.entry(b.pick(r, h).expect("pick").addr).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn round_robin_is_exact() {
        let b = Balancer::new(Algorithm::RoundRobin, targets(4));
        let c = spread(&b, 400, false);
        assert!(c.values().all(|v| *v == 100), "{c:?}");
    }

    #[test]
    fn random_and_p2c_use_every_endpoint_evenly_when_idle() {
        for algo in [
            Algorithm::Random,
            Algorithm::LeastRequest,
            Algorithm::PeakEwma,
        ] {
            let b = Balancer::new(algo, targets(4));
            let c = spread(&b, 40_000, false);
            assert_eq!(c.len(), 4, "{algo:?}");
            assert!(
                c.values().all(|v| (8_000..12_000).contains(v)),
                "{algo:?}: {c:?}"
            );
        }
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let t = targets(2);
        let _busy: Vec<InFlight> = (0..5).map(|_| t[0].stats.start()).collect();
        let b = Balancer::new(Algorithm::LeastRequest, t.clone());
        let c = spread(&b, 1000, false);
        assert_eq!(c.get(&t[0].addr), None, "{c:?}");
    }

    #[test]
    fn peak_ewma_prefers_the_faster_cluster_and_notices_a_change() {
        // Three endpoints in a near cluster (5 ms), three in a far one (40 ms): plain two
        // choices would still send a fifth to the far cluster; choosing the cluster first
        // sends it only the exploring picks.
        let mut t = targets(6);
        for (i, x) in t.iter_mut().enumerate() {
            let near = i < 3;
            x.origin = Arc::from(if near { "near" } else { "far" });
            x.stats
                .observe(Duration::from_millis(if near { 5 } else { 40 }));
        }
        let b = Balancer::new(Algorithm::PeakEwma, t.clone());
        let c = spread(&b, 10_000, false);
        let near: u64 = t[..3]
            .iter()
            .map(|x| c.get(&x.addr).copied().unwrap_or(0))
            .sum();
        assert!(near >= 9_300, "near cluster got {near} of 10000: {c:?}");
        assert!(near < 10_000, "the far cluster is still explored: {c:?}");
        // The near cluster slows down past the far one: its peak rises at once, so traffic
        // moves without waiting for an average to catch up.
        for x in &t[..3] {
            x.stats.observe(Duration::from_millis(80));
        }
        let c = spread(&b, 10_000, false);
        let far: u64 = t[3..]
            .iter()
            .map(|x| c.get(&x.addr).copied().unwrap_or(0))
            .sum();
        assert!(
            far >= 9_300,
            "after the change the other cluster got {far}: {c:?}"
        );
    }

    #[test]
    fn peak_ewma_prefers_the_faster_endpoint() {
        let t = targets(2);
        t[0].stats.observe(Duration::from_millis(40));
        t[1].stats.observe(Duration::from_millis(5));
        let b = Balancer::new(Algorithm::PeakEwma, t.clone());
        let c = spread(&b, 1000, false);
        // With two endpoints P2C always compares both: the slow one gets only the exploring
        // picks (one in 2 × EXPLORE_PAIR_ONE_IN, about 125 of 1000).
        let slow = c.get(&t[0].addr).copied().unwrap_or(0);
        assert!((60..=200).contains(&slow), "{c:?}");
        // The peak is taken at once; a lower sample moves it three quarters of the way (more
        // when time has passed), so a single hiccup fades within a sample or two.
        t[1].stats.observe(Duration::from_millis(80));
        let peak = t[1].stats.ewma().as_secs_f64() * 1000.0;
        assert!((79.9..=80.0).contains(&peak), "{peak} ms");
        t[1].stats.observe(Duration::from_millis(0));
        let after = t[1].stats.ewma().as_secs_f64() * 1000.0;
        assert!((19.5..=20.5).contains(&after), "{after} ms");
    }

    #[test]
    fn peak_ewma_shares_equal_endpoints_under_a_sequential_client() {
        // Loopback-fast endpoints (~200 µs, faster than the default estimate) and a client that
        // sends one request at a time: the first endpoint measured must not look better than
        // the one never tried for ever after, nor one hiccup keep an endpoint out.
        let t = targets(2);
        let b = Balancer::new(Algorithm::PeakEwma, t.clone());
        let mut counts = HashMap::new();
        for i in 0..300u64 {
            let picked = b.pick(hash64(&i.to_le_bytes()), None).expect("pick");
            // Jitter, and now and then a hiccup (a descheduled thread) ten times as long: the
            // estimate of the endpoint that had it stays above twice its rival's until it is
            // measured again, which only exploration does.
            let jitter = hash64(&(i ^ 0xabcd).to_le_bytes()) % 60;
            let hiccup = if i % 37 == 5 { 10 } else { 1 };
            picked
                .stats
                .observe(Duration::from_micros((170 + jitter) * hiccup));
            *counts.entry(picked.addr).or_insert(0u32) += 1;
        }
        for x in &t {
            let n = counts.get(&x.addr).copied().unwrap_or(0);
            assert!(
                (90..=210).contains(&n),
                "{} got {n} of 300: {counts:?}",
                x.addr
            );
        }
    }

    #[test]
    fn peak_ewma_starves_a_ten_times_slower_endpoint_at_eight_concurrent() {
        // A small event simulation: 8 requests in flight at all times, the fast endpoint
        // answers in 1 ms, the slow one in 10 ms; each completion starts the next request.
        let t = targets(2);
        let b = Balancer::new(Algorithm::PeakEwma, t.clone());
        let latency = |addr: SocketAddr| if addr == t[0].addr { 1_000u64 } else { 10_000 };
        let mut now = 0u64;
        let mut flying: Vec<(u64, SocketAddr, InFlight)> = Vec::new();
        let mut counts: HashMap<SocketAddr, u32> = HashMap::new();
        for i in 0..1000u64 {
            if flying.len() == 8 {
                let soonest = (0..flying.len())
                    .min_by_key(|k| flying[*k].0)
                    .expect("in flight");
                let (done, addr, guard) = flying.swap_remove(soonest);
                now = done;
                drop(guard);
                let stats = &t.iter().find(|x| x.addr == addr).expect("target").stats;
                stats.observe(Duration::from_micros(latency(addr)));
            }
            let picked = b.pick(hash64(&i.to_le_bytes()), None).expect("pick");
            *counts.entry(picked.addr).or_insert(0) += 1;
            flying.push((
                now + latency(picked.addr),
                picked.addr,
                picked.stats.start(),
            ));
        }
        let slow = counts.get(&t[1].addr).copied().unwrap_or(0);
        assert!(
            slow < 100,
            "the slow endpoint got {slow} of 1000: {counts:?}"
        );
        assert!(slow > 0, "the slow endpoint is still explored: {counts:?}");
    }

    #[test]
    fn hashing_is_sticky_and_spreads_keys() {
        for algo in [Algorithm::RingHash, Algorithm::Maglev] {
            let b = Balancer::new(algo, targets(5));
            let key = hash64(b"user-42");
            let first = b.pick(1, Some(key)).expect("pick").addr;
            for r in 0..100 {
                assert_eq!(b.pick(r, Some(key)).expect("pick").addr, first, "{algo:?}");
            }
            let c = spread(&b, 50_000, true);
            assert_eq!(c.len(), 5, "{algo:?}");
            assert!(
                c.values().all(|v| (7_000..13_000).contains(v)),
                "{algo:?}: {c:?}"
            );
        }
    }

    #[test]
    fn ejection_after_consecutive_failures_grows_and_skips() {
        let t = targets(3);
        let policy = OutlierPolicy {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            base_ejection: Duration::from_millis(30),
            max_ejection_percent: 50,
        };
        let s = &t[0].stats;
        assert!(!s.record_outcome(Outcome::Status(500), Some(&policy), || true));
        assert!(!s.record_outcome(Outcome::Status(500), Some(&policy), || true));
        // A success resets the count.
        assert!(!s.record_outcome(Outcome::Status(200), Some(&policy), || true));
        assert!(!s.record_outcome(Outcome::Status(500), Some(&policy), || true));
        assert!(!s.record_outcome(Outcome::Status(503), Some(&policy), || true));
        // The cap says no: not ejected.
        assert!(!s.record_outcome(Outcome::Status(500), Some(&policy), || false));
        assert!(s.record_outcome(Outcome::Status(500), Some(&policy), || true));
        assert!(s.is_ejected());
        let b = Balancer::new(Algorithm::RoundRobin, t.clone());
        let c = spread(&b, 300, false);
        assert_eq!(
            c.get(&t[0].addr),
            None,
            "ejected endpoint gets nothing: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(40));
        assert!(!s.is_ejected(), "back after base_ejection");
        // The second ejection lasts twice as long.
        for _ in 0..3 {
            s.record_outcome(Outcome::ConnectFailure, Some(&policy), || true);
        }
        assert_eq!(s.ejections(), 2);
        std::thread::sleep(Duration::from_millis(40));
        assert!(s.is_ejected(), "2 × 30 ms");
    }

    #[test]
    fn consistent_hashing_moves_few_keys_when_an_endpoint_leaves() {
        for algo in [Algorithm::RingHash, Algorithm::Maglev] {
            let all = targets(10);
            let before = Balancer::new(algo, all.clone());
            let after = Balancer::new(algo, all[..9].to_vec());
            let keys = 10_000u64;
            let moved = (0..keys)
                .filter(|k| {
                    let h = hash64(&k.to_le_bytes());
                    let a = before.pick(0, Some(h)).expect("pick").addr;
                    let b = after.pick(0, Some(h)).expect("pick").addr;
                    a != all[9].addr && a != b
                })
                .count();
            // Keys of the endpoint that left must move; others should mostly stay (ideal: 0).
            assert!(
                moved < keys as usize / 20,
                "{algo:?}: {moved} keys moved needlessly"
            );
        }
    }
}
