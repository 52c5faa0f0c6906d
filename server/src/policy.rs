//! What each client may do: which namespaces, which part of them, and whether it may write.
//!
//! A grant can confine a client to a window of a namespace; the client then sees that window as
//! the whole namespace (offset 0 is the window's first block), like a partition.

use std::str::FromStr;

/// Access granted to one uid on one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Client uid this grant applies to.
    pub uid: u32,
    /// Namespace id.
    pub nsid: u32,
    /// First LBA and number of LBAs of the window, `None` for the whole namespace.
    pub window: Option<(u64, u64)>,
    /// Reads only.
    pub read_only: bool,
    /// Share of the device and limits (weight 1 and none by default).
    pub qos: Qos,
}

/// Whose I/O a grant's limits count together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QosScope {
    /// All sessions of the uid together.
    #[default]
    Uid,
    /// Each session on its own.
    Session,
}

/// A grant's share of the device and its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qos {
    /// Share of a saturated device relative to other tenants (at least 1).
    pub weight: u32,
    /// Most I/Os per second.
    pub iops: Option<u64>,
    /// Most bytes read per second.
    pub read_bytes_per_s: Option<u64>,
    /// Most bytes written per second.
    pub write_bytes_per_s: Option<u64>,
    /// Most requests at the device at once.
    pub max_in_flight: Option<u32>,
    /// Whose I/O the limits count together.
    pub scope: QosScope,
}

impl Qos {
    /// Weight 1, no limits, counted per uid.
    pub const DEFAULT: Qos = Qos {
        weight: 1,
        iops: None,
        read_bytes_per_s: None,
        write_bytes_per_s: None,
        max_in_flight: None,
        scope: QosScope::Uid,
    };
}

impl Default for Qos {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for Qos {
    /// The `--grant` form, e.g. `weight=3,iops=20000,read-mbps=100,per=uid`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "weight={}", self.weight)?;
        if let Some(n) = self.iops {
            write!(f, ",iops={n}")?;
        }
        if let Some(n) = self.read_bytes_per_s {
            write!(f, ",read-mbps={}", n / 1_000_000)?;
        }
        if let Some(n) = self.write_bytes_per_s {
            write!(f, ",write-mbps={}", n / 1_000_000)?;
        }
        if let Some(n) = self.max_in_flight {
            write!(f, ",qd={n}")?;
        }
        f.write_str(match self.scope {
            QosScope::Uid => ",per=uid",
            QosScope::Session => ",per=session",
        })
    }
}

impl FromStr for Qos {
    type Err = String;

    /// `weight=3,iops=20k,read-mbps=100,write-mbps=50,qd=64,per=session` (any subset; k and m
    /// suffixes on iops; MB/s are 10^6 bytes).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut q = Qos::default();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| format!("{item:?} is not KEY=VALUE"))?;
            let num = |v: &str| -> Result<u64, String> {
                let (n, mult) = match v.chars().last() {
                    Some('k' | 'K') => (&v[..v.len() - 1], 1_000),
                    Some('m' | 'M') => (&v[..v.len() - 1], 1_000_000),
                    _ => (v, 1),
                };
                n.parse::<u64>()
                    .ok()
                    .and_then(|n| n.checked_mul(mult))
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("{k}={v}: not a positive number"))
            };
            match k {
                "weight" => q.weight = num(v)?.min(10_000) as u32,
                "iops" => q.iops = Some(num(v)?),
                "read-mbps" => q.read_bytes_per_s = Some(num(v)?.saturating_mul(1_000_000)),
                "write-mbps" => q.write_bytes_per_s = Some(num(v)?.saturating_mul(1_000_000)),
                "qd" => q.max_in_flight = Some(num(v)?.min(u64::from(u32::MAX)) as u32),
                "per" => {
                    q.scope = match v {
                        "uid" => QosScope::Uid,
                        "session" => QosScope::Session,
                        _ => return Err(format!("per={v}: expected uid or session")),
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown limit {k:?} (known: weight, iops, read-mbps, write-mbps, qd, per)"
                    ))
                }
            }
        }
        Ok(q)
    }
}

/// A grant that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad grant {0:?}: expected UID:NSID[:FIRST_LBA+COUNT][:ro][:weight=W,iops=N,read-mbps=N,write-mbps=N,qd=N,per=uid|session]{why}", why = reason(.1))]
pub struct BadGrant(String, String);

