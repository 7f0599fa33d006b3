//! CPU lists in Linux cpulist syntax (`0-15`, `0,2,4`, and util-linux strides `0-7:2`),
//! with one canonical textual form used in compute ids, user names and the database.
//!
//! Parsing accepts comma-separated items `N`, `N-M` (N <= M) and `N-M:S` (N, N+S, ... <= M,
//! S >= 1); duplicates across items merge. Only the whole string is trimmed: no spaces inside.
//! Leading zeros in a number are accepted (`08` is 8), as the kernel does; they never appear in
//! the canonical form.
//!
//! The canonical form is built greedily from the lowest CPU: a run of consecutive CPUs becomes
//! `a-b`; otherwise three or more CPUs in arithmetic progression with step s >= 2 become `a-b:s`;
//! otherwise a single `a`. Items are joined with `,` (`{0,2,4,5,6}` → `0-4:2,5-6`).

use super::ModelError;
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Highest CPU number accepted (Linux NR_CPUS tops out at 8192).
pub(crate) const MAX_CPU: u32 = 8191;

/// A non-empty set of CPU numbers.
///
/// Serialized as its canonical string, and deserialized through the parser, so the
/// non-empty invariant holds for every value.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct CpuList(BTreeSet<u32>);

impl CpuList {
    /// Builds a list from CPU numbers; errors when empty or above MAX_CPU.
    pub(crate) fn from_cpus(cpus: impl IntoIterator<Item = u32>) -> Result<Self, ModelError> {
        let set: BTreeSet<u32> = cpus.into_iter().collect();
        let input = || set.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        if set.is_empty() {
            return Err(ModelError::CpuList {
                input: String::new(),
                reason: "the list is empty".into(),
            });
        }
        if let Some(&max) = set.last().filter(|&&c| c > MAX_CPU) {
            return Err(ModelError::CpuList {
                input: input(),
                reason: format!("CPU {max} is above the maximum {MAX_CPU}"),
            });
        }
        Ok(CpuList(set))
    }
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
    pub(crate) fn first(&self) -> u32 {
        // Every constructor rejects empty sets, so this cannot fail.
        *self.0.first().expect("CpuList is never empty")
    }
    pub(crate) fn last(&self) -> u32 {
        *self.0.last().expect("CpuList is never empty")
    }
    pub(crate) fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }
    pub(crate) fn overlaps(&self, other: &CpuList) -> bool {
        // Probe the smaller set against the larger one.
        let (small, large) = if self.len() <= other.len() {
            (self, other)
        } else {
            (other, self)
        };
        small.iter().any(|c| large.contains(c))
    }
    #[cfg(test)]
    pub(crate) fn is_subset(&self, other: &CpuList) -> bool {
        self.0.is_subset(&other.0)
    }
    /// CPUs of `self` not in `other`.
    pub(crate) fn difference(&self, other: &CpuList) -> Vec<u32> {
        self.0.difference(&other.0).copied().collect()
    }
    /// Form systemd understands (`AllowedCPUs=`): plain ranges and singles, no strides: `0-3,8,10-11`.
    pub(crate) fn to_ranges(&self) -> String {
        self.runs()
            .into_iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
    /// Contiguous runs as inclusive (first, last) pairs, ascending.
    pub(crate) fn runs(&self) -> Vec<(u32, u32)> {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for c in self.iter() {
            match runs.last_mut() {
                Some((_, end)) if *end + 1 == c => *end = c,
                _ => runs.push((c, c)),
            }
        }
        runs
    }
}

/// One item of the canonical form.
enum Item {
    Single(u32),
    Range(u32, u32),
    Stride(u32, u32, u32),
}

/// Greedy split of a sorted, duplicate-free slice into canonical items.
fn canonical_items(v: &[u32]) -> Vec<Item> {
    let mut items = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let a = v[i];
        if i + 1 < v.len() && v[i + 1] == a + 1 {
            let mut j = i + 1;
            while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
                j += 1;
            }
            items.push(Item::Range(a, v[j]));
            i = j + 1;
        } else if i + 2 < v.len() && v[i + 2] - v[i + 1] == v[i + 1] - a {
            // Not consecutive and sorted without duplicates, so the step is at least 2.
            let s = v[i + 1] - a;
            let mut j = i + 2;
            while j + 1 < v.len() && v[j + 1] - v[j] == s {
                j += 1;
            }
            items.push(Item::Stride(a, v[j], s));
            i = j + 1;
        } else {
            items.push(Item::Single(a));
            i += 1;
        }
    }
    items
}

