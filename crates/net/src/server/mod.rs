//! The server side: a gRPC service that admits clients by certificate, and a [`NetExecutor`] that
//! gives the round loop (`fedra_fl::Federation`, driven by `fedra_sim::Run`) remote clients in
//! place of in-process threads.
//!
//! Each client holds one session. Its messages are read by a task of its own, which rebuilds
//! updates with a [`wire::Assembler`] (refusing wrong names, shapes, counts and non-finite
//! values) and hands them to the executor as [`Event`]s; the executor sends a round's tasks,
//! waits for the answers up to `deploy.round_timeout_s`, and returns a result or an
//! [`FlError::Dropped`] per client. An update for another round or task than the one in flight
//! is discarded and logged, so late and replayed updates never reach an aggregate.
//!
//! Here: the settings, the roster of admitted clients, the gRPC service and the server's start;
//! in `session`, the reader of one client's messages; in `executor`, a round's tasks and answers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::codec::CompressionEncoding;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use fedra_fl::FitResult;
use fedra_fl::config::DeployConfig;
use fedra_nn::EvalCounts;

use crate::error::NetError;
use crate::metered::{MeteredStream, Traffic};
use crate::proto::federation_server::{Federation, FederationServer};
use crate::proto::{
    ClientMessage, Finished, ServerMessage, Welcome, client_message, server_message,
};
use crate::wire::Layout;
use crate::{MAX_MESSAGE_BYTES, PROTOCOL};

mod executor;
mod session;

use session::read_session;
pub use session::{SessionReader, Step};

/// Messages queued towards one client before its sender waits.
const OUTBOX: usize = 8;

/// How long a new session may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// HTTP/2 keep-alive: a peer that stops answering pings is found dead within interval + timeout,
/// whatever it is doing; a client busy training still answers (its transport runs apart from
/// the training thread).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// What the server needs to know to admit clients and talk to them.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// The experiment as `config.toml` holds it, sent to every client.
    pub experiment_toml: String,
    /// `partition.clients`: client indices run from 0 to this.
    pub clients: usize,
    pub deploy: DeployConfig,
    /// The model's tensors, which every update must match.
    pub layout: Layout,
    /// The model's classes, which every evaluation must count.
    pub classes: usize,
    /// GEMM threads for the server's own training jobs (the SGD twin, the baseline).
    pub threads: usize,
    /// Where the server remembers which index each client id holds (the run folder's
    /// `clients.toml`), so that clients joining without `--shard` or `allowed_clients` return to
    /// their own index after a server restart. `None`: indices live as long as the process.
    pub clients_file: Option<PathBuf>,
    /// Names this run for the clients (see `Welcome.run_id`).
    pub run_id: String,
    /// Compress what the server sends with gzip (clients may compress their updates whatever
    /// this says: the server accepts both).
    pub compress: bool,
}

/// One connected client.
struct Session {
    id: String,
    session: u64,
    outbox: mpsc::Sender<Result<ServerMessage, Status>>,
    /// Training examples the client said it holds (`Ready`); `None` until it is ready.
    declared: Option<u64>,
    /// Test examples it said it holds (`Ready`).
    declared_test: u64,
    /// The task it is working on: a busy client gets no other task, and an answer to anything
    /// else is discarded.
    in_flight: Option<InFlight>,
}

/// A task a client is working on.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    task: u64,
    kind: TaskKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskKind {
    /// Training; the update may say it processed at most this many examples.
    Fit {
        max_seen: u64,
    },
    Evaluate,
}

/// Who is connected, and which index each client id holds.
#[derive(Default)]
struct Roster {
    connected: BTreeMap<usize, Session>,
    /// Indices handed out, kept across reconnects so a client returns to its own index.
    index_of: BTreeMap<String, usize>,
    next_session: u64,
}