fn reason(why: &str) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    }
}

impl FromStr for Grant {
    type Err = BadGrant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadGrant(s.to_string(), String::new());
        let mut parts = s.split(':');
        let uid = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let nsid = parts.next().and_then(|p| p.parse().ok()).filter(|&n| n > 0).ok_or_else(bad)?;
        let mut g = Grant { uid, nsid, window: None, read_only: false, qos: Qos::default() };
        for p in parts {
            if p == "ro" {
                g.read_only = true;
            } else if p.contains('=') {
                g.qos = p.parse().map_err(|e| BadGrant(s.to_string(), e))?;
            } else if let Some((a, b)) = p.split_once('+') {
                let first: u64 = a.parse().map_err(|_| bad())?;
                let count: u64 = b.parse().map_err(|_| bad())?;
                if count == 0 {
                    return Err(bad());
                }
                g.window = Some((first, count));
            } else {
                return Err(bad());
            }
        }
        Ok(g)
    }
}

/// Access for clients whose uid has no grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DefaultAccess {
    /// Read and write every namespace.
    ReadWrite,
    /// Read every namespace.
    ReadOnly,
    /// No namespace at all.
    None,
}

/// The broker's access rules.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Explicit grants.
    pub grants: Vec<Grant>,
    /// Access of uids without grants.
    pub default: DefaultAccess,
}

/// A namespace the broker serves: its broker-wide id (what clients and grants use; the
/// namespaces of controller 0 first, then those of controller 1, ...) and where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedNamespace {
    /// Broker-wide namespace id (from 1).
    pub nsid: u32,
    /// Index of its controller (the order of `--pci`, or of `--controllers`).
    pub controller: u16,
    /// Its namespace id on that controller.
    pub device_nsid: u32,
    /// LBA size in bytes.
    pub lba_size: u32,
    /// Size in LBAs.
    pub lba_count: u64,
}

impl ServedNamespace {
    /// Numbers the namespaces of each controller, in controller order, from 1.
    pub fn number(controllers: &[Vec<crate::nvme::Namespace>]) -> Vec<Self> {
        let mut out = Vec::new();
        for (c, list) in controllers.iter().enumerate() {
            for ns in list {
                out.push(Self {
                    nsid: out.len() as u32 + 1,
                    controller: c as u16,
                    device_nsid: ns.nsid,
                    lba_size: ns.lba_size,
                    lba_count: ns.lba_count,
                });
            }
        }
        out
    }
}

/// One namespace as one client may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceAccess {
    /// Broker-wide namespace id (what the client uses).
    pub nsid: u32,
    /// Its controller.
    pub controller: u16,
    /// Its namespace id on that controller (what the device commands carry).
    pub device_nsid: u32,
    /// First device LBA of the client's view.
    pub first_lba: u64,
    /// LBAs in the client's view.
    pub lba_count: u64,
    /// LBA size.
    pub lba_size: u32,
    /// Reads only.
    pub read_only: bool,
    /// Share and limits (from the grant; the defaults for a uid without grants).
    pub qos: Qos,
}

/// Grants the broker refuses to put in force (at start, or on a reload: the grants in force
/// then stay).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A grant names a namespace the broker does not serve.
    #[error("grant {grant} names namespace {nsid}, which this broker does not serve (it serves {served})")]
    UnknownNamespace {
        /// The grant, as written.
        grant: String,
        /// The namespace it names.
        nsid: u32,
        /// The namespaces served, e.g. `namespaces 1-2`.
        served: String,
    },
    /// Two grants for the same uid on the same namespace (which one would apply?).
    #[error(
        "grants {first} and {second} both give uid {uid} namespace {nsid}: a uid may have one grant per namespace"
    )]
    Duplicate {
        /// The first grant, as written.
        first: String,
        /// The second one.
        second: String,
        /// Their uid.
        uid: u32,
        /// Their namespace.
        nsid: u32,
    },
    /// Two grants of one uid on namespaces of one controller, one counted per uid and the other
    /// per session: the uid's I/O there is one tenant, which cannot be both.
    #[error(
        "grants {first} and {second} give uid {uid} namespaces of controller {controller} with per=uid and \
         per=session limits: a uid's grants on one controller are one tenant, give them the same per="
    )]
    MixedScope {
        /// The first grant, as written.
        first: String,
        /// The second one.
        second: String,
        /// Their uid.
        uid: u32,
        /// The controller of both namespaces.
        controller: u16,
    },
}

