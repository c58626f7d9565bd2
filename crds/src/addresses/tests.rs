use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn pool(entries: &[&str]) -> AddressPool {
    AddressPool::parse(entries).expect("pool")
}

fn range(entry: &str) -> AddressRange {
    AddressRange::parse(entry).expect("entry")
}

fn all(p: &AddressPool, family: IpFamily) -> Vec<IpAddr> {
    let mut used = BTreeSet::new();
    while let Some(a) = p.first_free(family, &used) {
        used.insert(a);
    }
    used.into_iter().collect()
}

#[test]
fn v4_cidrs_skip_network_and_broadcast_up_to_30() {
    let r = range("198.19.1.0/30");
    assert_eq!((r.start(), r.end()), (ip("198.19.1.1"), ip("198.19.1.2")));
    assert!(!r.contains(&ip("198.19.1.0")) && !r.contains(&ip("198.19.1.3")));
    assert_eq!(range("198.19.1.0/24").size(), 254);
    let r31 = range("198.19.1.4/31");
    assert_eq!(
        (r31.start(), r31.end()),
        (ip("198.19.1.4"), ip("198.19.1.5"))
    );
    let r32 = range("198.19.1.9/32");
    assert_eq!(
        (r32.start(), r32.end()),
        (ip("198.19.1.9"), ip("198.19.1.9"))
    );
    let every = range("0.0.0.0/0");
    assert_eq!(
        (every.start(), every.end()),
        (ip("0.0.0.1"), ip("255.255.255.254"))
    );
}

#[test]
fn v6_cidrs_use_every_address() {
    let r = range("2001:db8::/126");
    assert_eq!((r.start(), r.end()), (ip("2001:db8::"), ip("2001:db8::3")));
    assert_eq!(r.family(), IpFamily::V6);
    assert_eq!(range("2001:DB8::/32").start(), ip("2001:db8::"));
    assert_eq!(range("::/0").size(), u128::MAX);
    assert_eq!(range("fd00::5/128").size(), 1);
}

#[test]
fn ranges_take_both_ends_with_or_without_spaces() {
    for entry in [
        "198.19.1.10-198.19.1.12",
        "198.19.1.10 - 198.19.1.12",
        "198.19.1.10  -198.19.1.12",
    ] {
        let r = range(entry);
        assert_eq!(
            (r.start(), r.end()),
            (ip("198.19.1.10"), ip("198.19.1.12")),
            "{entry}"
        );
        assert_eq!(r.to_string(), "198.19.1.10-198.19.1.12");
    }
    assert_eq!(range("198.19.1.10-198.19.1.10").size(), 1);
    let v6 = range("fd00::10-fd00::1:0");
    assert_eq!(v6.size(), 0xfff1);
}

#[test]
fn single_addresses_are_one_address_pools() {
    for a in [
        "198.19.0.77",
        "2001:db8::77",
        "255.255.255.255",
        "0.0.0.0",
        "::",
    ] {
        let r = range(a);
        assert_eq!((r.start(), r.end(), r.size()), (ip(a), ip(a), 1), "{a}");
        assert_eq!(r.to_string(), ip(a).to_string());
    }
    let p = pool(&["198.19.0.77"]);
    assert!(p.contains(&ip("198.19.0.77")));
    assert!(!p.contains(&ip("198.19.0.76")) && !p.contains(&ip("198.19.0.78")));
    assert_eq!(all(&p, IpFamily::V4), vec![ip("198.19.0.77")]);
}

fn err(entry: &str) -> AddressError {
    AddressRange::parse(entry).expect_err(entry)
}

fn not_an_address(entry: &str, part: &str) -> AddressError {
    AddressError::NotAnAddress {
        entry: entry.into(),
        part: part.into(),
    }
}

fn prefix_length(entry: &str) -> AddressError {
    AddressError::PrefixLength {
        entry: entry.into(),
    }
}

fn host_bits(entry: &str, network: &str) -> AddressError {
    AddressError::HostBits {
        entry: entry.into(),
        network: network.into(),
    }
}

#[test]
fn every_address_error_names_the_entry() {
    let cases = [
        ("nonsense", not_an_address("nonsense", "nonsense")),
        ("", not_an_address("", "")),
        (" 198.19.0.1", not_an_address(" 198.19.0.1", " 198.19.0.1")),
        ("198.19.0.01", not_an_address("198.19.0.01", "198.19.0.01")),
        (
            "fe80::1%eth0",
            not_an_address("fe80::1%eth0", "fe80::1%eth0"),
        ),
        (
            "::ffff:198.19.0.1",
            AddressError::Ipv4Mapped {
                entry: "::ffff:198.19.0.1".into(),
                part: "::ffff:198.19.0.1".into(),
            },
        ),
    ];
    for (entry, want) in cases {
        assert_eq!(err(entry), want, "{entry}");
    }
}

#[test]
fn every_cidr_error_names_the_entry() {
    let cases = [
        ("10.0.0.0/33", prefix_length("10.0.0.0/33")),
        ("10.0.0.0/", prefix_length("10.0.0.0/")),
        ("10.0.0.0/08", prefix_length("10.0.0.0/08")),
        ("10.0.0.0/+8", prefix_length("10.0.0.0/+8")),
        ("fd00::/129", prefix_length("fd00::/129")),
        ("198.19.1.5/24", host_bits("198.19.1.5/24", "198.19.1.0/24")),
        ("fd00::1/64", host_bits("fd00::1/64", "fd00::/64")),
    ];
    for (entry, want) in cases {
        assert_eq!(err(entry), want, "{entry}");
    }
    assert!(err("198.19.1.5/24").to_string().contains("198.19.1.0/24"));
}