impl Roster {
    /// The roster of a server starting with the indices remembered in `file` (none when it does
    /// not exist yet).
    fn from_file(file: Option<&Path>, clients: usize) -> Result<Roster, NetError> {
        let mut roster = Roster::default();
        let Some(file) = file else {
            return Ok(roster);
        };
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(roster),
            Err(e) => return Err(crate::error::io(file)(e)),
        };
        let bad = |message: String| NetError::Other(format!("{}: {message}", file.display()));
        let table: BTreeMap<String, usize> =
            toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut seen = BTreeMap::new();
        for (id, index) in table {
            if !crate::pki::valid_client_id(&id) {
                return Err(bad(format!("{id:?} is not a client id")));
            }
            if index >= clients {
                return Err(bad(format!(
                    "{id} holds index {index}, but the experiment has {clients} clients"
                )));
            }
            if let Some(other) = seen.insert(index, id.clone()) {
                return Err(bad(format!("{other} and {id} both hold index {index}")));
            }
            roster.index_of.insert(id, index);
        }
        Ok(roster)
    }

    /// Remember that `id` holds `index` (and that no other id does any more: the index has a
    /// new holder), in `file` first when the table changes (written to a temporary file, then
    /// renamed over the old one: a crash leaves the old or the new table). A failed write
    /// changes nothing, so the next attempt writes again.
    fn remember(&mut self, id: &str, index: usize, file: Option<&Path>) -> Result<(), NetError> {
        let mut table = self.index_of.clone();
        table.retain(|other, k| *k != index || other == id);
        table.insert(id.to_string(), index);
        if table == self.index_of {
            return Ok(());
        }
        if let Some(file) = file {
            let mut text = String::from(
                "# Which index each client id holds in this run (written by `fedra serve`).\n",
            );
            text.push_str(&toml::to_string(&table).map_err(|e| NetError::Other(e.to_string()))?);
            let tmp = file.with_extension("toml.tmp");
            std::fs::write(&tmp, text).map_err(crate::error::io(&tmp))?;
            std::fs::rename(&tmp, file).map_err(crate::error::io(file))?;
        }
        self.index_of = table;
        Ok(())
    }

    /// Clients that can take a task: ready, and not still busy with an earlier one (a client
    /// cut by the round's deadline may still be training or evaluating).
    fn ready(&self) -> Vec<usize> {
        self.connected
            .iter()
            .filter(|(_, s)| s.declared.is_some() && s.in_flight.is_none())
            .map(|(&k, _)| k)
            .collect()
    }

    fn ready_ids(&self) -> Vec<String> {
        self.connected
            .values()
            .filter(|s| s.declared.is_some())
            .map(|s| s.id.clone())
            .collect()
    }
}

/// A client's answer to a task: the result, or why it was refused.
#[derive(Debug)]
pub enum Answer {
    Fit(Result<FitResult, String>),
    Evaluation(Result<EvalCounts, String>),
}

/// What a client's reader task reports to the executor.
enum Event {
    Answer {
        client: usize,
        session: u64,
        round: u64,
        task: u64,
        answer: Answer,
        /// Protobuf bytes of the answer's messages (header, chunks, end).
        bytes: usize,
    },
    Left {
        client: usize,
        session: u64,
        reason: String,
    },
}

struct Shared {
    settings: ServerSettings,
    roster: Mutex<Roster>,
    /// Signalled whenever a client becomes ready or leaves.
    roster_changed: Condvar,
    events: Mutex<Sender<Event>>,
    /// Set once clients have been told the run is over: departures are then expected.
    over: std::sync::atomic::AtomicBool,
    /// Bytes on the wire, every connection together.
    traffic: Arc<Traffic>,
}

impl Shared {
    fn roster(&self) -> MutexGuard<'_, Roster> {
        // A panic while holding the lock cannot leave the roster half-updated in a way that
        // matters more than stopping the server would: keep serving.
        self.roster.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send_event(&self, event: Event) {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        // The executor gone means the run is over; nothing is waiting for the event.
        let _ = events.send(event);
    }