impl std::fmt::Display for Grant {
    /// The `--grant` form: `UID:NSID[:FIRST+COUNT][:ro]:LIMITS`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.nsid)?;
        if let Some((first, count)) = self.window {
            write!(f, ":{first}+{count}")?;
        }
        if self.read_only {
            f.write_str(":ro")?;
        }
        write!(f, ":{}", self.qos)
    }
}

/// `namespace 1`, `namespaces 1-3`, `namespaces 1, 3` (ids in order).
fn served_list(namespaces: &[ServedNamespace]) -> String {
    let ids: Vec<u32> = namespaces.iter().map(|n| n.nsid).collect();
    match ids.as_slice() {
        [] => "no namespace".into(),
        [one] => format!("namespace {one}"),
        [first, .., last] if ids.windows(2).all(|w| w[1] == w[0] + 1) => {
            format!("namespaces {first}-{last}")
        }
        _ => format!("namespaces {}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")),
    }
}

impl Policy {
    /// Whether these grants can be put in force on a broker serving `namespaces`: every grant
    /// names a namespace served, and no uid has two grants on one namespace.
    pub fn check(&self, namespaces: &[ServedNamespace]) -> Result<(), PolicyError> {
        let mut seen: std::collections::HashMap<(u32, u32), &Grant> = std::collections::HashMap::new();
        for g in &self.grants {
            if !namespaces.iter().any(|n| n.nsid == g.nsid) {
                return Err(PolicyError::UnknownNamespace {
                    grant: g.to_string(),
                    nsid: g.nsid,
                    served: served_list(namespaces),
                });
            }
            if let Some(first) = seen.insert((g.uid, g.nsid), g) {
                return Err(PolicyError::Duplicate {
                    first: first.to_string(),
                    second: g.to_string(),
                    uid: g.uid,
                    nsid: g.nsid,
                });
            }
        }
        // One tenant per uid and controller: its grants there must count the same way (else
        // a per=session grant would turn the uid's per=uid limits into per-session ones).
        let controller_of = |nsid: u32| namespaces.iter().find(|n| n.nsid == nsid).map(|n| n.controller);
        let mut scope: std::collections::HashMap<(u32, Option<u16>), &Grant> =
            std::collections::HashMap::new();
        for g in &self.grants {
            let controller = controller_of(g.nsid);
            let first = *scope.entry((g.uid, controller)).or_insert(g);
            if first.qos.scope != g.qos.scope {
                return Err(PolicyError::MixedScope {
                    first: first.to_string(),
                    second: g.to_string(),
                    uid: g.uid,
                    controller: controller.unwrap_or(0),
                });
            }
        }
        Ok(())
    }

