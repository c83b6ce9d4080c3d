//! Small value types a config names, parsed and checked here and never acted on:
//! backend and listener addresses as written (an IP address, or a host name the loader
//! resolves), address ranges, which PROXY protocol headers a listener accepts, and
//! plugin references (a file and the JSON it is configured with; the loader compiles
//! them). Nothing here resolves a name, opens a file or compiles a plugin.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

// === addresses ===

/// A `HOST:PORT` address as written in the config: an IP address with a port, or a host
/// name with a port that the loader resolves (the first address the system returns).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// An IP address and port (`10.0.0.1:443`, `[::1]:8443`).
    Ip(SocketAddr),
    /// `name:port` exactly as written; the port is a valid number.
    Name(String),
}

impl Address {
    /// The address when it is an IP literal (no lookup needed).
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            Address::Ip(a) => Some(*a),
            Address::Name(_) => None,
        }
    }
}

/// Text that is not `HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressError(String);

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not an address with a port", self.0)
    }
}

impl std::error::Error for AddressError {}

impl FromStr for Address {
    type Err = AddressError;

    /// An IP address with a port, or text ending in `:PORT` (a name to resolve).
    fn from_str(text: &str) -> Result<Self, AddressError> {
        if let Ok(a) = text.parse::<SocketAddr>() {
            return Ok(Address::Ip(a));
        }
        let has_port = text
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
        if has_port {
            Ok(Address::Name(text.to_string()))
        } else {
            Err(AddressError(text.to_string()))
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(a) => write!(f, "{a}"),
            Address::Name(n) => f.write_str(n),
        }
    }
}

// === address ranges ===

/// An address range, `10.0.0.0/8` or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR` or `ADDR/PREFIX`; host bits must be zero.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (a, p) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{a}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("`/{p}` is not a prefix length from 0 to {max}"))?,
        };
        let cidr = Cidr { addr, prefix };
        if cidr.mask(addr) != addr {
            return Err(format!(
                "`{text}` has host bits set; write the network address (e.g. {}/{prefix})",
                cidr.mask(addr)
            ));
        }
        Ok(cidr)
    }

    fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let m = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v4) & m).into())
            }
            IpAddr::V6(v6) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & m).into())
            }
        }
    }

    /// Whether `ip` is in this range (an IPv4-mapped IPv6 peer counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && self.mask(ip) == self.addr
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

// === PROXY protocol ===

/// Which PROXY protocol versions a listener requires (`proxy_protocol` in its config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accept {
    /// No header is read; the socket's peer is the client.
    #[default]
    Off,
    /// Every connection must start with a v1 (text) header.
    V1,
    /// Every connection must start with a v2 (binary) header.
    V2,
    /// Every connection must start with a v1 or a v2 header.
    V1OrV2,
}

// === plugins ===

/// Whether a config `policy` value names a plugin file rather than a built-in.
pub fn is_plugin_path(policy: &str) -> bool {
    policy.ends_with(".wasm")
}

/// `on_error`: what a failed plugin call means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Use the native built-in of the same kind.
    Fallback,
    /// The safe answer: classifier → write; health → unhealthy; promotion → no promotion.
    FailClosed,
    /// The permissive answer: classifier → read; health → healthy.
    FailOpen,
}

/// Parses an `on_error` value.
pub fn parse_on_error(text: &str) -> Option<OnError> {
    match text {
        "fallback" => Some(OnError::Fallback),
        "fail-closed" => Some(OnError::FailClosed),
        "fail-open" => Some(OnError::FailOpen),
        _ => None,
    }
}

/// A plugin the config names: its file and its `config` table as JSON. The loader
/// compiles it; the config only says where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginRef {
    /// The `.wasm` file (relative paths already taken from the config file's folder).
    pub path: PathBuf,
    /// The plugin's `config` table, as JSON (`{}` when there is none).
    pub config_json: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1/8").is_err(), "host bits set");
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("ten").is_err());
    }
}
