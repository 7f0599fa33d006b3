//! Host topology read from sysfs under a root: which CPUs exist and which NUMA nodes they sit on.
//!
//! The kernel writes these files as plain cpulists with a trailing newline, which `CpuList`
//! parses as is. A memory-only node has an empty `cpulist`: it holds no CPU, so it is skipped.

use super::CpuList;
use std::collections::BTreeSet;
use std::path::Path;

const NODE_DIR: &str = "sys/devices/system/node";

/// CPUs the host has online: `<root>/sys/devices/system/cpu/online`. None when the file is absent.
///
/// Also None when the file cannot be read or parsed: no answer is safer than a wrong one.
pub(crate) fn online_cpus(root: &Path) -> Option<CpuList> {
    let text = std::fs::read_to_string(root.join("sys/devices/system/cpu/online")).ok()?;
    text.parse().ok()
}

/// NUMA nodes holding any CPU of `cpus`, from a [`topology`].
/// None when the host exposes no node directory (no NUMA info: the caller omits AllowedMemoryNodes=).
///
/// Also None when no node holds any of `cpus`: an empty set would not be a useful
/// `AllowedMemoryNodes=` value either.
pub(crate) fn nodes_of(topology: &[(u32, CpuList)], cpus: &CpuList) -> Option<BTreeSet<u32>> {
    let nodes: BTreeSet<u32> = topology
        .iter()
        .filter(|(_, node_cpus)| node_cpus.overlaps(cpus))
        .map(|&(node, _)| node)
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// Every node and its CPUs, ascending by node (empty when no node directory exists).
///
/// Memory-only nodes (empty `cpulist`) and nodes whose `cpulist` is missing or unreadable are
/// left out; entries not named `node<digits>` (`online`, `possible`, `power`, ...) are ignored.
pub(crate) fn topology(root: &Path) -> Vec<(u32, CpuList)> {
    let Ok(entries) = std::fs::read_dir(root.join(NODE_DIR)) else {
        return Vec::new();
    };
    let mut nodes: Vec<(u32, CpuList)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let node = node_number(entry.file_name().to_str()?)?;
            let text = std::fs::read_to_string(entry.path().join("cpulist")).ok()?;
            // An empty file is a memory-only node; `parse` rejects it, which skips it.
            let cpus: CpuList = text.parse().ok()?;
            Some((node, cpus))
        })
        .collect();
    nodes.sort_by_key(|&(node, _)| node);
    nodes
}

/// `node12` → 12; anything else (`node`, `nodeX`, `node+1`, `online`) → None.
fn node_number(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("node")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use tempfile::TempDir;

    fn cpus(s: &str) -> CpuList {
        s.parse().unwrap()
    }

    fn set(nodes: &[u32]) -> BTreeSet<u32> {
        nodes.iter().copied().collect()
    }

    /// Two NUMA nodes with CPUs, a memory-only node, and the stray entries sysfs really has.
    fn fake_sysfs() -> TempDir {
        let dir = TempDir::new().unwrap();
        let root = dir.path();
        let cpu = root.join("sys/devices/system/cpu");
        fs::create_dir_all(&cpu).unwrap();
        fs::write(cpu.join("online"), "0-15\n").unwrap();
        let node = root.join(NODE_DIR);
        for (name, list) in [("node0", "0-7\n"), ("node1", "8-15\n"), ("node2", "\n")] {
            fs::create_dir_all(node.join(name)).unwrap();
            fs::write(node.join(name).join("cpulist"), list).unwrap();
        }
        // Stray entries: files and directories that are not nodes.
        fs::write(node.join("online"), "0-2\n").unwrap();
        fs::write(node.join("possible"), "0-3\n").unwrap();
        fs::create_dir_all(node.join("power")).unwrap();
        fs::create_dir_all(node.join("nodeX")).unwrap();
        fs::write(node.join("nodeX").join("cpulist"), "0-15\n").unwrap();
        dir
    }

    #[test]
    fn online_cpus_reads_sysfs() {
        let dir = fake_sysfs();
        assert_eq!(online_cpus(dir.path()), Some(cpus("0-15")));
        let odd = dir.path().join("sys/devices/system/cpu/online");
        fs::write(&odd, "0,2-3\n").unwrap();
        assert_eq!(online_cpus(dir.path()), Some(cpus("0,2,3")));
        fs::write(&odd, "garbage\n").unwrap();
        assert_eq!(online_cpus(dir.path()), None);
    }

    #[test]
    fn online_cpus_absent() {
        let dir = TempDir::new().unwrap();
        assert_eq!(online_cpus(dir.path()), None);
    }

    #[test]
    fn topology_lists_cpu_nodes_in_order() {
        let dir = fake_sysfs();
        assert_eq!(
            topology(dir.path()),
            vec![(0, cpus("0-7")), (1, cpus("8-15"))]
        );
    }

    #[test]
    fn topology_orders_numerically() {
        let dir = TempDir::new().unwrap();
        let node = dir.path().join(NODE_DIR);
        for (name, list) in [("node10", "10\n"), ("node2", "2\n"), ("node1", "1\n")] {
            fs::create_dir_all(node.join(name)).unwrap();
            fs::write(node.join(name).join("cpulist"), list).unwrap();
        }
        let nodes: Vec<u32> = topology(dir.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(nodes, vec![1, 2, 10]);
    }

    #[test]
    fn nodes_of_table() {
        let dir = fake_sysfs();
        let cases: &[(&str, Option<&[u32]>)] = &[
            ("0-3", Some(&[0])),
            ("8-15", Some(&[1])),
            ("6-9", Some(&[0, 1])),
            ("0,15", Some(&[0, 1])),
            // No node holds these CPUs.
            ("16-31", None),
        ];
        for (list, expected) in cases {
            assert_eq!(
                nodes_of(&topology(dir.path()), &cpus(list)),
                expected.map(set),
                "nodes of {list}"
            );
        }
    }

    #[test]
    fn no_node_directory_means_no_numa_info() {
        let dir = TempDir::new().unwrap();
        assert_eq!(nodes_of(&topology(dir.path()), &cpus("0-3")), None);
        assert!(topology(dir.path()).is_empty());
        // A node directory with only stray entries gives no information either.
        let node = dir.path().join(NODE_DIR);
        fs::create_dir_all(&node).unwrap();
        fs::write(node.join("online"), "0\n").unwrap();
        assert_eq!(nodes_of(&topology(dir.path()), &cpus("0-3")), None);
        assert!(topology(dir.path()).is_empty());
    }

    #[test]
    fn node_names() {
        let cases: &[(&str, Option<u32>)] = &[
            ("node0", Some(0)),
            ("node17", Some(17)),
            ("node", None),
            ("nodeX", None),
            ("node+1", None),
            ("node-1", None),
            ("node1a", None),
            ("online", None),
            ("has_cpu", None),
            ("node99999999999", None),
        ];
        for (name, expected) in cases {
            assert_eq!(node_number(name), *expected, "{name}");
        }
    }
}
