//! A TCP proxy between the agent and the broker, for connection faults the broker itself
//! cannot make: the agent connects to [`Proxy::port`], the proxy to the broker.
//!
//! - [`Proxy::cut_now`]: closes every connection, both sides, at once.
//! - [`Proxy::cut_after`]: lets about `n` more bytes through from the broker towards the agent
//!   and then closes every connection in the middle of an MQTT packet: the proxy follows the
//!   packet boundaries of that direction (fixed header: type byte, remaining length) and, when
//!   `n` ends on one, forwards one byte more, so the agent always holds the first part of a
//!   packet whose rest never comes.
//! - [`Proxy::refuse`]: closes the listening socket, so connects fail with ECONNREFUSED (as
//!   with a broker that is down), until [`Proxy::pass`] listens again on the same port.
//!
//! Plain threads: one accepting, two per connection (one per direction). A cut shuts both
//! sockets of every connection down, which ends the blocked reads of both threads.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::wait::{free_port, wait_until};

/// How often the accepting thread looks for a new connection or a change of mode: the agent
/// reconnects after 50 ms at the earliest, so this adds little to a reconnection.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// How long [`Proxy::pass`] tries to listen on its port again: it may linger briefly after
/// [`Proxy::refuse`] closed it.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);

/// Size of a forwarding buffer; small enough that a cut point falls inside a packet.
const BUFFER: usize = 4096;

/// Follows MQTT packet boundaries in one direction of a connection: a packet is a type byte,
/// the remaining length (1 to 4 bytes, 7 bits each, low first, high bit = more) and as many
/// bytes as that length says.
#[derive(Debug, Default)]
struct Packets {
    /// Inside the fixed header: the type byte was read.
    in_header: bool,
    /// The remaining length read so far and the shift of its next 7 bits.
    length: usize,
    shift: u32,
    /// Body bytes still to come; `None` while not inside a body.
    body: Option<usize>,
}

impl Packets {
    fn advance(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while let Some((&byte, tail)) = rest.split_first() {
            if let Some(left) = self.body {
                let take = left.min(rest.len());
                rest = &rest[take..];
                self.body = if left == take { None } else { Some(left - take) };
                continue;
            }
            rest = tail;
            if !self.in_header {
                self.in_header = true;
                self.length = 0;
                self.shift = 0;
                continue;
            }
            self.length |= usize::from(byte & 0x7f) << self.shift;
            self.shift += 7;
            if byte & 0x80 == 0 {
                self.in_header = false;
                if self.length > 0 {
                    self.body = Some(self.length);
                }
            }
        }
    }

    /// Whether the bytes so far end exactly after a whole packet.
    fn at_boundary(&self) -> bool {
        !self.in_header && self.body.is_none()
    }
}

/// One proxied connection: the agent's side and the broker's side.
#[derive(Debug)]
struct Connection {
    id: u64,
    client: TcpStream,
    upstream: TcpStream,
}

impl Connection {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

#[derive(Debug, Default)]
struct State {
    /// Open connections.
    connections: Vec<Connection>,
    /// Bytes still allowed from the broker to the agent before every connection is cut.
    budget: Option<usize>,
    /// The listening socket while connections are accepted.
    listener: Option<TcpListener>,
    next_id: u64,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    accepted: AtomicU64,
    cuts: AtomicU64,
    mid_packet_cuts: AtomicU64,
    failed_upstream: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes every connection; called with the state locked.
    fn cut_all(&self, state: &mut State) {
        for connection in state.connections.drain(..) {
            connection.close();
        }
        state.budget = None;
        self.cuts.fetch_add(1, Ordering::SeqCst);
    }
}

/// A proxy from a free port of 127.0.0.1 to 127.0.0.1:`upstream_port`; stops on drop.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    upstream_port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts forwarding connections on a free port to 127.0.0.1:`upstream_port`. The
    /// upstream need not be up: a connection the proxy cannot forward is closed at once.
    pub fn start(upstream_port: u16) -> Proxy {
        let (listener, port) = (0..20)
            .find_map(|_| {
                let port = free_port();
                TcpListener::bind(("127.0.0.1", port)).ok().map(|l| (l, port))
            })
            .expect("no free port for the proxy after 20 attempts");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let shared = Arc::new(Shared::default());
        shared.state().listener = Some(listener);
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("proxy-{port}"))
                .spawn(move || accept_loop(&shared, upstream_port))
                .expect("spawn proxy thread")
        };
        Proxy { port, upstream_port, shared, acceptor: Some(acceptor) }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port connections are forwarded to.
    pub fn upstream_port(&self) -> u16 {
        self.upstream_port
    }

    /// Connections accepted and forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections accepted but closed at once because the upstream refused them.
    pub fn failed_upstream(&self) -> u64 {
        self.shared.failed_upstream.load(Ordering::SeqCst)
    }

    /// How many times the connections were cut ([`Proxy::cut_now`] or a spent
    /// [`Proxy::cut_after`] budget).
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    /// How many cuts of [`Proxy::cut_after`] left the agent inside a packet (all of them,
    /// unless a connection ended on its own before the budget was spent).
    pub fn mid_packet_cuts(&self) -> u64 {
        self.shared.mid_packet_cuts.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.state().connections.len()
    }

    /// Closes every connection now, both towards the agent and towards the broker; whatever
    /// either side sent and the proxy has not forwarded yet is lost.
    pub fn cut_now(&self) {
        let shared = &self.shared;
        shared.cut_all(&mut shared.state());
    }

    /// Forwards `bytes` more bytes from the broker to the agent (over all connections; one more
    /// if `bytes` ends on a packet boundary), then closes every connection inside the packet
    /// it was forwarding. [`Proxy::cuts`] tells when it happened.
    pub fn cut_after(&self, bytes: usize) {
        self.shared.state().budget = Some(bytes);
    }

    /// Stops listening: new connections are refused (ECONNREFUSED), open ones stay open.
    pub fn refuse(&self) {
        self.shared.state().listener = None;
    }

    /// Listens again on the same port after [`Proxy::refuse`]; a no-op while listening.
    #[track_caller]
    pub fn pass(&self) {
        let mut bound = None;
        let ok = wait_until(REBIND_TIMEOUT, || {
            if self.shared.state().listener.is_some() {
                return true;
            }
            bound = TcpListener::bind(("127.0.0.1", self.port)).ok();
            bound.is_some()
        });
        assert!(ok, "the proxy could not listen on port {} again", self.port);
        if let Some(listener) = bound {
            listener.set_nonblocking(true).expect("non-blocking listener");
            self.shared.state().listener = Some(listener);
        }
    }

    /// Whether the proxy accepts connections.
    pub fn is_passing(&self) -> bool {
        self.shared.state().listener.is_some()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let shared = &self.shared;
        let mut state = shared.state();
        for connection in state.connections.drain(..) {
            connection.close();
        }
        state.listener = None;
    }
}

