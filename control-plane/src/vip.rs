//! Clusterset virtual IPs (MCS ClusterSetIP semantics): one stable IPv4 address per
//! `<svc>.<ns>.svc.clusterset.local` name, from a configured range, that the mesh DNS answers
//! and the outbound listener recognises (the clusterset virtual host answers to `vip:port`).
//!
//! Allocation is a pure function of the set of clusterset names and their Services' creation
//! times, so every replica and every restart gives the same answer without shared state: a
//! name's address is the hash of the name into the range, and a name whose slot is taken by an
//! older one (by `creationTimestamp`, then by name; names without one after those with one)
//! probes the next free slot. A new Service therefore never moves an existing one's VIP —
//! whatever name it picks — except a name without a creation time (the file source, a service
//! only peers export), which yields to one that sorts before it; addresses never collide.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use crate::catalog::ServiceKey;

/// The default range: class E space, which no network routes, as Istio's DNS auto-allocation
/// uses (240.240.0.0/16 there; a /12 here, sixteen times fewer collisions to probe past).
pub const DEFAULT_RANGE: &str = "240.240.0.0/12";

/// An IPv4 CIDR range addresses are allocated from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipRange {
    base: u32,
    prefix: u8,
}

/// `--clusterset-vip-range`: a range, or `none` (no VIPs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipSetting(pub Option<VipRange>);

impl std::str::FromStr for VipSetting {
    type Err = RangeError;

    fn from_str(s: &str) -> Result<Self, RangeError> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(VipSetting(None));
        }
        s.parse().map(|r| VipSetting(Some(r)))
    }
}

/// A range that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("clusterset VIP range {range:?}: {why}")]
pub struct RangeError {
    /// What was given.
    pub range: String,
    /// What is wrong with it.
    pub why: String,
}

impl std::str::FromStr for VipRange {
    type Err = RangeError;

    fn from_str(s: &str) -> Result<Self, RangeError> {
        let err = |why: &str| RangeError {
            range: s.to_string(),
            why: why.to_string(),
        };
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| err("expected an IPv4 CIDR such as 240.240.0.0/12"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| err("the address is not IPv4 (IPv6 clusterset VIPs are not supported)"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| err("the prefix length is not a number"))?;
        if !(8..=30).contains(&prefix) {
            return Err(err(
                "the prefix length must be 8 to 30 (at least 4 addresses)",
            ));
        }
        let base = u32::from(addr);
        let mask = u32::MAX << (32 - prefix);
        if base & !mask != 0 {
            return Err(err("host bits are set (use the network address)"));
        }
        Ok(VipRange { base, prefix })
    }
}

impl std::fmt::Display for VipRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl VipRange {
    /// Usable addresses: the range without its first and last.
    fn slots(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => u32::from(v4) & (u32::MAX << (32 - self.prefix)) == self.base,
            IpAddr::V6(_) => false,
        }
    }

    /// The address of each of `names` with its Service's creation time (every one gets one
    /// while the range has room; the youngest past that get none).
    pub fn allocate<'a>(
        &self,
        names: impl IntoIterator<Item = (&'a ServiceKey, Option<i64>)>,
    ) -> BTreeMap<ServiceKey, IpAddr> {
        let mut names: Vec<(&ServiceKey, Option<i64>)> = names.into_iter().collect();
        // Oldest first; without a creation time after every one with it; then by name.
        names.sort_by_key(|(k, created)| (created.is_none(), *created, *k));
        names.dedup_by_key(|(k, _)| *k);
        let slots = self.slots();
        let mut taken: HashSet<u32> = HashSet::with_capacity(names.len());
        let mut out = BTreeMap::new();
        for (key, _) in names {
            if taken.len() as u64 >= u64::from(slots) {
                break;
            }
            let fqdn = format!("{}.{}.svc.clusterset.local", key.name, key.namespace);
            let mut slot = (fnv1a(fqdn.as_bytes()) % u64::from(slots)) as u32;
            while !taken.insert(slot) {
                slot = (slot + 1) % slots;
            }
            out.insert(
                key.clone(),
                IpAddr::V4(Ipv4Addr::from(self.base + 1 + slot)),
            );
        }
        out
    }
}

