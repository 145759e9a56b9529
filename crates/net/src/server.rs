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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::codec::CompressionEncoding;
use tonic::transport::{Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use fedra_data::Dataset;
use fedra_fl::config::{DeployConfig, Evaluation as EvaluateOn};
use fedra_fl::federation::MAX_ROUND_ATTEMPTS;
use fedra_fl::{CENTRAL_ID, Executor, FitJob, FitResult, FlError, Steering, run_job};
use fedra_nn::{EvalCounts, Model};

use crate::error::NetError;
use crate::metered::{MeteredStream, Traffic};
use crate::proto::federation_server::{Federation, FederationServer};
use crate::proto::{
    ClientMessage, EvaluateTask, Finished, FitTask, ServerMessage, TaskEnd, Welcome,
    client_message, server_message,
};
use crate::wire::{Assembler, Layout};
use crate::{MAX_MESSAGE_BYTES, PROTOCOL};

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

/// An update being received.
struct Incoming {
    round: u64,
    task: u64,
    num_examples: u64,
    train_loss: f64,
    examples_seen: u64,
    assembler: Assembler,
    /// The first thing wrong with it; later chunks are drained and ignored.
    refused: Option<String>,
}

/// What one message from a client means.
#[derive(Debug)]
pub enum Step {
    /// Nothing to act on yet (a chunk of an update).
    Continue,
    /// The client has its data and holds this many training and test examples.
    Ready { train: u64, test: u64 },
    /// A complete answer (an update or an evaluation) for (round, task).
    Answer {
        round: u64,
        task: u64,
        answer: Answer,
    },
    /// The session must end, for this reason.
    End(String),
}

/// The per-session decoder of a client's messages after Hello: a state machine with no I/O,
/// so that everything a peer can send is checked in one place (and fuzzed). It never panics;
/// it allocates what the model's layout sizes for updates, and an evaluation's vectors are as
/// large as the message that brought them (bounded by the message size limit).
pub struct SessionReader {
    index: usize,
    layout: Layout,
    classes: usize,
    declared: Option<(u64, u64)>,
    incoming: Option<Incoming>,
}

impl SessionReader {
    pub fn new(index: usize, layout: Layout, classes: usize) -> SessionReader {
        SessionReader {
            index,
            layout,
            classes,
            declared: None,
            incoming: None,
        }
    }

    pub fn handle(&mut self, msg: ClientMessage) -> Step {
        let Some(body) = msg.body else {
            return Step::End("sent an empty message".into());
        };
        match body {
            client_message::Body::Ready(ready) => {
                if ready.num_examples == 0 {
                    return Step::End("declared no training examples".into());
                }
                if self.declared.is_some() {
                    return Step::End("said Ready twice".into());
                }
                self.declared = Some((ready.num_examples, ready.test_examples));
                Step::Ready {
                    train: ready.num_examples,
                    test: ready.test_examples,
                }
            }
            client_message::Body::Evaluation(e) => {
                if self.incoming.is_some() {
                    return Step::End("sent an evaluation in the middle of an update".into());
                }
                let pairs = e.score_bins.len() == e.score_counts.len();
                let counts = EvalCounts {
                    classes: self.classes,
                    examples: e.num_examples,
                    loss_sum: e.loss_sum,
                    correct: e.correct,
                    confusion: e.confusion,
                    score_histograms: e.score_bins.into_iter().zip(e.score_counts).collect(),
                };
                let result = match self.declared {
                    None => Err("sent an evaluation before saying Ready".to_string()),
                    Some(_) if !pairs => {
                        Err("sent score-histogram bins and counts of different lengths".into())
                    }
                    Some((_, test)) if counts.examples > test => Err(format!(
                        "claims an evaluation of {} examples but declared {test} test examples \
                         when it joined",
                        counts.examples
                    )),
                    Some(_) => counts
                        .check(self.classes)
                        .map(|()| counts)
                        .map_err(|e| format!("sent an evaluation with {e}")),
                };
                Step::Answer {
                    round: e.round,
                    task: e.task,
                    answer: Answer::Evaluation(result),
                }
            }
            client_message::Body::Update(header) => {
                if self.incoming.is_some() {
                    return Step::End("started an update before finishing the previous one".into());
                }
                let refused = match self.declared.map(|(train, _)| train) {
                    None => Some("sent an update before saying Ready".to_string()),
                    Some(_) if header.num_examples == 0 => {
                        Some("claims an update from 0 examples".to_string())
                    }
                    Some(d) if header.num_examples > d => Some(format!(
                        "claims an update from {} examples but declared {d} when it joined",
                        header.num_examples
                    )),
                    Some(_) if !header.train_loss.is_finite() => {
                        Some(format!("sent a training loss of {}", header.train_loss))
                    }
                    Some(_) => None,
                };
                self.incoming = Some(Incoming {
                    round: header.round,
                    task: header.task,
                    num_examples: header.num_examples,
                    train_loss: header.train_loss,
                    examples_seen: header.examples_seen,
                    assembler: Assembler::new(&self.layout),
                    refused,
                });
                Step::Continue
            }
            client_message::Body::Chunk(chunk) => {
                let Some(update) = self.incoming.as_mut() else {
                    return Step::End("sent weights outside an update".into());
                };
                if update.refused.is_none()
                    && let Err(e) = update.assembler.push(&chunk)
                {
                    update.refused = Some(e.to_string());
                }
                Step::Continue
            }
            client_message::Body::UpdateEnd(_) => {
                let Some(update) = self.incoming.take() else {
                    return Step::End("ended an update it never started".into());
                };
                let result = match update.refused {
                    Some(reason) => Err(reason),
                    None => match update.assembler.finish() {
                        Err(e) => Err(e.to_string()),
                        Ok((params, buffers)) => Ok(FitResult {
                            client: self.index,
                            // At most `declared`, which the client sent as a u64 and the
                            // server's count of examples fits in a usize.
                            num_examples: usize::try_from(update.num_examples)
                                .unwrap_or(usize::MAX),
                            params,
                            buffers,
                            train_loss: update.train_loss,
                            examples_seen: usize::try_from(update.examples_seen)
                                .unwrap_or(usize::MAX),
                        }),
                    },
                };
                Step::Answer {
                    round: update.round,
                    task: update.task,
                    answer: Answer::Fit(result),
                }
            }
            client_message::Body::Goodbye(goodbye) => Step::End(format!(
                "said goodbye ({})",
                crate::wire::clip(&goodbye.reason)
            )),
            client_message::Body::Hello(_) => Step::End("said Hello twice".into()),
        }
    }
}

/// Read one client's messages until its session ends; returns why it ended.
async fn read_session(
    shared: &Shared,
    id: &str,
    index: usize,
    session: u64,
    inbound: &mut Streaming<ClientMessage>,
) -> String {
    let mut reader = SessionReader::new(
        index,
        shared.settings.layout.clone(),
        shared.settings.classes,
    );
    // Bytes received since the last complete update.
    let mut bytes = 0usize;
    loop {
        let msg = match inbound.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return "closed its session".into(),
            Err(status) => return format!("connection lost ({})", status.message()),
        };
        bytes += msg.encoded_len();
        match reader.handle(msg) {
            Step::Continue => {}
            Step::End(reason) => return reason,
            Step::Ready { train, test } => {
                let mut roster = shared.roster();
                if let Some(s) = roster.connected.get_mut(&index) {
                    s.declared = Some(train);
                    s.declared_test = test;
                }
                let ready_ids = roster.ready_ids();
                drop(roster);
                tracing::info!(
                    "{}/{} ready: {} ({id} holds {train} training and {test} test examples)",
                    ready_ids.len(),
                    shared.settings.clients,
                    ready_ids.join(" "),
                );
                shared.roster_changed.notify_all();
            }
            Step::Answer {
                round,
                task,
                mut answer,
            } => {
                let expected = {
                    let mut roster = shared.roster();
                    let session = roster.connected.get_mut(&index);
                    match session {
                        Some(s) if s.in_flight.is_some_and(|f| f.task == task) => {
                            s.in_flight.take()
                        }
                        _ => None,
                    }
                };
                let Some(in_flight) = expected else {
                    tracing::warn!(
                        client = %id,
                        index,
                        round,
                        task,
                        "discarded an answer for another round or task than the one in flight"
                    );
                    continue;
                };
                answer = match (in_flight.kind, answer) {
                    (TaskKind::Fit { max_seen }, Answer::Fit(Ok(r)))
                        if r.examples_seen as u64 > max_seen =>
                    {
                        Answer::Fit(Err(format!(
                            "claims {} examples processed, more than its examples x local \
                             epochs ({max_seen})",
                            r.examples_seen
                        )))
                    }
                    (TaskKind::Fit { .. }, Answer::Evaluation(_)) => {
                        Answer::Fit(Err("answered a training task with an evaluation".into()))
                    }
                    (TaskKind::Evaluate, Answer::Fit(_)) => {
                        Answer::Evaluation(Err("answered an evaluation task with an update".into()))
                    }
                    (_, answer) => answer,
                };
                match &answer {
                    Answer::Fit(Err(reason)) => {
                        tracing::warn!(client = %id, index, round, "refused its update: {reason}");
                    }
                    Answer::Evaluation(Err(reason)) => {
                        tracing::warn!(client = %id, index, round, "refused its evaluation: {reason}");
                    }
                    _ => {}
                }
                shared.send_event(Event::Answer {
                    client: index,
                    session,
                    round,
                    task,
                    answer,
                    bytes: std::mem::take(&mut bytes),
                });
            }
        }
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

impl NetExecutor {
    /// Block until at least `need` clients are ready or `timeout` passes; log who is there as it
    /// changes. Returns the ready indices.
    fn wait_for(&self, need: usize, timeout: Duration) -> Vec<usize> {
        let deadline = Instant::now() + timeout;
        let mut roster = self.shared.roster();
        let mut last_count = usize::MAX;
        loop {
            let ready = roster.ready();
            if ready.len() >= need {
                return ready;
            }
            if ready.len() != last_count {
                last_count = ready.len();
                tracing::info!(
                    "waiting for clients: {}/{} ready: {}",
                    ready.len(),
                    need,
                    roster.ready_ids().join(" ")
                );
            }
            let now = Instant::now();
            if now >= deadline {
                return ready;
            }
            roster = self
                .shared
                .roster_changed
                .wait_timeout(roster, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The clients expected but not ready, by id where `allowed_clients` names them.
    fn missing(&self) -> String {
        let roster = self.shared.roster();
        let settings = &self.shared.settings;
        let ready = roster.ready_ids();
        let missing: Vec<String> = match &settings.deploy.allowed_clients {
            Some(ids) => ids
                .iter()
                .filter(|id| !ready.contains(id))
                .cloned()
                .collect(),
            None => {
                let ready = roster.ready();
                (0..settings.clients)
                    .filter(|k| !ready.contains(k))
                    .map(|k| format!("#{k}"))
                    .collect()
            }
        };
        missing.join(" ")
    }

    /// Queue a task's messages towards a client without blocking the round loop.
    fn send_task(&self, outbox: Outbox, messages: Vec<ServerMessage>) {
        self.runtime.spawn(async move {
            for m in messages {
                if outbox.send(Ok(m)).await.is_err() {
                    // The session ended; its reader reports the departure.
                    break;
                }
            }
        });
    }
}

impl Executor for NetExecutor {
    fn clients_keep_local_state(&self) -> bool {
        true
    }

    fn available(&self, clients: usize) -> Result<Vec<usize>, FlError> {
        let deploy = &self.shared.settings.deploy;
        let timeout = Duration::from_secs_f64(deploy.join_timeout_s);
        let first = !self.started.swap(true, Ordering::SeqCst);
        let need = if first {
            deploy.min_clients.unwrap_or(clients)
        } else {
            deploy.min_fit_clients
        };
        let ready = self.wait_for(need, timeout);
        if first && ready.len() < need {
            let ids = self.shared.roster().ready_ids();
            return Err(FlError::State(format!(
                "gave up waiting for clients after deploy.join_timeout_s = {} s: {}/{need} ready \
                 ({}); missing: {}",
                deploy.join_timeout_s,
                ready.len(),
                ids.join(" "),
                self.missing()
            )));
        }
        if first {
            tracing::info!(
                "{} clients ready: {}",
                ready.len(),
                self.shared.roster().ready_ids().join(" ")
            );
        }
        Ok(ready.into_iter().filter(|&k| k < clients).collect())
    }

    fn fit(&self, jobs: Vec<FitJob<'_>>, data: &Dataset) -> Vec<Result<FitResult, FlError>> {
        let task = self.tasks.fetch_add(1, Ordering::SeqCst) + 1;
        let layout = &self.shared.settings.layout;
        let deploy = &self.shared.settings.deploy;
        let mut results: Vec<Option<Result<FitResult, FlError>>> = Vec::new();
        results.resize_with(jobs.len(), || None);
        // Client index -> (job position, session, round).
        let mut pending: BTreeMap<usize, (usize, u64, usize)> = BTreeMap::new();
        let mut local = Vec::new();
        let (mut sent_bytes, mut sent_to) = (0usize, 0usize);
        // The tasks' raw payloads (a SCAFFOLD task's correction included).
        let mut sent_payload = 0usize;
        let (mut received_bytes, mut received_from) = (0usize, 0usize);
        let mut round_of_task = None;
        let wire_before = self.shared.traffic.totals();
        for (i, job) in jobs.into_iter().enumerate() {
            if job.client == CENTRAL_ID {
                local.push((i, job));
                continue;
            }
            let round = job.config.round;
            round_of_task = Some(round);
            let dropped = |reason: String| FlError::Dropped {
                round,
                client: job.client,
                reason,
            };
            let control = match &job.config.control {
                None => None,
                Some(Steering::ServerControl { c, .. }) => Some(c.clone()),
                Some(Steering::Correction(_)) => {
                    // The strategy was told the clients keep their controls.
                    results[i] = Some(Err(FlError::State(
                        "a SCAFFOLD correction for a remote client, whose control the server \
                         does not hold"
                            .into(),
                    )));
                    continue;
                }
            };
            let epochs = job.config.local_epochs as u64;
            let target = {
                let mut roster = self.shared.roster();
                roster
                    .connected
                    .get_mut(&job.client)
                    .filter(|s| s.declared.is_some() && s.in_flight.is_none())
                    .map(|s| {
                        // An update covers at most its examples x epochs, and its examples at
                        // most what the client declared.
                        let max_seen = epochs.saturating_mul(s.declared.unwrap_or(0));
                        s.in_flight = Some(InFlight {
                            task,
                            kind: TaskKind::Fit { max_seen },
                        });
                        (s.session, s.outbox.clone(), s.id.clone())
                    })
            };
            let Some((session, outbox, id)) = target else {
                results[i] = Some(Err(dropped("not connected".into())));
                continue;
            };
            let c = &job.config;
            let fit = FitTask {
                round: round as u64,
                task,
                run_seed: c.run_seed,
                local_epochs: c.local_epochs as u32,
                batch_size: c.batch_size as u64,
                lr: c.sgd.lr,
                momentum: c.sgd.momentum,
                weight_decay: c.sgd.weight_decay,
                bn: bn_name(c.bn).to_string(),
                prox_mu: c.prox_mu,
                control: c.control.is_some(),
                control_since: match &c.control {
                    Some(Steering::ServerControl {
                        since: Some(round), ..
                    }) => *round as u64 + 1,
                    _ => 0,
                },
            };
            let messages = match &control {
                None => {
                    sent_payload += layout.payload_bytes();
                    task_messages(server_message::Body::Fit(fit), layout, &job.start)
                }
                Some(control) => {
                    let with_control = layout.with_control();
                    sent_payload += with_control.payload_bytes();
                    task_messages_with_control(
                        server_message::Body::Fit(fit),
                        &with_control,
                        &job.start,
                        control,
                    )
                }
            };
            tracing::info!(client = %id, index = job.client, round, "task sent");
            sent_bytes += messages.iter().map(Message::encoded_len).sum::<usize>();
            sent_to += 1;
            self.send_task(outbox, messages);
            pending.insert(job.client, (i, session, round));
        }
        let deadline = Instant::now() + Duration::from_secs_f64(deploy.round_timeout_s);
        // The server's own jobs (the SGD twin) train while the clients do.
        for (i, job) in local {
            results[i] = Some(run_job(job, data, self.shared.settings.threads));
        }
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        while !pending.is_empty() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(wait) {
                Ok(Event::Answer {
                    client,
                    session,
                    round,
                    task: answered,
                    answer,
                    bytes,
                }) => {
                    let current = pending
                        .get(&client)
                        .filter(|(_, s, r)| *s == session && *r as u64 == round)
                        .is_some();
                    if !current || answered != task {
                        tracing::warn!(
                            index = client,
                            round,
                            task = answered,
                            "discarded an update for another round or task than the one in flight"
                        );
                        continue;
                    }
                    let (i, _, round) = pending.remove(&client).expect("checked above");
                    let result = match answer {
                        Answer::Fit(result) => result,
                        Answer::Evaluation(_) => Err("an evaluation in place of an update".into()),
                    };
                    if result.is_ok() {
                        received_bytes += bytes;
                        received_from += 1;
                    }
                    results[i] = Some(result.map_err(|reason| FlError::Dropped {
                        round,
                        client,
                        reason: format!("update refused: {reason}"),
                    }));
                }
                Ok(Event::Left {
                    client,
                    session,
                    reason,
                }) => {
                    if pending.get(&client).is_some_and(|(_, s, _)| *s == session) {
                        let (i, _, round) = pending.remove(&client).expect("checked above");
                        results[i] = Some(Err(FlError::Dropped {
                            round,
                            client,
                            reason: format!("left during the round: {reason}"),
                        }));
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    for (client, (i, _, round)) in std::mem::take(&mut pending) {
                        results[i] = Some(Err(FlError::Dropped {
                            round,
                            client,
                            reason: format!(
                                "no answer within deploy.round_timeout_s = {} s",
                                deploy.round_timeout_s
                            ),
                        }));
                    }
                }
            }
        }
        if let (Some(round), true) = (round_of_task, sent_to > 0) {
            // What the protocol costs against the raw payload (f32 bytes: the model, and down
            // a SCAFFOLD task's correction too), per client and direction: the messages'
            // protobuf bytes, then what crossed the wire (TLS records, HTTP/2 frames,
            // keep-alives, compression) during the round.
            let model = layout.payload_bytes() as f64;
            let payload = sent_payload as f64 / sent_to as f64;
            let down = sent_bytes as f64 / sent_to as f64;
            let up = received_bytes as f64 / received_from.max(1) as f64;
            let wire_after = self.shared.traffic.totals();
            let wire_up = (wire_after.0 - wire_before.0) as f64 / received_from.max(1) as f64;
            let wire_down = (wire_after.1 - wire_before.1) as f64 / sent_to as f64;
            tracing::info!(
                round,
                "traffic per client: {down:.0} bytes down ({:.4}x the task's {payload:.0} \
                 payload bytes), {up:.0} bytes up ({:.4}x the model's {model:.0}) from \
                 {received_from} of {sent_to} clients; on the wire {wire_down:.0} down \
                 ({:.4}x), {wire_up:.0} up ({:.4}x)",
                down / payload,
                up / model,
                wire_down / payload,
                wire_up / model
            );
        }
        results
            .into_iter()
            .map(|r| r.expect("every job has an outcome"))
            .collect()
    }

    fn evaluate(
        &self,
        round: usize,
        model_for: &dyn Fn(usize) -> Model,
    ) -> Result<Option<EvalCounts>, FlError> {
        if self.shared.settings.deploy.evaluate != EvaluateOn::Clients {
            return Ok(None);
        }
        for attempt in 0..MAX_ROUND_ATTEMPTS {
            match self.evaluate_once(round, model_for)? {
                None => {
                    return Err(FlError::State(format!(
                        "deploy.evaluate = \"clients\", but none of the connected clients ({}) \
                         holds test data to evaluate round {round} on",
                        self.shared.roster().ready_ids().join(" ")
                    )));
                }
                Some((sum, answered)) if answered > 0 => return Ok(Some(sum)),
                Some(_) => {
                    tracing::warn!(
                        round,
                        attempt,
                        "no client evaluated the round; asking again"
                    );
                    // Clients busy with a task the deadline cut, or gone: give them a moment.
                    std::thread::sleep(Duration::from_secs(2));
                }
            }
        }
        Err(FlError::State(format!(
            "no client evaluated round {round} in {MAX_ROUND_ATTEMPTS} attempts"
        )))
    }
}

/// A task's messages: its header, the weights of `model` in chunks, then TaskEnd.
fn task_messages(
    header: server_message::Body,
    layout: &Layout,
    model: &Model,
) -> Vec<ServerMessage> {
    task_messages_with_control(header, layout, model, &[])
}

/// [`task_messages`] with SCAFFOLD's correction after the weights (`layout` with control).
fn task_messages_with_control(
    header: server_message::Body,
    layout: &Layout,
    model: &Model,
    control: &[f32],
) -> Vec<ServerMessage> {
    let mut messages = vec![message(header)];
    messages.extend(
        layout
            .chunks_with_control(model.params(), model.buffers(), control)
            .into_iter()
            .map(|c| message(server_message::Body::Chunk(c))),
    );
    messages.push(message(server_message::Body::TaskEnd(TaskEnd {})));
    messages
}

impl NetExecutor {
    /// One attempt at evaluating round `round` on the ready clients that hold test data: the sum
    /// of the answers that came within the round's deadline, and how many clients answered
    /// (`None` when no ready client holds test data).
    fn evaluate_once(
        &self,
        round: usize,
        model_for: &dyn Fn(usize) -> Model,
    ) -> Result<Option<(EvalCounts, usize)>, FlError> {
        let settings = &self.shared.settings;
        let ready = self.available(settings.clients)?;
        let task = self.tasks.fetch_add(1, Ordering::SeqCst) + 1;
        // Client index -> session.
        let mut pending: BTreeMap<usize, u64> = BTreeMap::new();
        for client in ready {
            let target = {
                let mut roster = self.shared.roster();
                roster
                    .connected
                    .get_mut(&client)
                    .filter(|s| s.declared_test > 0 && s.in_flight.is_none())
                    .map(|s| {
                        s.in_flight = Some(InFlight {
                            task,
                            kind: TaskKind::Evaluate,
                        });
                        (s.session, s.outbox.clone())
                    })
            };
            let Some((session, outbox)) = target else {
                continue;
            };
            let header = server_message::Body::Evaluate(EvaluateTask {
                round: round as u64,
                task,
            });
            self.send_task(
                outbox,
                task_messages(header, &settings.layout, &model_for(client)),
            );
            pending.insert(client, session);
        }
        if pending.is_empty() {
            let any = self
                .shared
                .roster()
                .connected
                .values()
                .any(|s| s.declared_test > 0);
            return Ok(any.then(|| (EvalCounts::empty(settings.classes), 0)));
        }
        let asked = pending.len();
        let deadline = Instant::now() + Duration::from_secs_f64(settings.deploy.round_timeout_s);
        let mut answers: BTreeMap<usize, EvalCounts> = BTreeMap::new();
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        while !pending.is_empty() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(wait) {
                Ok(Event::Answer {
                    client,
                    session,
                    task: answered_task,
                    answer,
                    ..
                }) => {
                    if answered_task != task || pending.get(&client) != Some(&session) {
                        tracing::warn!(
                            index = client,
                            round,
                            "discarded an answer for another round or task than the one in flight"
                        );
                        continue;
                    }
                    pending.remove(&client);
                    match answer {
                        Answer::Evaluation(Ok(counts)) => {
                            answers.insert(client, counts);
                        }
                        Answer::Evaluation(Err(reason)) | Answer::Fit(Err(reason)) => {
                            tracing::warn!(index = client, round, "evaluation left out: {reason}");
                        }
                        Answer::Fit(Ok(_)) => {
                            tracing::warn!(
                                index = client,
                                round,
                                "evaluation left out: an update in place of an evaluation"
                            );
                        }
                    }
                }
                Ok(Event::Left {
                    client,
                    session,
                    reason,
                }) => {
                    if pending.get(&client) == Some(&session) {
                        pending.remove(&client);
                        tracing::warn!(
                            index = client,
                            round,
                            "left during the evaluation: {reason}"
                        );
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    for client in std::mem::take(&mut pending).into_keys() {
                        tracing::warn!(
                            index = client,
                            round,
                            "no evaluation within deploy.round_timeout_s = {} s",
                            settings.deploy.round_timeout_s
                        );
                    }
                }
            }
        }
        drop(events);
        let mut sum = EvalCounts::empty(settings.classes);
        let mut answered = 0;
        for (client, counts) in answers {
            let mut with = sum.clone();
            with.add(&counts);
            // Each loss sum was finite; a huge one must not make the pooled one infinite.
            if with.loss_sum.is_finite() {
                sum = with;
                answered += 1;
            } else {
                tracing::warn!(
                    index = client,
                    round,
                    "evaluation left out: its loss sum ({}) overflows the total",
                    counts.loss_sum
                );
            }
        }
        tracing::info!(
            round,
            "evaluated on {} test examples of {answered} of {asked} clients",
            sum.examples
        );
        Ok(Some((sum, answered)))
    }
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
