//! Port ranges: each CPU owns a fixed block of `per_cpu` ports starting at `base`, so a unit's
//! ports follow from its CPU list alone and two units with disjoint CPUs never share a port.

use super::{CpuList, ModelError};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

pub(crate) const DEFAULT_BASE: u16 = 2000;
pub(crate) const DEFAULT_PER_CPU: u16 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortPlan {
    pub base: u16,
    pub per_cpu: u16,
}

/// Sorted, non-overlapping, non-adjacent inclusive port ranges. Displays as `2000-2099` or
/// `2000-2099,2200-2299`; a range of one port displays as the bare port (`2000`).
///
/// Serialized as that string.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRanges(pub Vec<(u16, u16)>);

impl Default for PortPlan {
    fn default() -> Self {
        PortPlan {
            base: DEFAULT_BASE,
            per_cpu: DEFAULT_PER_CPU,
        }
    }
}

impl PortPlan {
    /// Errors when base is 0 or per_cpu is 0.
    pub(crate) fn new(base: u16, per_cpu: u16) -> Result<Self, ModelError> {
        if base == 0 {
            return Err(ModelError::Ports("base port must be at least 1".into()));
        }
        if per_cpu == 0 {
            return Err(ModelError::Ports("ports per CPU must be at least 1".into()));
        }
        Ok(PortPlan { base, per_cpu })
    }
    /// CPU c owns [base + c*per_cpu, base + (c+1)*per_cpu - 1]; adjacent blocks are merged.
    /// Errors (ModelError::Ports) when any port would exceed 65535 or reach `ephemeral_low`
    /// (the kernel's ip_local_port_range start) when given.
    pub(crate) fn ranges_for(
        &self,
        cpus: &CpuList,
        ephemeral_low: Option<u16>,
    ) -> Result<PortRanges, ModelError> {
        // The fields are public, so a plan may not have gone through `new`.
        let plan = PortPlan::new(self.base, self.per_cpu)?;
        let base = u32::from(plan.base);
        let per_cpu = u32::from(plan.per_cpu);
        // Ports grow with the CPU number, so checking the highest CPU checks them all;
        // u32 cannot overflow here (65535 + 8192 * 65535 < 2^32).
        let last = cpus.last();
        let lowest_of_last = base + last * per_cpu;
        let highest = lowest_of_last + per_cpu - 1;
        let limit_err = |what: String| {
            ModelError::Ports(format!(
                "CPU {last} would get ports {lowest_of_last}-{highest}, {what}; \
                 lower the base port or the ports per CPU"
            ))
        };
        // The ephemeral limit is the tighter one, so it is the one worth reporting.
        match ephemeral_low {
            Some(lo) if highest >= u32::from(lo) => {
                return Err(limit_err(format!(
                    "reaching the kernel's ephemeral port range, which starts at {lo}"
                )));
            }
            _ if highest > 65535 => {
                return Err(limit_err("above the highest port 65535".into()));
            }
            _ => {}
        }
        let ranges = cpus
            .runs()
            .into_iter()
            .map(|(a, b)| {
                let lo = base + a * per_cpu;
                let hi = base + (b + 1) * per_cpu - 1;
                // Both are <= highest <= 65535, checked above.
                (lo as u16, hi as u16)
            })
            .collect();
        Ok(PortRanges(ranges))
    }
}

/// Test oracles: the properties below prove with them that units' port ranges never overlap.
#[cfg(test)]
impl PortRanges {
    pub(crate) fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= port && port <= hi)
    }
    pub(crate) fn overlaps(&self, other: &PortRanges) -> bool {
        // Pairwise, so it stays right even for a hand-built value that is not sorted.
        self.0.iter().any(|&(a_lo, a_hi)| {
            other
                .0
                .iter()
                .any(|&(b_lo, b_hi)| a_lo <= b_hi && b_lo <= a_hi)
        })
    }
    pub(crate) fn count(&self) -> u32 {
        self.0
            .iter()
            .map(|&(lo, hi)| u32::from(hi).saturating_sub(u32::from(lo)) + 1)
            .sum()
    }
}

impl fmt::Display for PortRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, &(lo, hi)) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

/// A port 1..=65535 written as plain ASCII digits.
fn parse_port(text: &str) -> Result<u16, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a port number"));
    }
    match text.parse::<u16>() {
        Ok(0) => Err("port 0 is not a valid port".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("port {text} is above 65535")),
    }
}

