//! Deterministic names of a compute unit: compute id, Unix user, directories, UID.
//!
//! The canonical CPU list becomes a name token by mapping `,` to `_` and `:` to `s`
//! (`0-15` → `0-15`, `0,2,4` → canonical `0-4:2` → `0-4s2`, `0-3,8` → `0-3_8`). The mapping is
//! injective, and the result is a valid Debian/RHEL user name once prefixed by a letter.
//!
//! Why injective: the canonical form uses only digits, `-`, `,` and `:`, and neither `_` nor `s`
//! appears in it, so the character mapping can be undone; and each CPU set has exactly one
//! canonical form. Why a valid user name: `u` followed by `[0-9s_-]` matches both Debian's
//! `^[a-z][-a-z0-9_]*$` and shadow-utils' `^[a-z_][a-z0-9_-]*$`.

#[cfg(test)]
use super::validate;
use super::{CpuList, ModelError};

/// Longest user name we create (systemd and utmp-safe).
pub(crate) const MAX_USER_LEN: usize = 31;

/// `<hostname>_<canonical cpu list>`.
pub(crate) fn compute_id(hostname: &str, cpus: &CpuList) -> String {
    format!("{hostname}_{cpus}")
}

/// Splits a compute id at its first `_` (hostnames cannot hold `_`) and parses the CPU list.
/// Returns None when it is not `<valid hostname>_<cpulist>`.
///
/// The CPU part must also be in canonical form (`host_0-15`, not `host_0,1-15`), so that each
/// unit has exactly one id. Only the tests need it: they prove with it that `compute_id` is
/// unambiguous.
#[cfg(test)]
fn parse_compute_id(id: &str) -> Option<(String, CpuList)> {
    let (host, cpu_text) = id.split_once('_')?;
    validate::hostname(host).ok()?;
    let cpus: CpuList = cpu_text.parse().ok()?;
    // The parser trims and accepts many spellings; only the canonical one names the unit.
    (cpus.to_string() == cpu_text).then(|| (host.to_string(), cpus))
}

/// The canonical list with `,` → `_` and `:` → `s`.
pub(crate) fn token(cpus: &CpuList) -> String {
    cpus.to_string()
        .chars()
        .map(|c| match c {
            ',' => '_',
            ':' => 's',
            c => c,
        })
        .collect()
}

/// `u<token>`; errors when longer than MAX_USER_LEN.
pub(crate) fn user_name(cpus: &CpuList) -> Result<String, ModelError> {
    let name = format!("u{}", token(cpus));
    if name.len() > MAX_USER_LEN {
        return Err(ModelError::Invalid(format!(
            "CPU list {cpus}: user name {name:?} is too long ({} characters, at most {MAX_USER_LEN}); \
             use a CPU list with fewer items",
            name.len()
        )));
    }
    Ok(name)
}

/// `c<token>`: the unit's directory name under /opt and /mnt.
pub(crate) fn dir_name(cpus: &CpuList) -> String {
    format!("c{}", token(cpus))
}

