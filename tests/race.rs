//! Race tests: a hostile tenant (`tests/race/tenant.py`: a `.ssh` swapper with
//! renameat2(RENAME_EXCHANGE) and an inotify planter of symlinks) runs in a unit's home on a
//! throw-away root while Kloigos reconciles, allocates and deallocates in a loop. Nothing
//! outside the unit's tree may change: every entry of a target directory (the symlinks'
//! destination) keeps its content, mode and owner, and no entry appears there.
//!
//! The tenant runs as root here (so do the tests): the kernel's permission checks do not
//! help, only Kloigos' own handling of paths does. The same script runs in the test VM as a
//! real unit user.

mod common;

use kloigos::model::{CpuList, PortPlan};
use kloigos::service::{Allocate, Config, DEFAULT_UID_BASE, InitServer, Kloigos};
use kloigos::store::{Limits, UnitStatus};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const HOST: &str = "racehost";
const ID: &str = "racehost_0";

/// (kind, sha256 of the content or the link's target, mode, uid, gid) of every entry.
type Snapshot = BTreeMap<String, (String, String, u32, u32, u32)>;

fn snapshot(base: &Path) -> Snapshot {
    fn walk(base: &Path, dir: &Path, out: &mut Snapshot) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let (kind, bytes) = if m.file_type().is_symlink() {
                (
                    "link",
                    std::fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if m.is_dir() {
                ("dir", Vec::new())
            } else {
                ("file", std::fs::read(&p).unwrap())
            };
            let hash = format!("{:x}", Sha256::digest(&bytes));
            out.insert(
                rel,
                (kind.into(), hash, m.mode() & 0o7777, m.uid(), m.gid()),
            );
            if m.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Snapshot::new();
    let m = std::fs::symlink_metadata(base).unwrap();
    out.insert(
        ".".into(),
        (
            "dir".into(),
            String::new(),
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
        ),
    );
    walk(base, base, &mut out);
    out
}

fn put(path: &Path, content: &str, mode: u32) {
    common::write(path, content);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    target: PathBuf,
    k: Kloigos,
}

impl Rig {
    /// A fake host with one 1-CPU unit, a skeleton, and a target tree outside the unit.
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        common::write(&root.join("etc/hostname"), &format!("{HOST}\n"));
        common::write(&root.join("sys/devices/system/cpu/online"), "0-3\n");
        common::write(
            &root.join("proc/sys/net/ipv4/ip_local_port_range"),
            "32768\t60999\n",
        );
        common::write(&root.join("etc/skel/.bashrc"), "# skel bashrc\n");
        common::write(&root.join("etc/skel/.profile"), "# skel profile\n");
        common::write(&root.join("etc/skel/.config/app.conf"), "skel=1\n");
        // What the tenant's links point into: names root creates in the home, and others.
        let target = root.join("srv/target");
        put(&target.join("secret"), "precious\n", 0o600);
        put(&target.join(".bashrc"), "admin's bashrc\n", 0o600);
        put(&target.join(".profile"), "admin's profile\n", 0o640);
        put(
            &target.join("authorized_keys"),
            "ssh-ed25519 AAAA admin\n",
            0o600,
        );
        put(&target.join(".config/app.conf"), "admin=1\n", 0o600);
        std::fs::set_permissions(
            target.join(".config"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        std::fs::create_dir_all(target.join("empty")).unwrap();
        let k = Kloigos::open(&Config {
            db: kloigos::store::DbTarget::Sqlite(dir.path().join("kloigos.db")),
            root: root.clone(),
            templates: vec![PathBuf::from("/nonexistent")],
            hostname: Some(HOST.into()),
            kill_grace: Duration::ZERO,
            host_stale_after: Duration::from_secs(300),
        })
        .unwrap();
        k.init_server(
            InitServer {
                hostname: HOST.into(),
                ip: "192.0.2.1".into(),
                region: "r".into(),
                zone: "z".into(),
                cpu_ranges: vec!["0".parse::<CpuList>().unwrap()],
                ports: PortPlan {
                    base: 2000,
                    per_cpu: 100,
                },
                uid_base: DEFAULT_UID_BASE,
                limits: Limits::default(),
                inventory_only: false,
            },
            "race",
        )
        .unwrap();
        Rig {
            _dir: dir,
            root,
            target,
            k,
        }
    }

    fn home(&self) -> PathBuf {
        let user = self.k.unit(ID).unwrap().user;
        self.root.join("home").join(user)
    }

    fn allocate(&self) -> bool {
        let line = common::ssh_key("tenant");
        let key = kloigos::model::validate::ssh_public_key(&line).unwrap();
        let req = Allocate {
            cpu_count: 1,
            region: None,
            zone: None,
            tags: None,
            ssh_key: key,
            inventory_only: false,
        };
        match self.k.allocate(req, "race") {
            Ok(_) => true,
            Err(e) => {
                eprintln!("race: allocate failed (expected now and then): {e}");
                false
            }
        }
    }

    fn deallocate(&self) -> bool {
        match self.k.deallocate(ID, "race", &|_| Ok(())) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("race: deallocate failed (expected now and then): {e}");
                false
            }
        }
    }

    fn tenant(&self, seconds: u64) -> Tenant {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/race/tenant.py");
        let child = Command::new("python3")
            .arg(script)
            .arg("--home")
            .arg(self.home())
            .arg("--target")
            .arg(&self.target)
            .args(["--seconds", &seconds.to_string()])
            .spawn()
            .expect("python3 runs tests/race/tenant.py");
        // Let it set up its watches and start swapping.
        std::thread::sleep(Duration::from_millis(300));
        Tenant(child)
    }
}

struct Tenant(Child);

impl Drop for Tenant {
    fn drop(&mut self) {
        // SIGKILL; its swapper process dies with it (PR_SET_PDEATHSIG).
        let _ = self.0.kill();
        let _ = self.0.wait();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Iterations, and a time cap per phase so the whole test stays under ~60 s on 2 busy cores
/// (it takes ~25 s on an idle machine).
///
/// Why these counts are enough: against the code before the fix (path-based writes), on this
/// rig, the tenant first changed the target after 27, 49, 169, 179 and 370 reconciles (the
/// target directory chmod'ed through the `.ssh` link), i.e. about 1 reconcile in 160, and
/// after 3, 6, 16, 23 and 32 allocate/deallocate cycles (the target chmod'ed, its
/// `authorized_keys` deleted or overwritten, skeleton files written through links), about 1
/// cycle in 20. At the usual counts (1200 reconciles, 150 cycles) each phase alone misses such
/// a race with a chance of (1 - 1/160)^1200 ~ 5e-4 and (1 - 1/20)^150 ~ 5e-4, both together
/// ~3e-7; even at the minimum counts a slow machine must reach (600 and 60), both together miss
/// with ~1e-3.
const RECONCILES: usize = 1200;
const MIN_RECONCILES: usize = 600;
const CYCLES: usize = 150;
const MIN_CYCLES: usize = 60;
const PHASE_CAP: Duration = Duration::from_secs(20);

#[test]
fn a_hostile_tenant_cannot_reach_outside_its_tree() {
    // The tenant is tests/race/tenant.py; the service gives the unit's tree to root.
    if !common::privileged(&["python3"]) {
        return;
    }
    let rig = Rig::new();
    let before = snapshot(&rig.target);
    assert!(rig.allocate());

    // Phase 1: the service (re)starts again and again, each time reconciling an allocated unit
    // whose key the tenant keeps deleting, whose .ssh keeps turning into a link, and whose
    // home keeps being emptied as bait for a skeleton copy.
    let mut reconciles = 0;
    let mut reconcile_errors = 0;
    {
        let _tenant = rig.tenant(PHASE_CAP.as_secs() + 10);
        let start = Instant::now();
        while reconciles < RECONCILES && start.elapsed() < PHASE_CAP {
            if rig.k.reconcile("race").is_err() {
                reconcile_errors += 1;
            }
            reconciles += 1;
        }
    }
    assert_eq!(
        snapshot(&rig.target),
        before,
        "after {reconciles} reconciles"
    );

    // Phase 2: allocate / deallocate cycles while the tenant keeps at it.
    let mut cycles = 0;
    let (mut dealloc_ok, mut alloc_ok) = (0, 0);
    {
        let _tenant = rig.tenant(PHASE_CAP.as_secs() + 10);
        let start = Instant::now();
        while cycles < CYCLES && start.elapsed() < PHASE_CAP {
            if rig.deallocate() {
                dealloc_ok += 1;
            } else {
                // DEALLOCATION_FAIL: reconcile finishes the job, as after a crash.
                let _ = rig.k.reconcile("race");
            }
            if rig.allocate() {
                alloc_ok += 1;
            }
            cycles += 1;
        }
    }
    eprintln!(
        "race: {reconciles} reconciles ({reconcile_errors} failed), {cycles} cycles \
         ({dealloc_ok} deallocations and {alloc_ok} allocations succeeded)"
    );
    assert_eq!(snapshot(&rig.target), before, "after {cycles} cycles");
    assert!(
        reconciles >= MIN_RECONCILES && cycles >= MIN_CYCLES,
        "too few rounds to catch a race: {reconciles} reconciles, {cycles} cycles"
    );
    assert!(
        dealloc_ok > 0 && alloc_ok > 0,
        "the operations never went through"
    );

    // The tenant gone, the service is whole: reconcile is clean of failures and a
    // deallocation leaves the skeleton.
    let report = serde_json::to_value(rig.k.reconcile("race").unwrap()).unwrap();
    assert!(
        report["units_failed"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "{report}"
    );
    // (If the last allocation failed, its rollback ran with the tenant still there: allocate
    // again, so that this deallocation runs with nobody left to race it.)
    if rig.k.unit(ID).unwrap().status == UnitStatus::Free {
        assert!(rig.allocate());
    }
    assert!(rig.deallocate());
    let home = rig.home();
    let mut left: Vec<String> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [".bashrc", ".config", ".profile", ".ssh"]);
    assert!(
        std::fs::symlink_metadata(home.join(".ssh"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(snapshot(&rig.target), before);
}