/// Parses a non-empty run of ASCII digits, rejecting signs, spaces and values above `max`.
fn parse_number(text: &str, what: &str, max: u32) -> Result<u32, String> {
    if text.is_empty() {
        return Err(format!("missing {what}"));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} {text:?} is not a number"));
    }
    // Digits only, so the only parse failure left is overflow: above any max.
    match text.parse::<u32>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("{what} {text} is above the maximum {max}")),
    }
}

/// Parses one comma-separated item into the CPUs it names.
fn parse_item(item: &str, set: &mut BTreeSet<u32>) -> Result<(), String> {
    let (range, stride) = match item.split_once(':') {
        Some((range, stride)) => (range, Some(stride)),
        None => (item, None),
    };
    let (start, end) = match range.split_once('-') {
        Some((a, b)) => (
            parse_number(a, "CPU", MAX_CPU)?,
            parse_number(b, "CPU", MAX_CPU)?,
        ),
        None if stride.is_some() => {
            return Err(format!("item {item:?}: a stride needs a range (N-M:S)"));
        }
        None => {
            let n = parse_number(range, "CPU", MAX_CPU)?;
            (n, n)
        }
    };
    if start > end {
        return Err(format!(
            "item {item:?}: range start {start} is greater than its end {end}"
        ));
    }
    let step = match stride {
        // The stride is not a CPU number; u32::MAX only guards against overflow.
        Some(s) => parse_number(s, "stride", u32::MAX)?,
        None => 1,
    };
    if step == 0 {
        return Err(format!("item {item:?}: stride must be at least 1"));
    }
    let step = usize::try_from(step).unwrap_or(usize::MAX);
    set.extend((start..=end).step_by(step));
    Ok(())
}

impl FromStr for CpuList {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ModelError::CpuList {
            input: s.to_string(),
            reason,
        };
        let text = s.trim();
        if text.is_empty() {
            return Err(err("the list is empty".into()));
        }
        let mut set = BTreeSet::new();
        for item in text.split(',') {
            if item.is_empty() {
                return Err(err("empty item (stray or doubled ',')".into()));
            }
            parse_item(item, &mut set).map_err(err)?;
        }
        Ok(CpuList(set))
    }
}