    /// Resolves what `uid` may use among the broker's namespaces.
    pub fn access_for(&self, uid: u32, namespaces: &[ServedNamespace]) -> Vec<NamespaceAccess> {
        let mine: Vec<&Grant> = self.grants.iter().filter(|g| g.uid == uid).collect();
        namespaces
            .iter()
            .filter_map(|ns| {
                let whole = |read_only| NamespaceAccess {
                    nsid: ns.nsid,
                    controller: ns.controller,
                    device_nsid: ns.device_nsid,
                    first_lba: 0,
                    lba_count: ns.lba_count,
                    lba_size: ns.lba_size,
                    read_only,
                    qos: Qos::default(),
                };
                if mine.is_empty() {
                    return match self.default {
                        DefaultAccess::ReadWrite => Some(whole(false)),
                        DefaultAccess::ReadOnly => Some(whole(true)),
                        DefaultAccess::None => None,
                    };
                }
                let g = mine.iter().find(|g| g.nsid == ns.nsid)?;
                let mut a = whole(g.read_only);
                a.qos = g.qos;
                if let Some((first, count)) = g.window {
                    let first = first.min(ns.lba_count);
                    a.first_lba = first;
                    a.lba_count = count.min(ns.lba_count - first);
                }
                (a.lba_count > 0).then_some(a)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::Namespace;

    #[test]
    fn grants_parse_and_resolve() {
        let g: Grant = "1000:1:2048+4096:ro".parse().unwrap();
        assert_eq!(
            g,
            Grant { uid: 1000, nsid: 1, window: Some((2048, 4096)), read_only: true, qos: Qos::default() }
        );
        let l: Grant = "1000:2:weight=3,iops=20k,read-mbps=100,qd=8,per=session".parse().unwrap();
        assert_eq!(
            l.qos,
            Qos {
                weight: 3,
                iops: Some(20_000),
                read_bytes_per_s: Some(100_000_000),
                write_bytes_per_s: None,
                max_in_flight: Some(8),
                scope: QosScope::Session
            }
        );
        for bad in ["1000:1:iops=0", "1000:1:iops=x", "1000:1:speed=3", "1000:1:per=host"] {
            let e = bad.parse::<Grant>().unwrap_err().to_string();
            assert!(e.contains('('), "{bad}: the reason is missing from {e:?}");
        }
        assert!("1000".parse::<Grant>().is_err());
        assert!("1000:0".parse::<Grant>().is_err());
        assert!("1000:1:rw".parse::<Grant>().is_err());
        let ns = ServedNamespace::number(&[
            vec![Namespace { nsid: 1, lba_size: 512, lba_count: 5000 }],
            vec![Namespace { nsid: 1, lba_size: 512, lba_count: 10 }],
        ]);
        assert_eq!((ns[1].nsid, ns[1].controller, ns[1].device_nsid), (2, 1, 1));
        let p = Policy { grants: vec![g], default: DefaultAccess::ReadWrite };
        let a = p.access_for(1000, &ns);
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].first_lba, a[0].lba_count, a[0].read_only), (2048, 5000 - 2048, true));
        assert_eq!(p.access_for(0, &ns).len(), 2);
        let none = Policy { grants: vec![], default: DefaultAccess::None };
        assert!(none.access_for(0, &ns).is_empty());
    }

    #[test]
    fn grants_for_namespaces_not_served_or_twice_are_refused() {
        let ns = ServedNamespace::number(&[vec![
            Namespace { nsid: 1, lba_size: 512, lba_count: 5000 },
            Namespace { nsid: 2, lba_size: 512, lba_count: 5000 },
        ]]);
        let policy = |grants: &[&str]| Policy {
            grants: grants.iter().map(|g| g.parse().unwrap()).collect(),
            default: DefaultAccess::None,
        };
        policy(&["1000:1", "1000:2:ro", "1001:1:iops=1k"]).check(&ns).unwrap();
        policy(&[]).check(&ns).unwrap();
        let e = policy(&["1000:1", "1000:3:iops=1k"]).check(&ns).unwrap_err();
        assert_eq!(
            e.to_string(),
            "grant 1000:3:weight=1,iops=1000,per=uid names namespace 3, which this broker does not serve \
             (it serves namespaces 1-2)"
        );
        let e = policy(&["1000:1:0+10", "1001:1", "1000:1:ro"]).check(&ns).unwrap_err();
        assert_eq!(
            e,
            PolicyError::Duplicate {
                first: "1000:1:0+10:weight=1,per=uid".into(),
                second: "1000:1:ro:weight=1,per=uid".into(),
                uid: 1000,
                nsid: 1
            }
        );
        assert!(e.to_string().contains("one grant per namespace"), "{e}");
        // One uid's grants on one controller count one way: per=uid and per=session mixed is
        // refused (other uids, and the same scope, are fine).
        policy(&["1000:1:per=session", "1000:2:iops=1k,per=session", "1001:2"]).check(&ns).unwrap();
        let e = policy(&["1000:1:iops=1k", "1000:2:per=session"]).check(&ns).unwrap_err();
        assert!(matches!(e, PolicyError::MixedScope { uid: 1000, controller: 0, .. }), "{e:?}");
        assert!(e.to_string().contains("give them the same per="), "{e}");
        // Served lists as the operator reads them.
        assert_eq!(served_list(&ns[..1]), "namespace 1");
        let mut gap = ns.clone();
        gap[1].nsid = 4;
        assert_eq!(served_list(&gap), "namespaces 1, 4");
        // The written form parses back to the same grant.
        let g: Grant = "7:2:8+16:ro:weight=3,iops=5k,qd=4,per=session".parse().unwrap();
        assert_eq!(g.to_string().parse::<Grant>().unwrap(), g);
    }
}