fn accept_loop(shared: &Arc<Shared>, upstream_port: u16) {
    while !shared.stop.load(Ordering::SeqCst) {
        let accepted = match shared.state().listener.as_ref().map(TcpListener::accept) {
            Some(Ok((client, _))) => Some(client),
            Some(Err(e)) if e.kind() == ErrorKind::WouldBlock => None,
            Some(Err(_)) | None => None,
        };
        match accepted {
            Some(client) => forward(shared, client, upstream_port),
            None => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Connects `client` to the upstream and starts the two forwarding threads.
fn forward(shared: &Arc<Shared>, client: TcpStream, upstream_port: u16) {
    let _ = client.set_nonblocking(false);
    let addr = SocketAddr::from(([127, 0, 0, 1], upstream_port));
    let Ok(upstream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        shared.failed_upstream.fetch_add(1, Ordering::SeqCst);
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(client2), Ok(upstream2), Ok(client3), Ok(upstream3)) =
        (client.try_clone(), upstream.try_clone(), client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let id = {
        let mut state = shared.state();
        state.next_id += 1;
        let id = state.next_id;
        state.connections.push(Connection { id, client, upstream });
        id
    };
    shared.accepted.fetch_add(1, Ordering::SeqCst);
    let to_broker = shared.clone();
    let _ = std::thread::Builder::new()
        .name(format!("proxy-up-{id}"))
        .spawn(move || pump(&to_broker, id, client2, upstream2, false));
    let to_agent = shared.clone();
    let _ = std::thread::Builder::new()
        .name(format!("proxy-down-{id}"))
        .spawn(move || pump(&to_agent, id, upstream3, client3, true));
}

/// Copies `from` to `to` until either side closes; then closes the connection `id`. The
/// broker-to-agent direction (`metered`) spends the [`Proxy::cut_after`] budget.
fn pump(shared: &Shared, id: u64, mut from: TcpStream, mut to: TcpStream, metered: bool) {
    let mut buf = [0u8; BUFFER];
    let mut packets = Packets::default();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if metered {
            let mut state = shared.state();
            if let Some(budget) = state.budget {
                let mut allowed = budget.min(n);
                packets.advance(&buf[..allowed]);
                if packets.at_boundary() && allowed < n {
                    // One byte into the next packet.
                    packets.advance(&buf[allowed..=allowed]);
                    allowed += 1;
                }
                // Written with the lock held, so that no other connection overtakes the cut.
                let _ = to.write_all(&buf[..allowed]);
                if allowed == n && packets.at_boundary() {
                    // The budget ends with this read, on a boundary: cut after the next byte.
                    state.budget = Some(budget.saturating_sub(n).max(1));
                    continue;
                }
                if allowed < n || budget <= n {
                    shared.mid_packet_cuts.fetch_add(1, Ordering::SeqCst);
                    shared.cut_all(&mut state);
                    return;
                }
                state.budget = Some(budget - n);
                continue;
            }
            drop(state);
            packets.advance(&buf[..n]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let mut state = shared.state();
    if let Some(i) = state.connections.iter().position(|c| c.id == id) {
        state.connections.remove(i).close();
    }
}