impl TryFrom<String> for CpuList {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CpuList> for String {
    fn from(cpus: CpuList) -> String {
        cpus.to_string()
    }
}

/// The canonical form (see module docs of `names` for how it becomes a user name).
impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v: Vec<u32> = self.iter().collect();
        for (n, item) in canonical_items(&v).into_iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            match item {
                Item::Single(a) => write!(f, "{a}")?,
                Item::Range(a, b) => write!(f, "{a}-{b}")?,
                Item::Stride(a, b, s) => write!(f, "{a}-{b}:{s}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(cpus: &[u32]) -> CpuList {
        CpuList::from_cpus(cpus.iter().copied()).unwrap()
    }

    fn parse(s: &str) -> CpuList {
        s.parse::<CpuList>()
            .unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn reason(s: &str) -> String {
        match s.parse::<CpuList>() {
            Err(ModelError::CpuList { input, reason }) => {
                assert_eq!(input, s, "error keeps the original input");
                reason
            }
            other => panic!("{s:?} should be a CpuList error, got {other:?}"),
        }
    }

    #[test]
    fn parses_valid_syntax() {
        let cases: &[(&str, &[u32])] = &[
            ("0", &[0]),
            ("7", &[7]),
            ("0-3", &[0, 1, 2, 3]),
            ("5-5", &[5]),
            ("0,2,4", &[0, 2, 4]),
            ("0-7:2", &[0, 2, 4, 6]),
            ("0-8:2", &[0, 2, 4, 6, 8]),
            ("1-10:3", &[1, 4, 7, 10]),
            ("1-11:3", &[1, 4, 7, 10]),
            ("0-3:1", &[0, 1, 2, 3]),
            ("3-3:5", &[3]),
            ("0-2:100", &[0]),
            ("0-3,8,10-11", &[0, 1, 2, 3, 8, 10, 11]),
            ("4,0-2", &[0, 1, 2, 4]),
            ("0-3,2-5", &[0, 1, 2, 3, 4, 5]),
            ("1,1,1", &[1]),
            ("  0-3\n", &[0, 1, 2, 3]),
            ("08", &[8]),
            ("8191", &[8191]),
            ("8190-8191", &[8190, 8191]),
        ];
        for (text, cpus) in cases {
            assert_eq!(parse(text), set(cpus), "parsing {text:?}");
        }
    }

    #[test]
    fn rejects_invalid_syntax_with_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("   ", "empty"),
            (",", "empty item"),
            ("0,", "empty item"),
            (",0", "empty item"),
            ("0,,1", "empty item"),
            ("5-3", "greater than"),
            ("0-7:0", "at least 1"),
            ("8192", "above the maximum 8191"),
            ("0-8192", "above the maximum 8191"),
            ("99999999999999999999", "above the maximum"),
            ("0-7:99999999999999999999", "stride"),
            ("a", "not a number"),
            ("0-x", "not a number"),
            ("0-7:x", "not a number"),
            ("+1", "not a number"),
            ("-1", "missing CPU"),
            ("1-", "missing CPU"),
            ("0-7:", "missing stride"),
            ("0-7:-1", "not a number"),
            ("0 - 3", "not a number"),
            ("0, 1", "not a number"),
            ("1-2-3", "not a number"),
            ("0:2", "needs a range"),
            ("0-7:2:1", "not a number"),
            ("١", "not a number"),
        ];
        for (text, expected) in cases {
            let r = reason(text);
            assert!(
                r.contains(expected),
                "{text:?}: reason {r:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn error_display_names_input_and_reason() {
        let e = "5-3".parse::<CpuList>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid CPU list \"5-3\": item \"5-3\": range start 5 is greater than its end 3"
        );
    }

    #[test]
    fn canonical_display() {
        let cases: &[(&[u32], &str)] = &[
            (&[7], "7"),
            (&[0, 1], "0-1"),
            (&[0, 2], "0,2"),
            (&[0, 2, 4], "0-4:2"),
            (&[0, 2, 4, 5, 6], "0-4:2,5-6"),
            (&[0, 1, 2, 4, 6, 8], "0-2,4-8:2"),
            (&[0, 3, 6, 9, 10], "0-9:3,10"),
            (&[0, 2, 5], "0,2,5"),
            (&[0, 2, 5, 8], "0,2-8:3"),
            (&[1, 5, 9, 13, 17, 18, 19], "1-17:4,18-19"),
            (&[0, 4, 8, 9], "0-8:4,9"),
            (&[0, 4, 8, 9, 10], "0-8:4,9-10"),
            (&[0, 8191], "0,8191"),
            (&[0, 4095, 8190], "0-8190:4095"),
            (&[0, 1, 2, 3, 8, 10, 11], "0-3,8,10-11"),
        ];
        for (cpus, text) in cases {
            assert_eq!(set(cpus).to_string(), *text, "display of {cpus:?}");
            assert_eq!(parse(text), set(cpus), "{text:?} parses back");
        }
        let all: Vec<u32> = (0..16).collect();
        assert_eq!(set(&all).to_string(), "0-15");
    }

    #[test]
    fn non_canonical_input_displays_canonically() {
        let cases: &[(&str, &str)] = &[
            ("0,1,2,3", "0-3"),
            ("0-7:2", "0-6:2"),
            ("0,2,4", "0-4:2"),
            ("4,0,2", "0-4:2"),
            ("0-3:1", "0-3"),
            ("00-015", "0-15"),
            ("0-1,1-2", "0-2"),
        ];
        for (input, canonical) in cases {
            assert_eq!(
                parse(input).to_string(),
                *canonical,
                "canonical of {input:?}"
            );
        }
    }

    #[test]
    fn to_ranges_has_no_strides() {
        let cases: &[(&[u32], &str)] = &[
            (&[0, 2, 4], "0,2,4"),
            (&[0, 1, 2, 3, 8, 10, 11], "0-3,8,10-11"),
            (&[5], "5"),
            (&[0, 1], "0-1"),
        ];
        for (cpus, text) in cases {
            assert_eq!(set(cpus).to_ranges(), *text);
        }
    }

    #[test]
    fn runs_are_contiguous_pairs() {
        assert_eq!(
            set(&[0, 1, 2, 3, 8, 10, 11]).runs(),
            vec![(0, 3), (8, 8), (10, 11)]
        );
        assert_eq!(set(&[4]).runs(), vec![(4, 4)]);
    }

    #[test]
    fn from_cpus_rules() {
        assert!(matches!(
            CpuList::from_cpus([]),
            Err(ModelError::CpuList { .. })
        ));
        let e = CpuList::from_cpus([1, 9000]).unwrap_err();
        assert!(e.to_string().contains("9000"), "{e}");
        assert_eq!(CpuList::from_cpus([3, 1, 3]).unwrap(), set(&[1, 3]));
        assert_eq!(CpuList::from_cpus([MAX_CPU]).unwrap().last(), MAX_CPU);
    }

    #[test]
    fn set_operations() {
        let a = parse("0-7");
        let b = parse("4-11");
        let c = parse("8-15");
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && !c.overlaps(&a));
        assert_eq!(b.difference(&a), vec![8, 9, 10, 11]);
        assert_eq!(a.difference(&a), Vec::<u32>::new());
        assert_eq!((a.first(), a.last(), a.len()), (0, 7, 8));
        assert!(a.contains(7) && !a.contains(8));
        assert_eq!(parse("0-6:3").iter().collect::<Vec<_>>(), vec![0, 3, 6]);
    }

