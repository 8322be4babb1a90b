//! A fault-injecting TCP proxy: stands in front of a server to cut, slow or reset the network
//! without touching the server.
//!
//! ```no_run
//! # async fn demo(topology: &pgherd::testkit::Topology) -> Result<(), pgherd::testkit::TestkitError> {
//! use pgherd::testkit::{FaultMode, FaultProxy};
//! let proxy = FaultProxy::start(topology.primary().address())?;
//! // point a client at proxy.port() ...
//! proxy.set_mode(FaultMode::Blackhole); // the network goes silent
//! proxy.set_mode(FaultMode::Pass);      // and heals: held connections carry on
//! # Ok(()) }
//! ```

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc as std_mpsc, Arc, Mutex, PoisonError,
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        tcp::{ReadHalf, WriteHalf},
        TcpListener, TcpStream,
    },
    sync::{mpsc, watch},
    time::Instant,
};

use super::TestkitError;

/// How long the proxy keeps trying to listen again on its port after [`FaultMode::Refuse`].
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
/// How many chunks may be in flight, per direction, while latency is added.
const IN_FLIGHT_CHUNKS: usize = 256;

/// What the proxy does to traffic. Switch at run time with [`FaultProxy::set_mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultMode {
    /// Forward everything unchanged.
    Pass,
    /// Forward everything, each chunk delayed by this much in each direction.
    Latency(Duration),
    /// Accept connections but forward nothing, in either direction, on new or open connections,
    /// like a network partition: nothing is lost, and when the mode changes back to
    /// [`Pass`](Self::Pass) held connections carry on.
    Blackhole,
    /// Close every open connection with a TCP reset, and reset new ones as they arrive.
    Reset,
    /// Stop listening (new connections are refused) and reset open connections, like a host whose
    /// server is gone. Switching to another mode listens again on the same port.
    Refuse,
}

struct Command {
    mode: FaultMode,
    applied: std_mpsc::Sender<()>,
}