    /// Index for client `id` asking for `shard`, or the reason it cannot join.
    fn assign_index(&self, roster: &Roster, id: &str, shard: Option<u64>) -> Result<usize, Status> {
        let clients = self.settings.clients;
        // An index is held by the client connected under it; one remembered for a departed
        // client is only avoided when handing out a new one.
        let taken_by = |index: usize| {
            roster
                .connected
                .get(&index)
                .filter(|s| s.id != id)
                .map(|s| s.id.clone())
        };
        let remembered_by_other = |index: usize| {
            roster
                .index_of
                .iter()
                .any(|(other, k)| *k == index && other.as_str() != id)
        };
        let index = if let Some(shard) = shard {
            let shard = usize::try_from(shard).unwrap_or(usize::MAX);
            if shard >= clients {
                return Err(Status::invalid_argument(format!(
                    "shard {shard} does not exist: the experiment has {clients} clients"
                )));
            }
            shard
        } else if let Some(allowed) = &self.settings.deploy.allowed_clients {
            allowed
                .iter()
                .position(|a| a == id)
                .ok_or_else(|| Status::permission_denied(format!("{id} is not allowed")))?
        } else if let Some(&k) = roster.index_of.get(id) {
            k
        } else {
            (0..clients)
                .find(|&k| taken_by(k).is_none() && !remembered_by_other(k))
                .or_else(|| (0..clients).find(|&k| taken_by(k).is_none()))
                .ok_or_else(|| {
                    Status::resource_exhausted(format!(
                        "the federation is full: all {clients} client places are taken"
                    ))
                })?
        };
        if let Some(other) = taken_by(index) {
            return Err(Status::already_exists(format!(
                "client index {index} is held by {other}"
            )));
        }
        Ok(index)
    }
}

/// The gRPC service.
struct Service {
    shared: Arc<Shared>,
    /// No TLS (`--insecure`, loopback only): the client's id is the one its Hello names.
    insecure: bool,
}

impl Service {
    fn check_allowed(&self, id: &str, peer: &str) -> Result<(), Status> {
        match &self.shared.settings.deploy.allowed_clients {
            Some(allowed) if !allowed.iter().any(|a| a == id) => {
                tracing::warn!(%peer, client = %id, "refused: not in deploy.allowed_clients");
                Err(Status::permission_denied(format!(
                    "client {id} is not in this federation's allowed_clients"
                )))
            }
            _ => Ok(()),
        }
    }
}

type Outbox = mpsc::Sender<Result<ServerMessage, Status>>;

fn message(body: server_message::Body) -> ServerMessage {
    ServerMessage { body: Some(body) }
}