/// FNV-1a, 64 bits: stable across builds, platforms and versions (the allocation must not
/// change when the control plane is upgraded).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<ServiceKey> {
        (0..n)
            .map(|i| ServiceKey::new(format!("ns{}", i % 7), format!("svc-{i}")))
            .collect()
    }

    #[test]
    fn ranges_parse_and_refuse_with_the_reason() {
        let r: VipRange = DEFAULT_RANGE.parse().expect("default");
        assert_eq!(r.to_string(), "240.240.0.0/12");
        assert!(r.contains("240.255.255.254".parse().expect("ip")));
        assert!(!r.contains("241.0.0.1".parse().expect("ip")));
        for (bad, why) in [
            ("240.240.0.0", "CIDR"),
            ("fd00::/64", "IPv4"),
            ("240.240.0.1/12", "host bits"),
            ("240.240.0.0/31", "8 to 30"),
            ("240.240.0.0/x", "not a number"),
        ] {
            let e = bad.parse::<VipRange>().expect_err(bad);
            assert!(e.to_string().contains(why), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn every_name_gets_a_distinct_address_in_the_range_and_the_same_one_every_time() {
        let r: VipRange = "198.19.250.0/24".parse().expect("range");
        let ks = keys(200);
        let a = r.allocate(ks.iter().map(|k| (k, None)));
        assert_eq!(a.len(), 200);
        let distinct: HashSet<_> = a.values().collect();
        assert_eq!(distinct.len(), 200, "no two names share an address");
        for ip in a.values() {
            assert!(r.contains(*ip), "{ip}");
            assert_ne!(*ip, "198.19.250.0".parse::<IpAddr>().expect("ip"));
            assert_ne!(*ip, "198.19.250.255".parse::<IpAddr>().expect("ip"));
        }
        // Another order, the same answer (every replica, every restart).
        let mut rev = ks.clone();
        rev.reverse();
        assert_eq!(r.allocate(rev.iter().map(|k| (k, None))), a);
    }

    #[test]
    fn adding_names_moves_almost_none_of_the_existing_ones() {
        let r: VipRange = DEFAULT_RANGE.parse().expect("range");
        let ks = keys(1000);
        let before = r.allocate(ks[..900].iter().map(|k| (k, None)));
        let after = r.allocate(ks.iter().map(|k| (k, None)));
        let moved = before.iter().filter(|(k, ip)| after[*k] != **ip).count();
        assert!(moved <= 2, "{moved} of 900 moved");
    }

    /// An attacker who finds a name hashing to a victim's slot, and sorting before it, cannot
    /// take the victim's VIP by creating that Service: the older Service keeps it.
    #[test]
    fn a_new_service_never_takes_an_older_ones_vip() {
        let r: VipRange = "198.19.250.0/28".parse().expect("range");
        let victim = ServiceKey::new("shop", "payments");
        let mine = r.allocate([(&victim, Some(1_000))])[&victim];
        // A colliding name that sorts first: search the (small) range for one.
        let attacker = (0..10_000)
            .map(|i| ServiceKey::new("aaa", format!("x{i}")))
            .find(|k| r.allocate([(k, None)])[k] == mine && *k < victim)
            .expect("a colliding name");
        let both = r.allocate([(&victim, Some(1_000)), (&attacker, Some(2_000))]);
        assert_eq!(both[&victim], mine, "the older Service keeps its VIP");
        assert_ne!(both[&attacker], mine);
        // Without creation times (the file source) name order decides, as documented.
        let untimed = r.allocate([(&victim, None), (&attacker, None)]);
        assert_eq!(untimed[&attacker], mine);
    }

    #[test]
    fn a_full_range_gives_no_address_to_the_names_past_it() {
        let r: VipRange = "198.19.250.0/30".parse().expect("range");
        let ks = keys(5);
        let a = r.allocate(ks.iter().map(|k| (k, None)));
        assert_eq!(a.len(), 2, "{a:?}");
    }
}