/// A TCP proxy on a loopback port that forwards to a target and injects faults on request.
///
/// It runs on a thread of its own, so it works the same under any runtime, and stops when dropped.
pub struct FaultProxy {
    address: SocketAddr,
    target: SocketAddr,
    mode: Mutex<FaultMode>,
    /// Connections accepted since the start.
    accepted: Arc<AtomicU64>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("address", &self.address)
            .field("target", &self.target)
            .field("mode", &self.mode())
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy to `target` on a free loopback port, in [`FaultMode::Pass`].
    ///
    /// # Errors
    ///
    /// When no port can be bound or the proxy thread cannot start.
    pub fn start(target: SocketAddr) -> Result<FaultProxy, TestkitError> {
        // Below the ephemeral range, so that no outgoing connection takes the port while the
        // proxy refuses and it can listen there again.
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, super::node::free_port()))
            .or_else(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .map_err(TestkitError::io("binding the fault proxy"))?;
        listener
            .set_nonblocking(true)
            .map_err(TestkitError::io("configuring the fault proxy"))?;
        let address = listener
            .local_addr()
            .map_err(TestkitError::io("reading the fault proxy's address"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(TestkitError::io("starting the fault proxy's runtime"))?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", address.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, address, target, receiver, counter).await,
                        Err(error) => tracing::error!(%error, "fault proxy cannot listen"),
                    }
                });
            })
            .map_err(TestkitError::io("starting the fault proxy's thread"))?;
        Ok(FaultProxy {
            address,
            target,
            mode: Mutex::new(FaultMode::Pass),
            accepted,
            commands,
            thread: Some(thread),
        })
    }

    /// The address clients connect to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Where traffic goes.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// How many connections the proxy accepted since it started, whatever their fate.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// The current mode.
    pub fn mode(&self) -> FaultMode {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Switches the mode. Returns once the listener reflects it (refusing, or listening again);
    /// open connections follow within moments.
    pub fn set_mode(&self, mode: FaultMode) {
        let (applied, done) = std_mpsc::channel();
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner) = mode;
        if self.commands.send(Command { mode, applied }).is_ok() {
            let _ = done.recv_timeout(REBIND_TIMEOUT + Duration::from_secs(1));
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Closing the command channel ends the accept loop; dropping the runtime then drops every
        // connection task.
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.commands, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The accept loop: applies mode changes to the listener and hands connections to tasks.
async fn serve(
    listener: TcpListener,
    address: SocketAddr,
    target: SocketAddr,
    mut commands: mpsc::UnboundedReceiver<Command>,
    accepted_count: Arc<AtomicU64>,
) {
    let (mode_tx, mode_rx) = watch::channel(FaultMode::Pass);
    let mut listener = Some(listener);
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(Command { mode, applied }) = command else { return };
                if mode == FaultMode::Refuse {
                    listener = None;
                } else if listener.is_none() {
                    listener = rebind(address).await;
                }
                mode_tx.send_replace(mode);
                let _ = applied.send(());
            }
            accepted = accept(listener.as_ref()) => {
                if let Ok((client, _)) = accepted {
                    accepted_count.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(connection(client, target, mode_rx.clone()));
                }
            }
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

async fn rebind(address: SocketAddr) -> Option<TcpListener> {
    let deadline = Instant::now() + REBIND_TIMEOUT;
    loop {
        match TcpListener::bind(address).await {
            Ok(listener) => return Some(listener),
            Err(error) if Instant::now() >= deadline => {
                tracing::error!(%address, %error, "fault proxy cannot listen again");
                return None;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn is_cut(mode: FaultMode) -> bool {
    matches!(mode, FaultMode::Reset | FaultMode::Refuse)
}

/// One proxied connection, from accept to close.
async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<FaultMode>,
) {
    // A blackhole accepts but does not connect onwards until it heals.
    loop {
        let current = *mode.borrow_and_update();
        if is_cut(current) {
            return reset(client);
        }
        if current != FaultMode::Blackhole {
            break;
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let cut = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let both = async {
            tokio::join!(
                forward(client_read, upstream_write, mode.clone()),
                forward(upstream_read, client_write, mode.clone()),
            )
        };
        let mut watcher = mode.clone();
        tokio::select! {
            _ = both => false,
            _ = watcher.wait_for(|m| is_cut(*m)) => true,
        }
    };
    if cut {
        reset(client);
        reset(upstream);
    }
}

/// Closes with a TCP reset instead of an orderly close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Forwards one direction, honouring latency and blackholes, until end of stream or an error.
async fn forward(mut from: ReadHalf<'_>, mut to: WriteHalf<'_>, mode: watch::Receiver<FaultMode>) {
    let (chunks, mut due_chunks) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT_CHUNKS);
    let mut reader_mode = mode.clone();
    let reader = async move {
        let mut buffer = vec![0_u8; 16 * 1024];
        loop {
            if reader_mode
                .wait_for(|m| *m != FaultMode::Blackhole)
                .await
                .is_err()
            {
                return;
            }
            let read = tokio::select! {
                read = from.read(&mut buffer) => read,
                // `read` is cancel-safe: nothing is lost when the mode changes first.
                changed = reader_mode.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => return,
                },
            };
            let count = match read {
                Ok(0) | Err(_) => return,
                Ok(count) => count,
            };
            let delay = match *reader_mode.borrow() {
                FaultMode::Latency(delay) => delay,
                _ => Duration::ZERO,
            };
            if chunks
                .send((Instant::now() + delay, buffer[..count].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let mut writer_mode = mode;
    let writer = async move {
        while let Some((due, chunk)) = due_chunks.recv().await {
            tokio::time::sleep_until(due).await;
            if writer_mode
                .wait_for(|m| *m != FaultMode::Blackhole)
                .await
                .is_err()
            {
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