    #[test]
    fn serde_uses_canonical_string() {
        let json = serde_json::to_string(&parse("0,2,4")).unwrap();
        assert_eq!(json, "\"0-4:2\"");
        let back: CpuList = serde_json::from_str("\"0-3,8\"").unwrap();
        assert_eq!(back, set(&[0, 1, 2, 3, 8]));
        assert!(serde_json::from_str::<CpuList>("\"\"").is_err());
        assert!(serde_json::from_str::<CpuList>("\"5-3\"").is_err());
    }

    /// Arbitrary sets: sparse, dense, and unions of arithmetic progressions.
    pub(crate) fn any_cpulist() -> impl Strategy<Value = CpuList> {
        let sparse = prop::collection::btree_set(0..=MAX_CPU, 1..40);
        let dense = prop::collection::btree_set(0u32..64, 1..64);
        let strided = prop::collection::vec((0u32..200, 1u32..9, 1usize..12), 1..6).prop_map(
            |progressions| {
                progressions
                    .into_iter()
                    .flat_map(|(start, step, count)| {
                        (0..count as u32).map(move |k| start + k * step)
                    })
                    .collect::<BTreeSet<u32>>()
            },
        );
        prop_oneof![sparse, dense, strided].prop_map(|s| CpuList::from_cpus(s).unwrap())
    }

    proptest! {
        #[test]
        fn display_parses_back(cpus in any_cpulist()) {
            let text = cpus.to_string();
            prop_assert_eq!(text.parse::<CpuList>().unwrap(), cpus);
        }

        #[test]
        fn display_is_stable(cpus in any_cpulist()) {
            let text = cpus.to_string();
            prop_assert_eq!(text.parse::<CpuList>().unwrap().to_string(), text);
        }

        #[test]
        fn to_ranges_parses_back(cpus in any_cpulist()) {
            let ranges = cpus.to_ranges();
            prop_assert!(!ranges.contains(':'));
            prop_assert_eq!(ranges.parse::<CpuList>().unwrap(), cpus);
        }

        #[test]
        fn canonical_alphabet(cpus in any_cpulist()) {
            let text = cpus.to_string();
            prop_assert!(text.chars().all(|c| c.is_ascii_digit() || matches!(c, '-' | ',' | ':')), "{}", text);
            prop_assert!(!text.is_empty());
        }

        #[test]
        fn runs_cover_the_set(cpus in any_cpulist()) {
            let runs = cpus.runs();
            let covered: BTreeSet<u32> = runs.iter().flat_map(|&(a, b)| a..=b).collect();
            prop_assert_eq!(covered, cpus.iter().collect::<BTreeSet<u32>>());
            // Runs are maximal: never adjacent to each other.
            for w in runs.windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0);
            }
        }

        #[test]
        fn overlaps_agrees_with_intersection(a in any_cpulist(), b in any_cpulist()) {
            let brute = a.iter().any(|c| b.iter().any(|d| c == d));
            prop_assert_eq!(a.overlaps(&b), brute);
            prop_assert_eq!(b.overlaps(&a), brute);
        }

        #[test]
        fn subset_and_difference_agree(a in any_cpulist(), b in any_cpulist()) {
            let diff = a.difference(&b);
            prop_assert_eq!(diff.is_empty(), a.is_subset(&b));
            prop_assert!(diff.iter().all(|&c| a.contains(c) && !b.contains(c)));
        }

        #[test]
        fn parser_never_panics(s in "[0-9,:\\- ]{0,20}") {
            let _ = s.parse::<CpuList>();
        }
    }
}