#[test]
fn every_range_error_names_the_entry() {
    let cases = [
        (
            "10.0.0.1-2001:db8::1",
            AddressError::MixedFamilies {
                entry: "10.0.0.1-2001:db8::1".into(),
            },
        ),
        (
            "10.0.0.9-10.0.0.1",
            AddressError::Reversed {
                entry: "10.0.0.9-10.0.0.1".into(),
            },
        ),
        ("10.0.0.1-", not_an_address("10.0.0.1-", "")),
        (
            "10.0.0.1-10.0.0.2-10.0.0.3",
            not_an_address("10.0.0.1-10.0.0.2-10.0.0.3", "10.0.0.2-10.0.0.3"),
        ),
    ];
    for (entry, want) in cases {
        assert_eq!(err(entry), want, "{entry}");
    }
    assert!(err("10.0.0.9-10.0.0.1").to_string().contains("ends before"));
}

#[test]
fn a_pool_reports_every_bad_entry_and_needs_one_good_one() {
    let errs = AddressPool::parse(&["198.19.1.5/24", "10.0.0.9-10.0.0.1", "198.19.1.0/24", "x"])
        .expect_err("bad");
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert_eq!(
        AddressPool::parse::<&str>(&[]),
        Err(vec![AddressError::Empty])
    );
    let (lenient, errs) = AddressPool::parse_lenient(&["198.19.1.0/24", "x", "198.19.0.77"]);
    assert_eq!(errs.len(), 1);
    assert_eq!(lenient.ranges().len(), 2);
    assert!(lenient.contains(&ip("198.19.0.77")) && lenient.contains(&ip("198.19.1.1")));
}

#[test]
fn pools_merge_overlapping_and_adjacent_entries() {
    let p = pool(&[
        "198.19.1.0/29",
        "198.19.1.4-198.19.1.9",
        "198.19.1.10",
        "2001:db8::/127",
    ]);
    assert_eq!(p.size(), 12, "{p:?}");
    assert_eq!(p.ranges().len(), 2);
    assert!(p.has_family(IpFamily::V4) && p.has_family(IpFamily::V6));
    assert!(!pool(&["198.19.1.0/29"]).has_family(IpFamily::V6));
    assert_eq!(pool(&["2001:db8::/32", "2001:db9::/64"]).size(), u64::MAX);
}

#[test]
fn first_free_skips_used_addresses_across_ranges() {
    let p = pool(&[
        "198.19.1.1-198.19.1.2",
        "198.19.1.10-198.19.1.11",
        "198.19.1.20",
    ]);
    let used = BTreeSet::from([ip("198.19.1.1"), ip("198.19.1.2"), ip("198.19.1.10")]);
    assert_eq!(p.first_free(IpFamily::V4, &used), Some(ip("198.19.1.11")));
    let full: BTreeSet<IpAddr> = all(&p, IpFamily::V4).into_iter().collect();
    assert_eq!(full.len(), 5);
    assert_eq!(p.first_free(IpFamily::V4, &full), None);
    assert_eq!(p.first_free(IpFamily::V6, &BTreeSet::new()), None);
    let top = pool(&["255.255.255.255"]);
    let top_ip = ip("255.255.255.255");
    assert_eq!(top.first_free(IpFamily::V4, &BTreeSet::new()), Some(top_ip));
    assert_eq!(
        top.first_free(IpFamily::V4, &BTreeSet::from([top_ip])),
        None
    );
    let huge = pool(&["2001:db8::/32"]);
    let used = BTreeSet::from([ip("2001:db8::"), ip("2001:db8::1")]);
    assert_eq!(
        huge.first_free(IpFamily::V6, &used),
        Some(ip("2001:db8::2"))
    );
}

#[test]
fn families_are_named_as_in_the_service_spec() {
    for f in [IpFamily::V4, IpFamily::V6] {
        assert_eq!(IpFamily::from_name(f.name()), Some(f));
        assert_eq!(f.to_string(), f.name());
    }
    assert_eq!(IpFamily::from_name("ipv4"), None);
    assert_eq!(IpFamily::of(&ip("::1")), IpFamily::V6);
}

#[test]
fn the_schema_pattern_admits_every_entry_the_parser_takes() {
    let pattern = regex::Regex::new(SCHEMA_PATTERN).expect("pattern");
    for (entry, parses) in SAMPLES {
        assert_eq!(AddressRange::parse(entry).is_ok(), *parses, "{entry:?}");
        if *parses {
            assert!(
                pattern.is_match(entry),
                "{entry:?} parses but the pattern rejects it"
            );
        }
    }
    for shape in [
        "",
        " 198.19.0.1",
        "198.19.0.1 ",
        "198.19.0.0/24 ",
        "1.2.3.4-1.2.3.5-1.2.3.6",
        "1.2.3.0/24-1.2.3.9",
        "1.2.3.4\t-1.2.3.5",
        "fe80::1%eth0",
    ] {
        assert!(!pattern.is_match(shape), "{shape:?}");
        assert!(AddressRange::parse(shape).is_err(), "{shape:?}");
    }
}