/// Parses the Display form. Ranges must already be sorted, disjoint and not adjacent, so each
/// value has exactly one text.
impl FromStr for PortRanges {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ModelError::Ports(format!("port ranges {s:?}: {reason}"));
        let text = s.trim();
        if text.is_empty() {
            return Err(err("empty".into()));
        }
        let mut ranges: Vec<(u16, u16)> = Vec::new();
        for item in text.split(',') {
            let (lo, hi) = match item.split_once('-') {
                Some((lo, hi)) => (parse_port(lo).map_err(err)?, parse_port(hi).map_err(err)?),
                None => {
                    let p = parse_port(item).map_err(err)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(err(format!("range {item} starts after it ends")));
            }
            let follows = ranges
                .last()
                .is_none_or(|&(_, prev_hi)| u32::from(lo) > u32::from(prev_hi) + 1);
            if !follows {
                return Err(err(format!(
                    "range {item} is not sorted after, or overlaps or touches, the one before"
                )));
            }
            ranges.push((lo, hi));
        }
        Ok(PortRanges(ranges))
    }
}

impl TryFrom<String> for PortRanges {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PortRanges> for String {
    fn from(ranges: PortRanges) -> String {
        ranges.to_string()
    }
}

/// Reads `<root>/proc/sys/net/ipv4/ip_local_port_range` ("32768\t60999"); None when absent or unreadable.
pub(crate) fn ephemeral_range(root: &Path) -> Option<(u16, u16)> {
    let text = std::fs::read_to_string(root.join("proc/sys/net/ipv4/ip_local_port_range")).ok()?;
    let mut fields = text.split_whitespace();
    let lo = fields.next()?.parse::<u16>().ok()?;
    let hi = fields.next()?.parse::<u16>().ok()?;
    // Anything else is not the kernel's format: better no answer than a wrong one.
    (fields.next().is_none() && lo <= hi).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpulist::MAX_CPU;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn cpus(s: &str) -> CpuList {
        s.parse().unwrap()
    }

    fn plan() -> PortPlan {
        PortPlan::new(DEFAULT_BASE, DEFAULT_PER_CPU).unwrap()
    }

    #[test]
    fn new_rejects_zero() {
        assert!(matches!(PortPlan::new(0, 100), Err(ModelError::Ports(_))));
        assert!(matches!(PortPlan::new(2000, 0), Err(ModelError::Ports(_))));
        assert_eq!(
            PortPlan::new(1, 1).unwrap(),
            PortPlan {
                base: 1,
                per_cpu: 1
            }
        );
        assert_eq!(PortPlan::default(), plan());
    }

    #[test]
    fn ranges_table() {
        let cases: &[(&str, &str)] = &[
            ("0", "2000-2099"),
            ("0-1", "2000-2199"),
            ("0-15", "2000-3599"),
            ("16-31", "3600-5199"),
            ("0,2", "2000-2099,2200-2299"),
            ("0-3,8,10-11", "2000-2399,2800-2899,3000-3199"),
            ("0-6:3", "2000-2099,2300-2399,2600-2699"),
        ];
        for (list, expected) in cases {
            let r = plan().ranges_for(&cpus(list), None).unwrap();
            assert_eq!(r.to_string(), *expected, "ports of {list}");
        }
        let single = PortPlan::new(10000, 1).unwrap();
        assert_eq!(
            single.ranges_for(&cpus("0,2"), None).unwrap(),
            PortRanges(vec![(10000, 10000), (10002, 10002)])
        );
        assert_eq!(
            single.ranges_for(&cpus("0-1"), None).unwrap(),
            PortRanges(vec![(10000, 10001)])
        );
    }

    #[test]
    fn ranges_limits() {
        // CPU 305 ends exactly at 32599 with the defaults.
        let p = plan();
        assert!(p.ranges_for(&cpus("305"), Some(32600)).is_ok());
        let e = p.ranges_for(&cpus("300-306"), Some(32600)).unwrap_err();
        let ModelError::Ports(msg) = e else {
            panic!("expected Ports")
        };
        assert!(msg.contains("CPU 306"), "{msg}");
        assert!(msg.contains("32600"), "{msg}");
        assert!(msg.contains("ephemeral"), "{msg}");

        // 65535 itself is a usable port; 65536 is not.
        let p = PortPlan::new(65436, 100).unwrap();
        assert_eq!(
            p.ranges_for(&cpus("0"), None).unwrap(),
            PortRanges(vec![(65436, 65535)])
        );
        let ModelError::Ports(msg) = p.ranges_for(&cpus("0-1"), None).unwrap_err() else {
            panic!("expected Ports")
        };
        assert!(msg.contains("CPU 1"), "{msg}");
        assert!(msg.contains("65535"), "{msg}");

        // The biggest plan on the biggest CPU must error, not overflow.
        let p = PortPlan::new(u16::MAX, u16::MAX).unwrap();
        assert!(p.ranges_for(&cpus(&MAX_CPU.to_string()), None).is_err());
        assert!(p.ranges_for(&cpus("0"), Some(1)).is_err());
    }

    #[test]
    fn ranges_for_rejects_unchecked_plan() {
        let zero = PortPlan {
            base: 2000,
            per_cpu: 0,
        };
        assert!(matches!(
            zero.ranges_for(&cpus("0"), None),
            Err(ModelError::Ports(_))
        ));
    }

    #[test]
    fn from_str_table() {
        let ok: &[(&str, &[(u16, u16)])] = &[
            ("2000-2099", &[(2000, 2099)]),
            ("2000-2099,2200-2299", &[(2000, 2099), (2200, 2299)]),
            ("2000", &[(2000, 2000)]),
            ("2000-2000", &[(2000, 2000)]),
            (" 1-65535\n", &[(1, 65535)]),
            ("10,12", &[(10, 10), (12, 12)]),
        ];
        for (text, ranges) in ok {
            assert_eq!(
                text.parse::<PortRanges>().unwrap(),
                PortRanges(ranges.to_vec()),
                "{text:?}"
            );
        }
        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            ("2000,", "not a port"),
            ("a-b", "not a port"),
            ("+2000", "not a port"),
            ("2000 - 2099", "not a port"),
            ("0-10", "port 0"),
            ("65536", "above 65535"),
            ("2099-2000", "starts after"),
            ("2200-2299,2000-2099", "not sorted"),
            ("2000-2099,2050-2150", "overlaps"),
            ("2000-2099,2100-2199", "touches"),
            ("10,11", "touches"),
            ("1-2-3", "not a port"),
        ];
        for (text, expected) in bad {
            match text.parse::<PortRanges>() {
                Err(ModelError::Ports(msg)) => {
                    assert!(
                        msg.contains(expected),
                        "{text:?}: {msg:?} lacks {expected:?}"
                    )
                }
                other => panic!("{text:?} should fail, got {other:?}"),
            }
        }
    }