/// Stable UID: `uid_base + first CPU` (units of a host never share a CPU, so never a UID).
///
/// Saturates instead of wrapping; callers keep `uid_base` far below `u32::MAX - MAX_CPU`.
pub(crate) fn uid(uid_base: u32, cpus: &CpuList) -> u32 {
    uid_base.saturating_add(cpus.first())
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

    #[test]
    fn names_table() {
        // (input list, token, user, dir)
        let cases: &[(&str, &str, &str, &str)] = &[
            ("0-15", "0-15", "u0-15", "c0-15"),
            ("16-31", "16-31", "u16-31", "c16-31"),
            ("0,2,4", "0-4s2", "u0-4s2", "c0-4s2"),
            ("0-3,8", "0-3_8", "u0-3_8", "c0-3_8"),
            ("0,2", "0_2", "u0_2", "c0_2"),
            ("7", "7", "u7", "c7"),
            ("0,2,4,5,6", "0-4s2_5-6", "u0-4s2_5-6", "c0-4s2_5-6"),
        ];
        for (list, tok, user, dir) in cases {
            let c = cpus(list);
            assert_eq!(token(&c), *tok, "token of {list}");
            assert_eq!(user_name(&c).unwrap(), *user, "user of {list}");
            assert_eq!(dir_name(&c), *dir, "dir of {list}");
        }
    }

    #[test]
    fn compute_id_table() {
        assert_eq!(compute_id("host1", &cpus("0-15")), "host1_0-15");
        assert_eq!(compute_id("host1", &cpus("0,2,4")), "host1_0-4:2");
        assert_eq!(
            compute_id("db-1.example.com", &cpus("0-3,8")),
            "db-1.example.com_0-3,8"
        );
    }

    #[test]
    fn parse_compute_id_table() {
        let ok: &[(&str, &str, &str)] = &[
            ("host1_0-15", "host1", "0-15"),
            ("host1_0-4:2", "host1", "0,2,4"),
            ("db-1.example.com_0-3,8", "db-1.example.com", "0-3,8"),
            ("h_7", "h", "7"),
        ];
        for (id, host, list) in ok {
            assert_eq!(
                parse_compute_id(id),
                Some((host.to_string(), cpus(list))),
                "{id}"
            );
        }
        let bad = [
            "",
            "host1",
            "host1_",
            "_0-15",
            "Host1_0-15",
            "-host_0-15",
            "host..x_0-15",
            "host1_0-15_1",
            "host1_x",
            "host1_5-3",
            "host1_0,2,4",
            "host1_0-1,2-3",
            "host1_0-7:2",
            "host1_00-15",
            "host1_ 0-15",
            "host1_0-15\n",
            "host1_0-8192",
        ];
        for id in bad {
            assert_eq!(parse_compute_id(id), None, "{id:?} must not parse");
        }
    }

    #[test]
    fn user_name_length_limit() {
        // Exactly 31 characters is allowed.
        let fits = cpus("1000-1002,1005,1009,1014,1020");
        let name = user_name(&fits).unwrap();
        assert_eq!(name, "u1000-1002_1005_1009_1014_1020");
        assert_eq!(name.len(), 30);
        let exactly = cpus("10-12,1005,1009,1014,1020,3000");
        let name = user_name(&exactly).unwrap();
        assert_eq!(name.len(), MAX_USER_LEN, "{name}");

        let long = cpus("1000-1002,1005,1009,1014,1020,1027");
        match user_name(&long) {
            Err(ModelError::Invalid(msg)) => {
                assert!(msg.contains("1000-1002,1005,1009,1014,1020,1027"), "{msg}");
                assert!(msg.contains("too long"), "{msg}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn uid_is_base_plus_first_cpu() {
        assert_eq!(uid(60000, &cpus("0-15")), 60000);
        assert_eq!(uid(60000, &cpus("16-31")), 60016);
        assert_eq!(uid(60000, &cpus("3,1")), 60001);
        assert_eq!(uid(u32::MAX - 1, &cpus("5")), u32::MAX);
    }

    fn any_cpulist() -> impl Strategy<Value = CpuList> {
        let sparse = prop::collection::btree_set(0..=MAX_CPU, 1..6);
        let strided = prop::collection::vec((0u32..100, 1u32..6, 1usize..6), 1..4).prop_map(|ps| {
            ps.into_iter()
                .flat_map(|(start, step, n)| (0..n as u32).map(move |k| start + k * step))
                .collect::<BTreeSet<u32>>()
        });
        prop_oneof![sparse, strided].prop_map(|s| CpuList::from_cpus(s).unwrap())
    }

    proptest! {
        #[test]
        fn token_and_user_are_injective(a in any_cpulist(), b in any_cpulist()) {
            prop_assert_eq!(token(&a) == token(&b), a == b);
            if let (Ok(ua), Ok(ub)) = (user_name(&a), user_name(&b)) {
                prop_assert_eq!(ua == ub, a == b);
            }
            prop_assert_eq!(dir_name(&a) == dir_name(&b), a == b);
        }

        #[test]
        fn user_name_is_valid_unix_name(a in any_cpulist()) {
            match user_name(&a) {
                Ok(name) => {
                    prop_assert!(name.len() <= MAX_USER_LEN);
                    prop_assert!(name.starts_with('u'));
                    prop_assert!(name[1..].chars().all(|c| c.is_ascii_digit() || matches!(c, '-' | '_' | 's')), "{}", name);
                }
                Err(e) => prop_assert!(format!("u{}", token(&a)).len() > MAX_USER_LEN, "{}", e),
            }
        }

        #[test]
        fn compute_id_round_trips(
            host in "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]{1,5}){0,2}",
            a in any_cpulist(),
        ) {
            let id = compute_id(&host, &a);
            prop_assert_eq!(parse_compute_id(&id), Some((host, a)));
        }
    }
}
