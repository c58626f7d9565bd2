//! Cheap reads of nftables state over netlink (`NETLINK_NETFILTER`), for drift
//! detection: the ruleset generation (bumped by every commit of anyone in the network
//! namespace) and a fingerprint of berth's tables — table, rule and set handles — whose
//! size depends on the fixed chain layout, never on the number of Services. Set elements
//! are not read: that would cost as much as listing the table.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_GETGEN: u16 = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_HANDLE: u16 = 4;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_HANDLE: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// One family's part of a [`Fingerprint`]: (family, table handle, sorted (chain, rule
/// handle), sorted (set, set handle)).
type TableMark = (u8, Option<u64>, Vec<(String, u64)>, Vec<(String, u64)>);

/// What of berth's tables another tool cannot change without changing this: whether each
/// table exists (and which incarnation), and every rule and set by chain/name and handle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint {
    tables: Vec<TableMark>,
}

impl Fingerprint {
    /// A fingerprint of one IPv4 table with handle `n`, for tests.
    #[cfg(test)]
    pub fn test(n: u64) -> Self {
        Self {
            tables: vec![(NFPROTO_IPV4, Some(n), Vec::new(), Vec::new())],
        }
    }

    /// A short human description of how `self` differs from `before`.
    pub fn difference(&self, before: &Fingerprint) -> String {
        let mut out = Vec::new();
        for (now, was) in self.tables.iter().zip(&before.tables) {
            let family = if now.0 == NFPROTO_IPV4 { "ip" } else { "ip6" };
            match (now.1, was.1) {
                (None, _) => out.push(format!("table {family} is gone")),
                (Some(a), Some(b)) if a != b => out.push(format!("table {family} was replaced")),
                _ => {
                    if now.2 != was.2 {
                        out.push(format!(
                            "rules of table {family} changed ({} now, {} expected)",
                            now.2.len(),
                            was.2.len()
                        ));
                    }
                    if now.3 != was.3 {
                        out.push(format!("sets of table {family} changed"));
                    }
                }
            }
        }
        out.join("; ")
    }
}

/// One netlink socket to nf_tables; closed on drop.
struct Socket {
    fd: OwnedFd,
    seq: u32,
}

pub(crate) fn check<T: Default + PartialOrd>(ret: T) -> io::Result<T> {
    if ret < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// The attributes of one nf_tables message body (after its 4-byte nfgenmsg).
fn attrs(body: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 4;
    while at + 4 <= body.len() {
        let len = usize::from(u16::from_ne_bytes([body[at], body[at + 1]]));
        let kind = u16::from_ne_bytes([body[at + 2], body[at + 3]]) & 0x3fff;
        if len < 4 || at + len > body.len() {
            break;
        }
        out.push((kind, &body[at + 4..at + len]));
        at += len.next_multiple_of(4);
    }
    out
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned by `OwnedFd` from here on.
        let fd = check(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        })?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A kernel that never answers must not stall the sync loop or `/healthz`.
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: `timeout` outlives the call and its size is passed.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(Self { fd, seq: 0 })
    }

    /// Sends one request and returns the bodies of its answers (all parts of a dump).
    fn request(
        &mut self,
        msg: u16,
        family: u8,
        dump: bool,
        payload: &[u8],
    ) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let mut buf = Vec::with_capacity(20 + payload.len());
        let len = (16 + 4 + payload.len()) as u32;
        let flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
        buf.extend_from_slice(&len.to_ne_bytes());
        buf.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&self.seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&[family, 0, 0, 0]);
        buf.extend_from_slice(payload);
        // SAFETY: `buf` is valid for its length; the kernel is the default destination.
        check(unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) })?;
        self.answers(dump)
    }

    fn answers(&mut self, dump: bool) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = check(unsafe {
                libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
            })? as usize;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default());
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap_or_default());
                let len = len as usize;
                if len < 16 || at + len > n {
                    return Err(io::Error::other("truncated netlink message"));
                }
                let body = &buf[at + 16..at + len];
                at += len.next_multiple_of(4);
                if seq != self.seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(body[..4].try_into().unwrap_or_default());
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    _ => out.push(body.to_vec()),
                }
            }
            if !dump && !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

/// The ruleset generation of this network namespace.
pub fn generation() -> io::Result<u32> {
    let answers = Socket::open()?.request(NFT_MSG_GETGEN, 0, false, &[])?;
    answers
        .iter()
        .flat_map(|b| attrs(b))
        .find(|(k, _)| *k == NFTA_GEN_ID)
        .and_then(|(_, v)| Some(u32::from_be_bytes(v.try_into().ok()?)))
        .ok_or_else(|| io::Error::other("no generation in the answer"))
}

