//! `spec.pool.addresses`: the one parser of a pool's entries, used by the controller to
//! allocate and by the node agents to decide what to announce, and the schema rules that
//! make the API server accept what it accepts.
//!
//! An entry is a CIDR (`198.19.0.0/24`, `2001:db8::/120`), a range (`198.19.0.10-198.19.0.20`,
//! spaces around `-` allowed) or a single address (`198.19.0.77`). A CIDR must be written
//! as its network address (no host bits set). An IPv4 CIDR of /30 or wider leaves out its
//! network and broadcast addresses, which no host on that subnet could answer for; /31
//! and /32 have none (RFC 3021). Addresses are written as the API server's `isIP()` reads
//! them: no zones, no IPv4-mapped IPv6 addresses, no leading zeros.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Shape of one entry in the CRD schema (`pattern`); [`SCHEMA_RULES`] check the rest.
pub const SCHEMA_PATTERN: &str = r"^[0-9A-Fa-f.:]+(/[0-9]{1,3}| *- *[0-9A-Fa-f.:]+)?$";

/// CEL rules (rule, message) on the whole `addresses` list. CEL cannot compare two
/// addresses, so a range that ends before it starts passes the schema; the controller
/// rejects it (the class is not `Accepted`) and the node agents skip it.
pub const SCHEMA_RULES: [(&str, &str); 3] = [
    (
        "self.all(a, !a.contains('/') || (isCIDR(a) && cidr(a) == cidr(a).masked()))",
        "a CIDR entry of addresses is not a valid CIDR or has host bits set (write its network address)",
    ),
    (
        "self.all(a, !a.contains('-') || (isIP(a.split('-')[0].trim()) && isIP(a.split('-')[1].trim()) && ip(a.split('-')[0].trim()).family() == ip(a.split('-')[1].trim()).family()))",
        "a range entry of addresses needs two IP addresses of one family",
    ),
    (
        "self.all(a, a.contains('/') || a.contains('-') || isIP(a))",
        "a single-address entry of addresses is not a valid IP address",
    ),
];

/// Entries and whether [`AddressRange::parse`] takes them: the unit tests hold the
/// schema pattern to this table and the e2e suite holds the API server's schema to it.
#[doc(hidden)]
pub const SAMPLES: &[(&str, bool)] = &[
    ("198.19.0.0/24", true),
    ("198.19.0.0/30", true),
    ("198.19.0.4/31", true),
    ("198.19.0.9/32", true),
    ("0.0.0.0/0", true),
    ("2001:db8::/120", true),
    ("2001:DB8::/32", true),
    ("::/0", true),
    ("fd00::5/128", true),
    ("198.19.0.10-198.19.0.20", true),
    ("198.19.0.10 - 198.19.0.20", true),
    ("198.19.0.10-198.19.0.10", true),
    ("fd00::10-fd00::20", true),
    ("fd00::10 - fd00::20", true),
    ("198.19.0.77", true),
    ("2001:db8::77", true),
    ("64:ff9b::198.19.0.1", true),
    ("198.19.0.5/24", false),
    ("fd00::1/64", false),
    ("10.0.0.0/33", false),
    ("10.0.0.0/08", false),
    ("fd00::/129", false),
    ("1.2.3.4/", false),
    ("198.19.0.01", false),
    ("1.2.3.256", false),
    ("1.2.3", false),
    ("1.2.3.4.5", false),
    ("::ffff:198.19.0.1", false),
    ("::ffff:c613:1", false),
    ("12345::", false),
    (":::", false),
    ("gg::1", false),
    ("nonsense", false),
    ("10.0.0.1-2001:db8::1", false),
    ("10.0.0.1-", false),
    ("10.0.0.9-10.0.0.1", false),
];

/// Why an entry (or a whole list) is not a pool.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("`{entry}`: `{part}` is not an IP address")]
    NotAnAddress { entry: String, part: String },
    #[error("`{entry}`: `{part}` is an IPv4-mapped IPv6 address; write the IPv4 address")]
    Ipv4Mapped { entry: String, part: String },
    #[error("`{entry}`: bad prefix length")]
    PrefixLength { entry: String },
    #[error("`{entry}` has host bits set (the network is {network})")]
    HostBits { entry: String, network: String },
    #[error("`{entry}`: both ends must be of one address family")]
    MixedFamilies { entry: String },
    #[error("`{entry}`: the range ends before it starts")]
    Reversed { entry: String },
    #[error("no addresses")]
    Empty,
}

/// IPv4 or IPv6, named as in a Service's `spec.ipFamilies`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// `IPv4` or `IPv6`.
    pub fn name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    /// The family a `spec.ipFamilies` value names.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }

    fn bits(self) -> u32 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }

    fn addr(self, n: u128) -> IpAddr {
        match self {
            // Values of the V4 family always fit in 32 bits: they come from `to_int` of an
            // IPv4 address or lie between two such values.
            IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
            IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(n)),
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn to_int(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(*a)),
        IpAddr::V6(a) => u128::from(*a),
    }
}

/// The usable addresses of one entry: `start..=end`, one family, never empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddressRange {
    family: IpFamily,
    start: u128,
    end: u128,
}

