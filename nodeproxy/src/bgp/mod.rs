//! BGP announcement of pool addresses: every node that serves a Service of a class with
//! `spec.pool.bgp` announces its addresses as host routes, with itself as next hop, to
//! the `BGPPeer` routers that select it; the routers spread traffic over the nodes.
//! IPv6 addresses go over MP-BGP on sessions to IPv6 peer addresses. Which routes in
//! [`routes`] (pure), message framing in [`wire`] (encoding by the
//! `zettabgp` crate), one session's FSM in [`session`], watches and status in
//! [`speaker`].

pub mod routes;
pub mod session;
pub mod speaker;
pub mod wire;