    #[test]
    fn display_single_port_is_bare() {
        assert_eq!(PortRanges(vec![(2000, 2000)]).to_string(), "2000");
        assert_eq!(
            PortRanges(vec![(2000, 2000), (2002, 2010)]).to_string(),
            "2000,2002-2010"
        );
    }

    #[test]
    fn serde_as_string() {
        let r = PortRanges(vec![(2000, 2099), (2200, 2299)]);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            "\"2000-2099,2200-2299\""
        );
        let back: PortRanges = serde_json::from_str("\"2000-2099,2200-2299\"").unwrap();
        assert_eq!(back, r);
        assert!(serde_json::from_str::<PortRanges>("\"5-1\"").is_err());
    }

    #[test]
    fn ephemeral_range_reads_proc() {
        let dir = tempfile::TempDir::new().unwrap();
        assert_eq!(ephemeral_range(dir.path()), None);
        let path = dir.path().join("proc/sys/net/ipv4");
        std::fs::create_dir_all(&path).unwrap();
        let file = path.join("ip_local_port_range");
        let cases: &[(&str, Option<(u16, u16)>)] = &[
            ("32768\t60999\n", Some((32768, 60999))),
            ("1024 65535", Some((1024, 65535))),
            ("", None),
            ("32768", None),
            ("60999\t32768\n", None),
            ("32768\t70000\n", None),
            ("a b", None),
            ("1 2 3", None),
        ];
        for (content, expected) in cases {
            std::fs::write(&file, content).unwrap();
            assert_eq!(ephemeral_range(dir.path()), *expected, "{content:?}");
        }
    }

    /// Two disjoint CPU sets drawn from CPUs below 300 (within the default plan's room).
    fn disjoint_pair() -> impl Strategy<Value = (CpuList, CpuList)> {
        prop::collection::vec(0u8..3, 300).prop_filter_map("both sides non-empty", |owners| {
            let pick = |side| {
                owners
                    .iter()
                    .enumerate()
                    .filter(|&(_, &o)| o == side)
                    .map(|(c, _)| c as u32)
                    .collect::<BTreeSet<u32>>()
            };
            let a = CpuList::from_cpus(pick(1)).ok()?;
            let b = CpuList::from_cpus(pick(2)).ok()?;
            Some((a, b))
        })
    }

    fn any_ranges() -> impl Strategy<Value = PortRanges> {
        // Sorted distinct cut points → disjoint, non-adjacent ranges.
        prop::collection::btree_set(1u16..=65535, 1..20).prop_map(|points| {
            let points: Vec<u16> = points.into_iter().collect();
            let mut ranges: Vec<(u16, u16)> = Vec::new();
            for chunk in points.chunks(2) {
                let lo = chunk[0];
                let hi = *chunk.last().unwrap_or(&lo);
                match ranges.last() {
                    Some(&(_, prev)) if u32::from(lo) <= u32::from(prev) + 1 => {}
                    _ => ranges.push((lo, hi)),
                }
            }
            PortRanges(ranges)
        })
    }

    #[test]
    fn contains_count_overlaps() {
        let r = PortRanges(vec![(2000, 2099), (2200, 2299)]);
        assert!(r.contains(2000) && r.contains(2099) && r.contains(2250));
        assert!(!r.contains(1999) && !r.contains(2100) && !r.contains(2300));
        assert_eq!(r.count(), 200);
        assert_eq!(PortRanges(vec![(1, 65535)]).count(), 65535);
        assert_eq!(PortRanges(vec![]).count(), 0);
        assert!(r.overlaps(&PortRanges(vec![(2099, 2099)])));
        assert!(r.overlaps(&PortRanges(vec![(2150, 2200)])));
        assert!(!r.overlaps(&PortRanges(vec![(2100, 2199)])));
        assert!(!r.overlaps(&PortRanges(vec![])));
    }

    proptest! {
        #[test]
        fn disjoint_cpus_get_disjoint_ports(
            (a, b) in disjoint_pair(),
            base in 1024u16..3000,
            per_cpu in 1u16..100,
        ) {
            let p = PortPlan::new(base, per_cpu).unwrap();
            let ra = p.ranges_for(&a, None).unwrap();
            let rb = p.ranges_for(&b, None).unwrap();
            prop_assert!(!ra.overlaps(&rb));
            prop_assert_eq!(ra.count(), a.len() as u32 * u32::from(per_cpu));
            prop_assert_eq!(rb.count(), b.len() as u32 * u32::from(per_cpu));
            // The invariant of the type holds: sorted, disjoint, not adjacent.
            for w in ra.0.windows(2) {
                prop_assert!(u32::from(w[0].1) + 1 < u32::from(w[1].0));
            }
            // Every port belongs to the block of one of the unit's CPUs.
            for &(lo, hi) in &ra.0 {
                for port in [lo, hi] {
                    let cpu = u32::from(port - base) / u32::from(per_cpu);
                    prop_assert!(a.contains(cpu));
                }
            }
        }

        #[test]
        fn ranges_stay_below_limit(
            cpus in prop::collection::btree_set(0..=MAX_CPU, 1..10),
            base in 1u16..=65535,
            per_cpu in 1u16..=1000,
            eph in proptest::option::of(1u16..=65535),
        ) {
            let cpus = CpuList::from_cpus(cpus).unwrap();
            let p = PortPlan::new(base, per_cpu).unwrap();
            let highest = u32::from(base) + (cpus.last() + 1) * u32::from(per_cpu) - 1;
            let limit = eph.map_or(65535, |e| u32::from(e) - 1).min(65535);
            match p.ranges_for(&cpus, eph) {
                Ok(r) => {
                    prop_assert!(highest <= limit);
                    prop_assert_eq!(r.0.last().map(|&(_, hi)| u32::from(hi)), Some(highest));
                    prop_assert_eq!(r.count(), cpus.len() as u32 * u32::from(per_cpu));
                }
                Err(ModelError::Ports(msg)) => {
                    prop_assert!(highest > limit);
                    let expected = format!("CPU {}", cpus.last());
                    prop_assert!(msg.contains(&expected), "{}", msg);
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }

        #[test]
        fn display_from_str_round_trip(r in any_ranges()) {
            let text = r.to_string();
            prop_assert_eq!(text.parse::<PortRanges>().unwrap(), r);
        }

        #[test]
        fn overlaps_matches_brute_force(a in any_ranges(), b in any_ranges()) {
            let set = |r: &PortRanges| -> BTreeSet<u16> {
                r.0.iter().flat_map(|&(lo, hi)| lo..=hi).collect()
            };
            let brute = !set(&a).is_disjoint(&set(&b));
            prop_assert_eq!(a.overlaps(&b), brute);
            prop_assert_eq!(b.overlaps(&a), brute);
            prop_assert_eq!(a.count() as usize, set(&a).len());
        }

        #[test]
        fn contains_matches_ranges(r in any_ranges(), port in 1u16..=65535) {
            let brute = r.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&port));
            prop_assert_eq!(r.contains(port), brute);
        }
    }
}
