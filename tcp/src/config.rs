//! The target's configuration: which hosts (by host NQN) may connect and which namespaces each
//! one sees, read-only or not. nvmed's own grants to the target's uid still apply underneath.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("bad configuration {path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// One allowed host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostAccess {
    /// Its host NQN.
    pub nqn: String,
    /// The namespace ids it may use (nvmed's broker-wide ids); absent: every exported one.
    #[serde(default)]
    pub namespaces: Option<Vec<u32>>,
    /// Whether it may only read.
    #[serde(default)]
    pub read_only: bool,
}

/// The `--config` file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Hosts allowed, with their namespaces.
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostAccess>,
}

impl ConfigFile {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), source: Box::new(e) })
    }
}

/// Everything the target needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The subsystem NQN hosts connect to.
    pub subnqn: String,
    /// The broker's socket.
    pub nvmed_socket: PathBuf,
    /// Namespaces exported (nvmed ids); `None`: all the broker grants.
    pub namespaces: Option<Vec<u32>>,
    /// Any host NQN may connect (to every exported namespace, read-write).
    pub allow_any_host: bool,
    /// Hosts allowed.
    pub hosts: Vec<HostAccess>,
    /// I/O queue entries offered (CAP.MQES + 1).
    pub queue_size: u16,
    /// Largest transfer (MDTS), bytes.
    pub max_transfer: u32,
    /// In-capsule data of I/O command capsules, bytes.
    pub in_capsule: u32,
    /// Most I/O queues per controller.
    pub max_io_queues: u16,
    /// Most TCP connections at once (further ones are closed on accept).
    pub max_connections: usize,
    /// Most TCP connections at once from one IP address (a Linux host uses one per queue of
    /// each controller it connects: 17 for 16 I/O queues), so one host cannot take every slot.
    pub max_connections_per_host: usize,
    /// Most controllers (admin connections, each with its own nvmed session) one host NQN may
    /// hold at once (a host connecting over several paths holds one per path), so that one
    /// host cannot take every nvmed session of the target's uid.
    pub max_controllers_per_host: usize,
    /// A host that does not read what is sent to it for this long is disconnected; also the
    /// time allowed for ICReq and Connect together (at most [`HANDSHAKE_TIMEOUT_MAX`]).
    pub io_timeout: Duration,
    /// How long an I/O queue polls its ring for completions before it sleeps on the completion doorbell.
    pub poll: Duration,
    /// How the controllers' nvmed sessions connect again to a restarted broker (its budget
    /// bounds the pause a host sees; after it, commands in flight fail with Namespace Not
    /// Ready, which hosts retry).
    pub reconnect: nvmed_client::Reconnect,
    /// Where hosts reach the subsystem's I/O controllers (the address the discovery log
    /// gives): `None`, or an unspecified IP, for the address the discovery connection came to.
    pub io_addr: Option<std::net::SocketAddr>,
}

/// The longest a new connection may take from accept to its Connect command, whatever
/// `io_timeout` is: a connection that never completes its handshake holds a slot only this long.
pub const HANDSHAKE_TIMEOUT_MAX: Duration = Duration::from_secs(10);

impl Config {
    /// Defaults for `subnqn` on `nvmed_socket`.
    pub fn new(subnqn: impl Into<String>, nvmed_socket: impl Into<PathBuf>) -> Self {
        Self {
            subnqn: subnqn.into(),
            nvmed_socket: nvmed_socket.into(),
            namespaces: None,
            allow_any_host: false,
            hosts: Vec::new(),
            queue_size: 128,
            max_transfer: 128 << 10,
            in_capsule: 8192,
            max_io_queues: 16,
            max_connections: 512,
            max_connections_per_host: 128,
            max_controllers_per_host: 4,
            io_timeout: Duration::from_secs(30),
            poll: Duration::ZERO,
            reconnect: nvmed_client::Reconnect::default(),
            io_addr: None,
        }
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.subnqn.is_empty() || self.subnqn.len() > 223 {
            return bad("the subsystem NQN must have 1 to 223 bytes");
        }
        if !(2..=4096).contains(&self.queue_size) {
            return bad("--queue-size must be 2..=4096");
        }
        if !self.max_transfer.is_power_of_two() || !(4096..=(1 << 20)).contains(&self.max_transfer) {
            return bad("--max-transfer must be a power of two from 4096 to 1 MiB");
        }
        if !self.in_capsule.is_multiple_of(16) || self.in_capsule > 65536 {
            return bad("--in-capsule must be a multiple of 16, at most 65536");
        }
        if self.max_io_queues == 0 {
            return bad("--max-io-queues must be at least 1");
        }
        if self.max_connections_per_host <= usize::from(self.max_io_queues) {
            return bad("--max-connections-per-host must exceed --max-io-queues (a host's controller uses one connection per queue and one for admin)");
        }
        if self.max_connections == 0 {
            return bad("--max-connections must be at least 1");
        }
        // One entry per host: with two, which one applies (read-write or read-only, which
        // namespaces) would depend on their order.
        for (i, h) in self.hosts.iter().enumerate() {
            if self.hosts[..i].iter().any(|o| o.nqn == h.nqn) {
                return Err(ConfigError::Invalid(format!(
                    "host {} is listed twice (--allow-host, --allow-host-read-only or the configuration file): give it one entry",
                    h.nqn
                )));
            }
        }
        Ok(())
    }

    /// What `hostnqn` may use: `None` if it may not connect, else (namespaces or all, read-only).
    pub fn access(&self, hostnqn: &str) -> Option<(Option<&[u32]>, bool)> {
        if let Some(h) = self.hosts.iter().find(|h| h.nqn == hostnqn) {
            return Some((h.namespaces.as_deref(), h.read_only));
        }
        self.allow_any_host.then_some((None, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_by_host_nqn() {
        let file: ConfigFile = toml::from_str(
            r#"
            [[host]]
            nqn = "nqn.a"
            namespaces = [2]
            read_only = true
            [[host]]
            nqn = "nqn.b"
            "#,
        )
        .unwrap();
        let mut c = Config::new("nqn.s", "/x");
        c.hosts = file.hosts;
        assert_eq!(c.access("nqn.a"), Some((Some(&[2u32][..]), true)));
        assert_eq!(c.access("nqn.b"), Some((None, false)));
        assert_eq!(c.access("nqn.c"), None);
        c.allow_any_host = true;
        assert_eq!(c.access("nqn.c"), Some((None, false)));
        assert!(toml::from_str::<ConfigFile>("[[host]]\nnqn = 'x'\nbogus = 1").is_err());
        assert!(c.validate().is_ok());
        c.hosts.push(HostAccess { nqn: "nqn.a".into(), namespaces: None, read_only: false });
        let twice = c.validate().unwrap_err().to_string();
        assert!(twice.contains("host nqn.a is listed twice"), "{twice}");
        c.hosts.pop();
        c.max_transfer = 5000;
        assert!(c.validate().is_err());
    }
}