impl AddressRange {
    /// One `addresses` entry: a CIDR, a range `a-b` (or `a - b`) or a single address.
    pub fn parse(entry: &str) -> Result<Self, AddressError> {
        if let Some((addr, len)) = entry.split_once('/') {
            return Self::parse_cidr(entry, addr, len);
        }
        if let Some((a, b)) = entry.split_once('-') {
            let (a, b) = (
                address(entry, a.trim_matches(' '))?,
                address(entry, b.trim_matches(' '))?,
            );
            if IpFamily::of(&a) != IpFamily::of(&b) {
                return Err(AddressError::MixedFamilies {
                    entry: entry.into(),
                });
            }
            if to_int(&a) > to_int(&b) {
                return Err(AddressError::Reversed {
                    entry: entry.into(),
                });
            }
            return Ok(Self::between(a, b));
        }
        let a = address(entry, entry)?;
        Ok(Self::between(a, a))
    }

    fn parse_cidr(entry: &str, addr: &str, len: &str) -> Result<Self, AddressError> {
        let addr = address(entry, addr)?;
        let family = IpFamily::of(&addr);
        let bad_len = || AddressError::PrefixLength {
            entry: entry.into(),
        };
        // Decimal without sign or leading zeros, as the API server's `isCIDR()` reads it.
        if len.is_empty()
            || !len.bytes().all(|b| b.is_ascii_digit())
            || (len.len() > 1 && len.starts_with('0'))
        {
            return Err(bad_len());
        }
        let len: u32 = len
            .parse()
            .ok()
            .filter(|l| *l <= family.bits())
            .ok_or_else(bad_len)?;
        let host_bits = family.bits() - len;
        let host_mask = u128::MAX.checked_shr(128 - host_bits).unwrap_or(0);
        let start = to_int(&addr);
        if start & host_mask != 0 {
            return Err(AddressError::HostBits {
                entry: entry.into(),
                network: format!("{}/{len}", family.addr(start & !host_mask)),
            });
        }
        let end = start | host_mask;
        if family == IpFamily::V4 && len <= 30 {
            return Ok(Self {
                family,
                start: start + 1,
                end: end - 1,
            });
        }
        Ok(Self { family, start, end })
    }

    fn between(a: IpAddr, b: IpAddr) -> Self {
        Self {
            family: IpFamily::of(&a),
            start: to_int(&a),
            end: to_int(&b),
        }
    }

    pub fn family(&self) -> IpFamily {
        self.family
    }

    pub fn start(&self) -> IpAddr {
        self.family.addr(self.start)
    }

    pub fn end(&self) -> IpAddr {
        self.family.addr(self.end)
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        let n = to_int(ip);
        IpFamily::of(ip) == self.family && self.start <= n && n <= self.end
    }

    /// How many addresses the range has, saturating (`::/0` has one more than `u128`
    /// holds).
    pub fn size(&self) -> u128 {
        (self.end - self.start).saturating_add(1)
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start())
        } else {
            write!(f, "{}-{}", self.start(), self.end())
        }
    }
}

/// `part` of `entry` as an address the API server's `isIP()` also takes.
fn address(entry: &str, part: &str) -> Result<IpAddr, AddressError> {
    let ip: IpAddr = part.parse().map_err(|_| AddressError::NotAnAddress {
        entry: entry.into(),
        part: part.into(),
    })?;
    if let IpAddr::V6(v6) = ip
        && v6.to_ipv4_mapped().is_some()
    {
        return Err(AddressError::Ipv4Mapped {
            entry: entry.into(),
            part: part.into(),
        });
    }
    Ok(ip)
}

/// A pool's usable addresses: sorted, merged, non-overlapping ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressPool {
    ranges: Vec<AddressRange>,
}

impl AddressPool {
    /// Every entry, or every problem at once; a pool without entries is an error too.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, Vec<AddressError>> {
        let (pool, errors) = Self::parse_lenient(entries);
        if !errors.is_empty() {
            return Err(errors);
        }
        if pool.ranges.is_empty() {
            return Err(vec![AddressError::Empty]);
        }
        Ok(pool)
    }

    /// The entries that parse, and the problems of the others: for readers that keep
    /// serving the good entries of a class with a bad one.
    pub fn parse_lenient<S: AsRef<str>>(entries: &[S]) -> (Self, Vec<AddressError>) {
        let mut ranges = Vec::new();
        let mut errors = Vec::new();
        for e in entries {
            match AddressRange::parse(e.as_ref()) {
                Ok(r) => ranges.push(r),
                Err(err) => errors.push(err),
            }
        }
        (Self::from_ranges(ranges), errors)
    }

    fn from_ranges(mut ranges: Vec<AddressRange>) -> Self {
        ranges.sort();
        let mut merged: Vec<AddressRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if last.family == r.family && r.start <= last.end.saturating_add(1) => {
                    last.end = last.end.max(r.end);
                }
                _ => merged.push(r),
            }
        }
        Self { ranges: merged }
    }

    pub fn ranges(&self) -> &[AddressRange] {
        &self.ranges
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    pub fn has_family(&self, f: IpFamily) -> bool {
        self.ranges.iter().any(|r| r.family == f)
    }

    /// How many addresses the pool has, saturating.
    pub fn size(&self) -> u64 {
        self.ranges.iter().fold(0u64, |acc, r| {
            acc.saturating_add(u64::try_from(r.size()).unwrap_or(u64::MAX))
        })
    }

    /// The lowest address of `family` not in `used`. Walks only the used addresses inside
    /// each range, so huge IPv6 ranges cost nothing.
    pub fn first_free(&self, family: IpFamily, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
        for r in self.ranges.iter().filter(|r| r.family == family) {
            let mut candidate = r.start;
            for u in used.range(r.start()..=r.end()) {
                let n = to_int(u);
                if n == candidate {
                    if candidate == r.end {
                        break;
                    }
                    candidate += 1;
                } else if n > candidate {
                    break;
                }
            }
            if !used.contains(&family.addr(candidate)) {
                return Some(family.addr(candidate));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
