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
}

/// A grant that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad grant {0:?}: expected UID:NSID[:FIRST_LBA+COUNT][:ro]")]
pub struct BadGrant(String);

impl FromStr for Grant {
    type Err = BadGrant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadGrant(s.to_string());
        let mut parts = s.split(':');
        let uid = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let nsid = parts.next().and_then(|p| p.parse().ok()).filter(|&n| n > 0).ok_or_else(bad)?;
        let mut g = Grant { uid, nsid, window: None, read_only: false };
        for p in parts {
            if p == "ro" {
                g.read_only = true;
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
}

impl Policy {
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
        assert_eq!(g, Grant { uid: 1000, nsid: 1, window: Some((2048, 4096)), read_only: true });
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
}
