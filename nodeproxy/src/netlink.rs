//! One netlink exchange, shared by the rtnetlink address batches ([`crate::l2`]) and the
//! nf_tables reads ([`crate::proxy`]): a `netlink-sys` socket of a given protocol, many
//! requests (encoded by the `netlink-packet-*` crates) in one `sendmsg`, and the answers
//! collected per request until each is complete — its ack or error for a plain request,
//! `NLMSG_DONE` or an error for a dump. Blocking, on a socket opened per exchange: run it
//! off the async workers.

use std::io;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkDeserializable, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

/// The biggest datagram read at once: the kernel fills dump datagrams up to 32 KiB.
const DATAGRAM: usize = 256 << 10;

/// What one request got back: the messages answering it (a dump's entries, a get's
/// reply), or the errno the kernel refused it with.
pub type Answer<I> = Result<Vec<I>, io::Error>;

/// A netlink socket to the kernel, closed on drop.
pub struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens a socket of `protocol` (a `netlink_sys::protocols` constant). `rcvbuf`, when
    /// set, must hold every answer of the biggest batch at once; a kernel that does not
    /// answer within `timeout` fails the exchange instead of hanging its caller.
    pub fn open(protocol: isize, timeout: Duration, rcvbuf: Option<usize>) -> io::Result<Self> {
        let sock = Socket::new(protocol)?;
        if let Some(size) = rcvbuf {
            sock.set_rx_buf_sz(size)?;
        }
        set_recv_timeout(&sock, timeout)?;
        Ok(Self {
            sock,
            seq: 0,
            buf: Vec::with_capacity(DATAGRAM),
        })
    }

    /// Sends `requests` — (`NLM_F_*` flags besides `NLM_F_REQUEST`, message) — in one
    /// datagram and waits until every one is answered. A request that is not a dump asks
    /// for an ack, so its completion (and its errno) is always known. The answers come in
    /// the order of `requests`; `Err` only when the socket itself fails.
    pub fn exchange<I>(&mut self, requests: Vec<(u16, I)>) -> io::Result<Vec<Answer<I>>>
    where
        I: NetlinkSerializable + NetlinkDeserializable,
    {
        let base = self.seq.wrapping_add(1);
        let (out, mut pending) = encode(requests, base);
        self.seq = base.wrapping_add(u32::try_from(pending.len()).unwrap_or(u32::MAX));
        self.sock.send_to(&out, &SocketAddr::new(0, 0), 0)?;
        while pending.iter().any(|p| !p.complete) {
            self.buf.clear();
            let n = self.sock.recv(&mut self.buf, 0).map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(io::ErrorKind::TimedOut, "no answer from the kernel")
                } else {
                    e
                }
            })?;
            let got = n.min(self.buf.len());
            absorb(&self.buf[..got], base, &mut pending)?;
        }
        Ok(pending.into_iter().map(|p| p.answer).collect())
    }
}

/// A request awaiting its answer.
#[derive(Debug)]
struct Pending<I> {
    complete: bool,
    answer: Answer<I>,
}

/// The datagram carrying `requests`, numbered from `base`, and their pending answers. Pure.
fn encode<I: NetlinkSerializable>(
    requests: Vec<(u16, I)>,
    base: u32,
) -> (Vec<u8>, Vec<Pending<I>>) {
    let mut out = Vec::new();
    let mut pending = Vec::with_capacity(requests.len());
    for (i, (flags, inner)) in requests.into_iter().enumerate() {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = base.wrapping_add(u32::try_from(i).unwrap_or(u32::MAX));
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
        msg.finalize();
        let at = out.len();
        out.resize(at + msg.buffer_len(), 0);
        msg.serialize(&mut out[at..]);
        // Messages of a datagram start on 4-byte boundaries (NLMSG_ALIGN).
        out.resize(out.len().next_multiple_of(4), 0);
        pending.push(Pending {
            complete: false,
            answer: Ok(Vec::new()),
        });
    }
    (out, pending)
}

