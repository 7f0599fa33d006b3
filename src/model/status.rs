//! The domain's states: a compute unit's and a server's status (upstream's names), the
//! transitions a unit may make, and the resource limits of a server's units.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

macro_rules! status_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        pub enum $name { $(#[serde(rename = $text)] $variant),+ }
        impl $name {
            #[cfg(test)]
            pub(crate) const ALL: &'static [$name] = &[$($name::$variant),+];
            pub(crate) fn as_str(self) -> &'static str { match self { $($name::$variant => $text),+ } }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s { $($text => Ok($name::$variant),)+ _ => Err(format!("unknown status {s:?}")) }
            }
        }
    };
}

status_enum!(
    /// Status of a compute unit (upstream's names).
    UnitStatus {
        Free => "FREE",
        Allocating => "ALLOCATING",
        Allocated => "ALLOCATED",
        Deallocating => "DEALLOCATING",
        AllocationFail => "ALLOCATION_FAIL",
        DeallocationFail => "DEALLOCATION_FAIL",
        Unavailable => "UNAVAILABLE",
    }
);

status_enum!(
    /// Status of a server. `READY` is ours: upstream has no name for an initialized server.
    ServerStatus {
        Initializing => "INITIALIZING",
        Ready => "READY",
        InitFail => "INIT_FAIL",
        Decommissioning => "DECOMMISSIONING",
        Decommissioned => "DECOMMISSIONED",
        DecommissionFail => "DECOMMISSION_FAIL",
    }
);

/// Optional resource limits applied to every unit of a server (systemd slice properties).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// `MemoryMax=` per CPU of the unit, in bytes (a unit of 4 CPUs gets 4×).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max_per_cpu: Option<u64>,
    /// `MemoryHigh=` per CPU of the unit, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_high_per_cpu: Option<u64>,
    /// `TasksMax=` for the whole unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks_max: Option<u64>,
    /// `IOWeight=` (1..=10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u64>,
    /// `IOReadBandwidthMax=`: `DEVICE BYTES` entries, e.g. `/dev/vda 50M`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub io_read_bandwidth_max: Vec<String>,
    /// `IOWriteBandwidthMax=`: `DEVICE BYTES` entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub io_write_bandwidth_max: Vec<String>,
}

impl UnitStatus {
    /// Whether a unit may go from `self` to `to` (the life cycle below; the inventory refuses
    /// anything else):
    ///
    /// ```text
    /// FREE -> ALLOCATING -> ALLOCATED -> DEALLOCATING -> FREE
    ///             |                         |
    ///             v                         v
    ///      ALLOCATION_FAIL -> DEALLOCATING  DEALLOCATION_FAIL -> DEALLOCATING
    /// ```
    ///
    /// plus a failed allocation rolled back (ALLOCATING -> FREE) and reconcile finishing or
    /// rolling back a half-done operation (ALLOCATING, ALLOCATION_FAIL, DEALLOCATING,
    /// DEALLOCATION_FAIL -> FREE). A whole server's units go UNAVAILABLE <-> FREE with its
    /// status, not one by one.
    pub fn can_become(self, to: UnitStatus) -> bool {
        use UnitStatus::*;
        matches!(
            (self, to),
            (Free, Allocating)
                | (Allocating, Allocated | AllocationFail | Free)
                | (Allocated | AllocationFail | DeallocationFail, Deallocating)
                | (Deallocating, Free | DeallocationFail)
                | (AllocationFail | DeallocationFail, Free)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in UnitStatus::ALL {
            assert_eq!(s.as_str().parse::<UnitStatus>(), Ok(*s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in ServerStatus::ALL {
            assert_eq!(s.as_str().parse::<ServerStatus>(), Ok(*s));
        }
        assert!("free".parse::<UnitStatus>().is_err());
    }

    #[test]
    fn a_unit_is_only_freed_through_its_life_cycle() {
        use UnitStatus::*;
        assert!(Free.can_become(Allocating));
        assert!(Allocating.can_become(Allocated));
        assert!(Allocated.can_become(Deallocating));
        assert!(Deallocating.can_become(Free));
        // An allocated unit is never freed without its release (processes, key, files).
        assert!(!Allocated.can_become(Free));
        assert!(!Free.can_become(Allocated));
        assert!(!Unavailable.can_become(Allocating));
        for s in UnitStatus::ALL {
            assert!(!s.can_become(*s), "{s} -> {s}");
        }
    }
}