#[tonic::async_trait]
impl Federation for Service {
    type SessionStream = ReceiverStream<Result<ServerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<ClientMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown address".to_string(), |a| a.to_string());
        let certified = request
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| crate::pki::client_id(c)));
        if !self.insecure {
            let Some(id) = &certified else {
                tracing::warn!(%peer, "refused a session: its certificate names no valid client id");
                return Err(Status::unauthenticated(
                    "the client certificate names no valid client id",
                ));
            };
            self.check_allowed(id, &peer)?;
        }
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(ClientMessage {
                body: Some(client_message::Body::Hello(hello)),
            }))) => hello,
            Ok(Ok(_)) => {
                return Err(Status::invalid_argument("a session must start with Hello"));
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello in time")),
        };
        let id = match certified {
            Some(id) if !self.insecure => id,
            _ => match hello.client_id.as_deref() {
                Some(id) if crate::pki::valid_client_id(id) => {
                    self.check_allowed(id, &peer)?;
                    id.to_string()
                }
                _ => {
                    tracing::warn!(%peer, "refused a session without TLS that names no valid client id");
                    return Err(Status::unauthenticated(
                        "without TLS, Hello must name a valid client id",
                    ));
                }
            },
        };
        if hello.protocol != PROTOCOL {
            tracing::warn!(client = %id, protocol = hello.protocol, "refused: protocol version");
            return Err(Status::failed_precondition(format!(
                "this server speaks fedra protocol {PROTOCOL}, the client {}",
                hello.protocol
            )));
        }
        let (outbox, rx) = mpsc::channel(OUTBOX);
        let (index, session) = {
            let mut roster = self.shared.roster();
            if roster.connected.values().any(|s| s.id == id) {
                tracing::warn!(client = %id, %peer, "refused a second connection under an id already connected");
                return Err(Status::already_exists(format!(
                    "client {id} is already connected"
                )));
            }
            let index = self
                .shared
                .assign_index(&roster, &id, hello.shard)
                .inspect_err(|status| {
                    tracing::warn!(client = %id, "refused: {}", status.message());
                })?;
            if let Err(e) =
                roster.remember(&id, index, self.shared.settings.clients_file.as_deref())
            {
                // Serving on with an index that a restart would forget could hand it to
                // another client: refuse, and say why.
                tracing::error!(client = %id, "cannot remember its index: {e}");
                return Err(Status::unavailable(format!(
                    "the server cannot record client indices: {e}"
                )));
            }
            roster.next_session += 1;
            let session = roster.next_session;
            roster.connected.insert(
                index,
                Session {
                    id: id.clone(),
                    session,
                    outbox: outbox.clone(),
                    declared: None,
                    declared_test: 0,
                    in_flight: None,
                },
            );
            (index, session)
        };
        tracing::info!(client = %id, index, %peer, "connected");
        let welcome = message(server_message::Body::Welcome(Welcome {
            protocol: PROTOCOL,
            experiment_toml: self.shared.settings.experiment_toml.clone(),
            client: index as u64,
            run_id: self.shared.settings.run_id.clone(),
        }));
        // The outbox was just made: it has room.
        let _ = outbox.try_send(Ok(welcome));
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let reason = read_session(&shared, &id, index, session, &mut inbound).await;
            let mut roster = shared.roster();
            if roster
                .connected
                .get(&index)
                .is_some_and(|s| s.session == session)
            {
                roster.connected.remove(&index);
                let ready = roster.ready_ids();
                drop(roster);
                if shared.over.load(Ordering::SeqCst) {
                    tracing::info!(client = %id, index, "left after the end of the run: {reason}");
                } else {
                    tracing::warn!(
                        client = %id,
                        index,
                        "left: {reason} ({} ready: {})",
                        ready.len(),
                        ready.join(" ")
                    );
                }
                shared.send_event(Event::Left {
                    client: index,
                    session,
                    reason,
                });
                shared.roster_changed.notify_all();
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A running server: its address, and a way to tell every client the run is over.
pub struct ServerHandle {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: tokio::runtime::Handle,
    serving: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl ServerHandle {
    /// Start accepting clients (once; later calls do nothing).
    pub fn serve(&mut self) {
        if let Some(serving) = self.serving.take() {
            self.runtime.spawn(serving);
        }
    }

    /// Something that can tell every client the run is over, from any task (a signal handler).
    pub fn announcer(&self) -> Announcer {
        Announcer {
            shared: self.shared.clone(),
        }
    }

    /// Tell every connected client the run is over (see [`Announcer::announce`]) and stop
    /// serving.
    pub fn finish(mut self, complete: bool, reason: &str) {
        self.runtime
            .block_on(self.announcer().announce(complete, reason));
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Tells clients the run is over.
#[derive(Clone)]
pub struct Announcer {
    shared: Arc<Shared>,
}

impl Announcer {
    /// Send `Finished` to every connected client (`complete`: the run finished; otherwise the
    /// server is stopping and may be resumed) and give the messages a moment to leave.
    pub async fn announce(&self, complete: bool, reason: &str) {
        self.shared.over.store(true, Ordering::SeqCst);
        let outboxes: Vec<(String, Outbox)> = self
            .shared
            .roster()
            .connected
            .values()
            .map(|s| (s.id.clone(), s.outbox.clone()))
            .collect();
        let msg = message(server_message::Body::Finished(Finished {
            reason: reason.to_string(),
            complete,
        }));
        for (id, outbox) in &outboxes {
            let sent =
                tokio::time::timeout(Duration::from_secs(5), outbox.send(Ok(msg.clone()))).await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::warn!(client = %id, "could not tell the client the run is over");
            }
        }
        // Let the streams flush before the server goes.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The round loop's view of the remote clients.
pub struct NetExecutor {
    shared: Arc<Shared>,
    events: Mutex<Receiver<Event>>,
    runtime: tokio::runtime::Handle,
    tasks: AtomicU64,
    /// Whether the first round's wait for `min_clients` is over.
    started: std::sync::atomic::AtomicBool,
}

/// Bind `listen` for a server with `tls` on the given runtime; returns the handle (with the
/// bound address: port 0 picks a free one; [`ServerHandle::serve`] starts accepting clients) and
/// the executor for the round loop. `tls` is `None` only for `--insecure`, which serves a
/// loopback address alone and takes each client's id from its Hello.
pub fn start(
    runtime: &tokio::runtime::Handle,
    listen: SocketAddr,
    tls: Option<ServerTlsConfig>,
    settings: ServerSettings,
) -> Result<(ServerHandle, NetExecutor), NetError> {
    if tls.is_none() && !listen.ip().is_loopback() {
        return Err(NetError::Address {
            addr: listen.to_string(),
            message: "without TLS (--insecure) the server listens on a loopback address only \
                      (127.0.0.1 or ::1)"
                .into(),
        });
    }
    let roster = Roster::from_file(settings.clients_file.as_deref(), settings.clients)?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(listen))
        .map_err(|e| NetError::Address {
            addr: listen.to_string(),
            message: e.to_string(),
        })?;
    let addr = listener.local_addr().map_err(|e| NetError::Address {
        addr: listen.to_string(),
        message: e.to_string(),
    })?;
    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared {
        settings,
        roster: Mutex::new(roster),
        roster_changed: Condvar::new(),
        events: Mutex::new(events_tx),
        over: std::sync::atomic::AtomicBool::new(false),
        traffic: Arc::new(Traffic::default()),
    });
    let insecure = tls.is_none();
    if insecure {
        tracing::warn!(
            "TLS is off (--insecure): clients are not authenticated, each names itself; \
             serving {addr} (loopback) only"
        );
    }
    let service = FederationServer::new(Service {
        shared: shared.clone(),
        insecure,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES)
    .accept_compressed(CompressionEncoding::Gzip);
    let service = if shared.settings.compress {
        service.send_compressed(CompressionEncoding::Gzip)
    } else {
        service
    };
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(service);
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    // Futures do nothing until polled: connections wait in the listener's backlog until
    // `serve` spawns this.
    let traffic = shared.traffic.clone();
    let serving = Box::pin(async move {
        let incoming = TcpListenerStream::new(listener)
            .map(move |tcp| tcp.map(|tcp| MeteredStream::new(tcp, traffic.clone())));
        let stop = async {
            let _ = shutdown_rx.await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!("server stopped: {e}");
        }
    });
    let handle = ServerHandle {
        shared: shared.clone(),
        addr,
        shutdown: Some(shutdown_tx),
        runtime: runtime.clone(),
        serving: Some(serving),
    };
    let executor = NetExecutor {
        shared,
        events: Mutex::new(events_rx),
        runtime: runtime.clone(),
        tasks: AtomicU64::new(0),
        started: std::sync::atomic::AtomicBool::new(false),
    };
    Ok((handle, executor))
}

/// The protocol's name of a BatchNorm policy.
pub fn bn_name(bn: fedra_nn::BnPolicy) -> &'static str {
    match bn {
        fedra_nn::BnPolicy::Train => "train",
        fedra_nn::BnPolicy::Frozen => "frozen",
        fedra_nn::BnPolicy::Local => "local",
    }
}

/// The BatchNorm policy a protocol name stands for.
pub fn bn_from_name(name: &str) -> Option<fedra_nn::BnPolicy> {
    match name {
        "train" => Some(fedra_nn::BnPolicy::Train),
        "frozen" => Some(fedra_nn::BnPolicy::Frozen),
        "local" => Some(fedra_nn::BnPolicy::Local),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    //! The session decoder against hand-made sessions, arbitrary bytes and mutated valid
    //! sessions (`PROPTEST_CASES` sets how many; the default keeps the suite quick).

    use super::*;
    use crate::proto::{Evaluation, Ready, TensorChunk, UpdateEnd, UpdateHeader};
    use fedra_nn::{Model, ModelSpec};
    use proptest::prelude::*;
    use prost::Message;

    fn model() -> Model {
        Model::new(&ModelSpec::by_name("logreg", [1, 28, 28], 10).unwrap(), 1).unwrap()
    }

    fn msg(body: client_message::Body) -> ClientMessage {
        ClientMessage { body: Some(body) }
    }

    /// Ready, then a complete update of `model`'s weights for round 3, task 7.
    fn session(model: &Model, examples: u64) -> Vec<ClientMessage> {
        let layout = Layout::of(model);
        let mut out = vec![
            msg(client_message::Body::Ready(Ready {
                num_examples: 100,
                test_examples: 40,
            })),
            msg(client_message::Body::Update(UpdateHeader {
                round: 3,
                task: 7,
                num_examples: examples,
                train_loss: 0.5,
                examples_seen: examples,
            })),
        ];
        out.extend(
            layout
                .chunks(model.params(), model.buffers())
                .into_iter()
                .map(|c| msg(client_message::Body::Chunk(c))),
        );
        out.push(msg(client_message::Body::UpdateEnd(UpdateEnd {})));
        out
    }

    /// The counts of an evaluation of `n` examples of 10 classes (example i of class i % 10,
    /// predicted right unless i % 3 == 0).
    fn counts(n: usize) -> EvalCounts {
        let labels: Vec<u16> = (0..n).map(|i| (i % 10) as u16).collect();
        let mut probs = vec![0.01; n * 10];
        for i in 0..n {
            let guess = if i % 3 == 0 { (i + 1) % 10 } else { i % 10 };
            probs[i * 10 + guess] = 0.91;
        }
        let correct = (0..n).filter(|i| i % 3 != 0).count();
        EvalCounts::from_probs(&probs, &labels, 10, 0.25 * n as f64, correct)
    }

    /// An Evaluation message for round 4, task 8.
    fn evaluation(c: &EvalCounts) -> ClientMessage {
        msg(client_message::Body::Evaluation(Evaluation {
            round: 4,
            task: 8,
            num_examples: c.examples,
            loss_sum: c.loss_sum,
            correct: c.correct,
            confusion: c.confusion.clone(),
            score_bins: c.score_histograms.iter().map(|b| b.0).collect(),
            score_counts: c.score_histograms.iter().map(|b| b.1).collect(),
        }))
    }

    fn last_evaluation(steps: &[Step]) -> &Result<EvalCounts, String> {
        match steps.last() {
            Some(Step::Answer {
                answer: Answer::Evaluation(result),
                ..
            }) => result,
            other => panic!("no evaluation at the end: {other:?}"),
        }
    }

    fn run(messages: Vec<ClientMessage>) -> Vec<Step> {
        let mut reader = SessionReader::new(2, Layout::of(&model()), 10);
        let mut steps = Vec::new();
        for m in messages {
            let step = reader.handle(m);
            let end = matches!(step, Step::End(_));
            steps.push(step);
            if end {
                break;
            }
        }
        steps
    }

    fn last_update(steps: &[Step]) -> &Result<FitResult, String> {
        match steps.last() {
            Some(Step::Answer {
                answer: Answer::Fit(result),
                ..
            }) => result,
            other => panic!("no update at the end: {other:?}"),
        }
    }

    #[test]
    fn client_indices_are_remembered_in_their_file_and_bad_files_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("clients.toml");
        let mut roster = Roster::from_file(Some(&file), 4).unwrap();
        assert!(
            roster.index_of.is_empty(),
            "no file yet: nobody holds an index"
        );
        roster.remember("site-b", 0, Some(&file)).unwrap();
        roster.remember("site-a", 1, Some(&file)).unwrap();
        roster.remember("site-a", 1, Some(&file)).unwrap();
        let again = Roster::from_file(Some(&file), 4).unwrap();
        assert_eq!(again.index_of, roster.index_of);
        assert_eq!(again.index_of["site-a"], 1);
        // A new holder of an index replaces the old one, in the file too.
        roster.remember("site-c", 0, Some(&file)).unwrap();
        let again = Roster::from_file(Some(&file), 4).unwrap();
        assert_eq!(again.index_of.get("site-b"), None);
        assert_eq!(again.index_of["site-c"], 0);
        // A write that fails changes nothing, so the next attempt writes.
        let gone = dir.path().join("missing-folder").join("clients.toml");
        assert!(roster.remember("site-d", 2, Some(&gone)).is_err());
        assert_eq!(roster.index_of.get("site-d"), None);
        assert!(!dir.path().join("clients.toml.tmp").exists());
        for (text, says) in [
            ("a = 0\nb = 0\n", "a and b both hold index 0"),
            ("\"../x\" = 1\n", "is not a client id"),
            ("a = -1\n", "clients.toml"),
            ("a = 4\n", "the experiment has 4 clients"),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = Roster::from_file(Some(&file), 4).err().unwrap().to_string();
            assert!(e.contains(says) && e.contains("clients.toml"), "{e}");
        }
    }

    #[test]
    fn a_valid_update_comes_out_exactly() {
        let m = model();
        let steps = run(session(&m, 60));
        assert!(matches!(
            steps[0],
            Step::Ready {
                train: 100,
                test: 40
            }
        ));
        let Step::Answer {
            round: 3,
            task: 7,
            answer: Answer::Fit(Ok(r)),
        } = steps.last().unwrap()
        else {
            panic!("{steps:?}");
        };
        assert_eq!((r.client, r.num_examples), (2, 60));
        assert_eq!(r.params, m.params());
    }

    #[test]
    fn bad_updates_are_refused_with_the_reason() {
        let m = model();
        // More examples than declared.
        let steps = run(session(&m, 101));
        let err = last_update(&steps).as_ref().unwrap_err();
        assert!(err.contains("declared 100"), "{err}");
        // Zero examples.
        let err = last_update(&run(session(&m, 0))).clone().unwrap_err();
        assert!(err.contains("0 examples"), "{err}");
        // A wrong-shaped tensor: one value short.
        let mut s = session(&m, 50);
        if let Some(client_message::Body::Chunk(c)) = &mut s[2].body {
            c.data = c.data.slice(..c.data.len() - 4);
        }
        let err = last_update(&run(s)).clone().unwrap_err();
        assert!(err.contains("ended after"), "{err}");
        // NaN.
        let mut s = session(&m, 50);
        if let Some(client_message::Body::Chunk(c)) = &mut s[2].body {
            let mut bytes = c.data.to_vec();
            bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            c.data = bytes.into();
        }
        let err = last_update(&run(s)).clone().unwrap_err();
        assert!(err.contains("NaN"), "{err}");
        // A tensor the model does not have.
        let mut s = session(&m, 50);
        if let Some(client_message::Body::Chunk(c)) = &mut s[2].body {
            c.name = "fc9.weight".into();
        }
        let err = last_update(&run(s)).clone().unwrap_err();
        assert!(err.contains("fc9.weight"), "{err}");
        // An update before Ready, weights outside an update, a second Hello.
        let mut s = session(&m, 50);
        s.remove(0);
        assert!(last_update(&run(s)).is_err());
        let steps = run(vec![msg(client_message::Body::Chunk(
            TensorChunk::default(),
        ))]);
        assert!(matches!(steps.last(), Some(Step::End(_))));
        let steps = run(vec![msg(client_message::Body::Hello(Default::default()))]);
        assert!(matches!(steps.last(), Some(Step::End(_))));
    }

    #[test]
    fn evaluations_come_out_exactly_or_are_refused_with_the_reason() {
        let ready = session(&model(), 1).remove(0);
        let good = counts(40);
        let steps = run(vec![ready.clone(), evaluation(&good)]);
        assert_eq!(last_evaluation(&steps), &Ok(good.clone()));
        let refused = |c: &EvalCounts, with_ready: bool| {
            let mut messages = vec![evaluation(c)];
            if with_ready {
                messages.insert(0, ready.clone());
            }
            last_evaluation(&run(messages)).clone().unwrap_err()
        };
        // More test examples than declared; before Ready.
        let err = refused(&counts(41), true);
        assert!(err.contains("declared 40 test examples"), "{err}");
        assert!(refused(&good, false).contains("before saying Ready"));
        // Counts that do not add up, a NaN loss, another number of classes.
        let mut bad = good.clone();
        bad.confusion[3] += 1;
        assert!(refused(&bad, true).contains("does not add up"));
        let mut bad = good.clone();
        bad.loss_sum = f64::NAN;
        assert!(refused(&bad, true).contains("loss sum of NaN"));
        let mut bad = good.clone();
        bad.confusion.truncate(81);
        assert!(refused(&bad, true).contains("81 cells"));
        let mut bad = good.clone();
        bad.score_histograms[0].1 += 1;
        assert!(refused(&bad, true).contains("class 0"));
        let mut message = evaluation(&good);
        if let Some(client_message::Body::Evaluation(e)) = &mut message.body {
            e.score_counts.pop();
        }
        let err = last_evaluation(&run(vec![ready.clone(), message]))
            .clone()
            .unwrap_err();
        assert!(err.contains("different lengths"), "{err}");
        // In the middle of an update: the session ends.
        let mut s = session(&model(), 50);
        s.insert(3, evaluation(&good));
        assert!(matches!(run(s).last(), Some(Step::End(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(frames in prop::collection::vec(
            prop::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut reader = SessionReader::new(0, Layout::of(&model()), 10);
            for frame in frames {
                if let Ok(m) = ClientMessage::decode(&frame[..])
                    && let Step::End(_) = reader.handle(m)
                {
                    break;
                }
            }
        }

        #[test]
        fn mutated_valid_sessions_are_refused_or_exact(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), 1u8..=255), 1..4),
        ) {
            let m = model();
            let mut messages = session(&m, 50);
            messages.push(evaluation(&counts(40)));
            let mut frames: Vec<Vec<u8>> = messages.iter().map(|x| x.encode_to_vec()).collect();
            for (frame, byte, xor) in flips {
                let f = frame.index(frames.len());
                if frames[f].is_empty() { continue; }
                let b = byte.index(frames[f].len());
                frames[f][b] ^= xor;
            }
            let mut reader = SessionReader::new(0, Layout::of(&m), 10);
            let (mut declared, mut declared_test) = (0, 0);
            for frame in &frames {
                let Ok(decoded) = ClientMessage::decode(&frame[..]) else { break };
                match reader.handle(decoded) {
                    Step::End(_) => break,
                    Step::Ready { train, test } => (declared, declared_test) = (train, test),
                    Step::Answer { answer: Answer::Evaluation(Ok(c)), .. } => {
                        // Accepted: then its counts agree with one another and with what the
                        // client declared.
                        prop_assert!(c.check(10).is_ok());
                        prop_assert!(c.examples >= 1 && c.examples <= declared_test);
                    }
                    Step::Answer { answer: Answer::Fit(Ok(r)), .. } => {
                        // Accepted: then it has the model's shape, only finite values, and no
                        // more examples than declared (the Ready message may be mutated too).
                        prop_assert_eq!(r.params.len(), m.params().len());
                        prop_assert!(r.params.iter().all(|v| v.is_finite()));
                        prop_assert!(r.num_examples >= 1 && r.num_examples as u64 <= declared);
                    }
                    _ => {}
                }
            }
        }
    }
}