/// The fingerprint of table `table` in both families.
pub fn fingerprint(table: &str) -> io::Result<Fingerprint> {
    let mut sock = Socket::open()?;
    let mut tables = Vec::new();
    for family in [NFPROTO_IPV4, NFPROTO_IPV6] {
        let mut name = Vec::new();
        attr(&mut name, NFTA_TABLE_NAME, &cstr(table));
        let handle = match sock.request(NFT_MSG_GETTABLE, family, false, &name) {
            Ok(a) => a
                .iter()
                .flat_map(|b| attrs(b))
                .find(|(k, _)| *k == NFTA_TABLE_HANDLE)
                .and_then(|(_, v)| be_u64(v)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        let (mut rules, mut sets) = (Vec::new(), Vec::new());
        if handle.is_some() {
            rules = listing(
                &mut sock,
                NFT_MSG_GETRULE,
                family,
                table,
                NFTA_RULE_TABLE,
                [NFTA_RULE_CHAIN, NFTA_RULE_HANDLE],
            )?;
            sets = listing(
                &mut sock,
                NFT_MSG_GETSET,
                family,
                table,
                NFTA_SET_TABLE,
                [NFTA_SET_NAME, NFTA_SET_HANDLE],
            )?;
        }
        tables.push((family, handle, rules, sets));
    }
    Ok(Fingerprint { tables })
}

/// A dump of `table`'s rules or sets as sorted (name, handle) pairs.
fn listing(
    sock: &mut Socket,
    msg: u16,
    family: u8,
    table: &str,
    table_attr: u16,
    [name_attr, handle_attr]: [u16; 2],
) -> io::Result<Vec<(String, u64)>> {
    let mut filter = Vec::new();
    attr(&mut filter, table_attr, &cstr(table));
    let mut out: Vec<(String, u64)> = sock
        .request(msg, family, true, &filter)?
        .iter()
        .filter_map(|b| {
            let a = attrs(b);
            let get = |k: u16| a.iter().find(|(kind, _)| *kind == k).map(|(_, v)| *v);
            // The kernel filters rule dumps by table; set dumps are checked here too.
            if get(table_attr).map(text).as_deref() != Some(table) {
                return None;
            }
            Some((text(get(name_attr)?), be_u64(get(handle_attr)?)?))
        })
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut body = vec![0u8; 4];
        attr(&mut body, NFTA_RULE_CHAIN, &cstr("ep-1"));
        attr(&mut body, NFTA_RULE_HANDLE, &7u64.to_be_bytes());
        let a = attrs(&body);
        assert_eq!(a.len(), 2);
        assert_eq!(text(a[0].1), "ep-1");
        assert_eq!(be_u64(a[1].1), Some(7));
    }

    #[test]
    fn differences_are_described() {
        let t = |h: Option<u64>, rules: &[(&str, u64)]| Fingerprint {
            tables: vec![(
                NFPROTO_IPV4,
                h,
                rules.iter().map(|(c, h)| (c.to_string(), *h)).collect(),
                Vec::new(),
            )],
        };
        let base = t(Some(1), &[("services", 3)]);
        assert_eq!(t(None, &[]).difference(&base), "table ip is gone");
        assert_eq!(t(Some(2), &[]).difference(&base), "table ip was replaced");
        assert!(
            t(Some(1), &[])
                .difference(&base)
                .starts_with("rules of table ip changed")
        );
        assert_eq!(base.difference(&base), "");
    }

    fn nft(input: &str) {
        use std::io::Write;
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        assert!(child.wait().expect("nft").success(), "nft -f: {input}");
    }

    /// Against the real kernel, in a network namespace of this thread's own (needs root,
    /// like the rest of `make test`): one generation step per `nft -f`, and the
    /// fingerprint follows rule, set and table changes but not element changes.
    #[test]
    fn generation_and_fingerprint_follow_the_kernel() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) of this thread only; the thread ends with the test.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let empty = fingerprint("berth").expect("fingerprint");
            assert!(empty.tables.iter().all(|t| t.1.is_none()));
            let g0 = generation().expect("generation");
            nft(
                "table ip berth { set s { type ipv4_addr; }; chain c { ip daddr @s drop; }; }\n\
                 table ip6 berth { chain c { drop; }; }\n",
            );
            assert_eq!(generation().expect("generation"), g0.wrapping_add(1));
            let made = fingerprint("berth").expect("fingerprint");
            assert_eq!(made.tables[0].2.len(), 1, "{made:?}");
            assert_eq!(made.tables[0].3.len(), 1, "{made:?}");
            assert!(made.tables[1].1.is_some());
            nft("add element ip berth s { 10.0.0.1 }\n");
            assert_eq!(fingerprint("berth").expect("fingerprint"), made);
            nft("add rule ip berth c drop\n");
            let more = fingerprint("berth").expect("fingerprint");
            assert!(
                more.difference(&made)
                    .starts_with("rules of table ip changed")
            );
            nft("delete table ip berth\n");
            let gone = fingerprint("berth").expect("fingerprint");
            assert_eq!(gone.difference(&made), "table ip is gone");
        })
        .join()
        .expect("netns thread");
    }
}