/// Files the messages of one received datagram under the requests they answer (by
/// sequence number from `base`); messages for no pending request are ignored. A message
/// the crate cannot decode fails its request, not the exchange. Pure.
fn absorb<I: NetlinkDeserializable>(
    data: &[u8],
    base: u32,
    pending: &mut [Pending<I>],
) -> io::Result<()> {
    let mut at = 0;
    while at < data.len() {
        let rest = &data[at..];
        let buf = NetlinkBuffer::new_checked(&rest).map_err(invalid)?;
        let len = buf.length() as usize;
        at += len.next_multiple_of(4);
        let index = buf.sequence_number().wrapping_sub(base) as usize;
        let Some(p) = pending.get_mut(index).filter(|p| !p.complete) else {
            continue;
        };
        let msg = match NetlinkMessage::<I>::deserialize(&rest[..len]) {
            Ok(m) => m,
            Err(e) => {
                p.answer = Err(invalid(e));
                continue;
            }
        };
        match msg.payload {
            NetlinkPayload::Error(e) => {
                p.complete = true;
                if e.code.is_some() {
                    p.answer = Err(e.to_io());
                }
            }
            NetlinkPayload::Done(d) => {
                p.complete = true;
                if d.code < 0 {
                    p.answer = Err(io::Error::from_raw_os_error(-d.code));
                }
            }
            NetlinkPayload::InnerMessage(m) => {
                if let Ok(list) = &mut p.answer {
                    list.push(m);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink message: {e}"))
}

/// `SO_RCVTIMEO`, which `netlink-sys` has no setter for.
fn set_recv_timeout(sock: &Socket, timeout: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: `tv` is a live timeval for the call and its size is the length given.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroI32;

    use netlink_packet_core::{DoneMessage, ErrorMessage, NLM_F_MULTIPART, NetlinkHeader};
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::address::AddressMessage;

    use super::*;

    /// One message as the kernel would send it, answering sequence `seq`.
    fn reply(seq: u32, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.flags = NLM_F_MULTIPART;
        let mut msg = NetlinkMessage::new(header, payload);
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut e = ErrorMessage::default();
        e.code = NonZeroI32::new(-errno);
        reply(seq, NetlinkPayload::Error(e))
    }

    fn entry(index: u32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut a = AddressMessage::default();
        a.header.index = index;
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a))
    }

    fn done() -> Vec<u8> {
        let mut d = DoneMessage::default();
        d.code = 0;
        reply(9, NetlinkPayload::Done(d))
    }

    #[test]
    fn plain_requests_ask_for_acks_and_dumps_do_not() {
        let get = || RouteNetlinkMessage::GetAddress(AddressMessage::default());
        let (out, pending) = encode(vec![(0, get()), (NLM_F_DUMP, get())], 7);
        assert_eq!(pending.len(), 2);
        let first = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&out).expect("first");
        let len = first.header.length as usize;
        assert_eq!(len % 4, 0);
        let second =
            NetlinkMessage::<RouteNetlinkMessage>::deserialize(&out[len..]).expect("second");
        assert_eq!(
            (first.header.sequence_number, first.header.flags),
            (7, NLM_F_REQUEST | NLM_F_ACK)
        );
        assert_eq!(
            (second.header.sequence_number, second.header.flags),
            (8, NLM_F_REQUEST | NLM_F_DUMP)
        );
        assert_eq!(out.len(), 2 * len);
    }

    /// Acks and errors are matched to their requests by sequence number, in any order,
    /// across datagrams; a dump completes at `NLMSG_DONE`; strangers are ignored.
    #[test]
    fn answers_are_filed_per_request() {
        let get = || RouteNetlinkMessage::GetAddress(AddressMessage::default());
        let (_, mut pending) = encode(vec![(0, get()), (0, get()), (NLM_F_DUMP, get())], 7);
        let mut first = ack(8, libc::EEXIST);
        first.extend(reply(9, entry(2)));
        first.extend(ack(99, 0));
        absorb(&first, 7, &mut pending).expect("absorbed");
        assert!(!pending[0].complete && pending[1].complete && !pending[2].complete);
        let mut second = reply(9, entry(3));
        second.extend(done());
        second.extend(ack(7, 0));
        absorb(&second, 7, &mut pending).expect("absorbed");
        assert!(pending.iter().all(|p| p.complete));
        let answers: Vec<_> = pending.into_iter().map(|p| p.answer).collect();
        assert_eq!(answers[0].as_ref().map(Vec::len).ok(), Some(0));
        assert_eq!(
            answers[1].as_ref().err().and_then(io::Error::raw_os_error),
            Some(libc::EEXIST)
        );
        let indexes: Vec<u32> = answers[2]
            .as_ref()
            .expect("dump")
            .iter()
            .map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => a.header.index,
                _ => 0,
            })
            .collect();
        assert_eq!(indexes, [2, 3]);
    }

    #[test]
    fn a_refused_dump_and_a_torn_datagram_are_errors() {
        let get = || RouteNetlinkMessage::GetAddress(AddressMessage::default());
        let (_, mut pending) = encode(vec![(NLM_F_DUMP, get())], 1);
        let mut d = DoneMessage::default();
        d.code = -libc::EPERM;
        absorb(&reply(1, NetlinkPayload::Done(d)), 1, &mut pending).expect("absorbed");
        assert!(pending[0].complete);
        assert_eq!(
            pending[0]
                .answer
                .as_ref()
                .err()
                .and_then(io::Error::raw_os_error),
            Some(libc::EPERM)
        );
        let torn = ack(1, 0);
        assert!(absorb(&torn[..10], 1, &mut pending).is_err());
    }
}
