//! The joining client (`fedra join`): connect with its certificate, learn the experiment, load
//! its own data, then train every task the server sends with the simulation's client code and
//! return the update. Network errors and server restarts are retried with exponential backoff
//! and jitter; a refusal of the client's identity (certificate, allow-list) or a server whose
//! certificate does not verify is final.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::transport::Endpoint;

use fedra_data::TrainTest;
use fedra_fl::federation::{aggregated_params, model_spec};
use fedra_fl::strategy::{Scaffold, clip_update, correction};
use fedra_fl::{ExperimentConfig, Federation, FitConfig, FitJob, Steering, run_job};
use fedra_nn::{Model, ModelSpec, SgdConfig};

use crate::controls::{self, ClientControls};
use crate::error::NetError;
use crate::local_state::{LocalLayers, stamp};
use crate::proto::federation_client::FederationClient;
use crate::proto::{
    ClientMessage, EvaluateTask, Evaluation, FitTask, Goodbye, Hello, Ready, UpdateEnd,
    UpdateHeader, client_message, server_message,
};
use crate::server::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, bn_from_name};
use crate::wire::{Assembler, Layout};
use crate::{MAX_MESSAGE_BYTES, PROTOCOL, pki};

/// How a client joins.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    /// `HOST:PORT` of the server.
    pub server: String,
    /// The name the server's certificate must carry (default: HOST).
    pub server_name: Option<String>,
    /// This client's id: its certificate is `CERTS/ID.pem`.
    pub id: String,
    pub certs: PathBuf,
    /// Act as simulation client K of the experiment's partition of this client's data.
    pub shard: Option<usize>,
    /// GEMM threads for local training.
    pub threads: usize,
    /// Present the client certificate (false only shows the server refusing a client without).
    pub present_certificate: bool,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// No TLS (`--insecure`): the server must be on this machine's loopback; the client names
    /// itself in its Hello and `certs` is not read.
    pub insecure: bool,
    /// Compress updates with gzip (the client accepts compressed tasks whatever this says).
    pub compress: bool,
    /// Where this client keeps what must outlive it: with `model.bn = "local"` (FedBN), its own
    /// normalisation layers, in `STATE_DIR/ID/`.
    pub state_dir: PathBuf,
}

/// How a session ended without an error.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The run finished.
    Complete(String),
    /// The server stopped early (it may be resumed), or this client was interrupted.
    Stopped(String),
}

/// Loads the data an experiment names, from this client's own disk.
pub type DataLoader = dyn Fn(&ExperimentConfig) -> Result<TrainTest, String> + Send + Sync;

/// The data of one experiment (cut as it says), loaded once for all the clients of a process.
#[derive(Default)]
struct DataCache {
    loaded: std::sync::Mutex<Option<(String, Arc<TrainTest>)>>,
}

impl DataCache {
    fn get(
        &self,
        toml: &str,
        config: &ExperimentConfig,
        load: &DataLoader,
    ) -> Result<Arc<TrainTest>, NetError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((t, data)) = loaded.as_ref()
            && t == toml
        {
            return Ok(data.clone());
        }
        let data = load(config).map_err(NetError::Other)?;
        let data = Arc::new(config.data.select(data)?);
        *loaded = Some((toml.to_string(), data.clone()));
        Ok(data)
    }
}

/// Everything a client prepares once per experiment.
struct Prepared {
    toml: String,
    /// The server's name for the run.
    run_id: String,
    index: usize,
    config: ExperimentConfig,
    data: Arc<TrainTest>,
    indices: Vec<usize>,
    spec: ModelSpec,
    layout: Layout,
    /// Parameters `model.freeze` keeps fixed.
    frozen: Vec<std::ops::Range<usize>>,
    /// BatchNorm layers whose statistics `model.freeze_statistics` keeps fixed.
    frozen_statistics: Vec<String>,
    /// With `model.bn = "local"`: this client's own normalisation layers, on its disk.
    local: Option<std::sync::Mutex<LocalLayers>>,
    /// With `strategy.name = "scaffold"`: this client's control variates, on its disk.
    scaffold: Option<ScaffoldClient>,
}

/// A SCAFFOLD client's side: the strategy's control arithmetic, the parameters it covers and
/// the client's own controls.
struct ScaffoldClient {
    strategy: Scaffold,
    params: Vec<std::ops::Range<usize>>,
    controls: std::sync::Mutex<ClientControls>,
}

/// Why a session ended badly.
enum Failure {
    /// Retrying cannot help (identity refused, bad certificate files, bad experiment).
    Final(NetError),
    /// A network error or a server restart: try again. `welcomed`: the session got as far as
    /// the server's Welcome (the backoff starts over).
    Retry { reason: String, welcomed: bool },
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether a transport failure is TLS refusing an identity (ours or the server's): final.
fn is_certificate_failure(chain: &str) -> bool {
    let lower = chain.to_ascii_lowercase();
    lower.contains("certificate") || lower.contains("fatal alert") || lower.contains("unknownca")
}

fn from_status(status: &tonic::Status, welcomed: bool) -> Failure {
    let chain = error_chain(status);
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            Failure::Final(NetError::Refused(status.message().to_string()))
        }
        Code::InvalidArgument | Code::FailedPrecondition => {
            Failure::Final(NetError::Refused(status.message().to_string()))
        }
        _ if is_certificate_failure(&chain) => Failure::Final(NetError::Refused(format!(
            "TLS refused the connection: {chain}"
        ))),
        _ => Failure::Retry {
            reason: chain,
            welcomed,
        },
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, NetError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| NetError::Other(format!("cannot start the async runtime: {e}")))
}

/// Take part in the federation at `opts.server` until the run is over. `load` reads this
/// client's data for the experiment the server names.
pub fn join(opts: &JoinOptions, load: &DataLoader) -> Result<Outcome, NetError> {
    if !pki::valid_client_id(&opts.id) {
        return Err(NetError::Other(format!(
            "--id {:?} is not a valid client id",
            opts.id
        )));
    }
    check_transport(opts)?;
    runtime()?.block_on(member(opts, &DataCache::default(), load))
}

/// Without TLS the server must be on this machine: every address `opts.server` resolves to is
/// a loopback address. Nothing to check with TLS.
fn check_transport(opts: &JoinOptions) -> Result<(), NetError> {
    if !opts.insecure {
        return Ok(());
    }
    use std::net::ToSocketAddrs;
    let bad = |message: String| NetError::Address {
        addr: opts.server.clone(),
        message,
    };
    let addrs: Vec<std::net::SocketAddr> = opts
        .server
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(bad(
            "without TLS (--insecure) the server must be on a loopback address (127.0.0.1, ::1, \
             localhost)"
                .into(),
        ));
    }
    tracing::warn!(server = %opts.server, "TLS is off (--insecure): loopback only");
    Ok(())
}

/// Run `n` clients in this process (a load test or a demonstration): client k has id
/// `opts.id` followed by k (its certificate `CERTS/IDk.pem`) and acts as simulation client k.
/// The data is loaded once for all of them. Returns each client's outcome, or the first error.
pub fn join_swarm(
    opts: &JoinOptions,
    n: usize,
    load: Arc<DataLoader>,
) -> Result<Vec<Outcome>, NetError> {
    let ids: Vec<String> = (0..n).map(|k| format!("{}{k}", opts.id)).collect();
    if let Some(bad) = ids.iter().find(|id| !pki::valid_client_id(id)) {
        return Err(NetError::Other(format!("client id {bad:?} is not valid")));
    }
    check_transport(opts)?;
    let cache = Arc::new(DataCache::default());
    runtime()?.block_on(async {
        let mut members = tokio::task::JoinSet::new();
        for (k, id) in ids.into_iter().enumerate() {
            let opts = JoinOptions {
                id,
                shard: Some(k),
                ..opts.clone()
            };
            let (cache, load) = (cache.clone(), load.clone());
            members.spawn(async move {
                let outcome = member(&opts, &cache, load.as_ref()).await;
                (k, opts.id, outcome)
            });
        }
        let mut outcomes = vec![None; n];
        while let Some(done) = members.join_next().await {
            let (k, id, outcome) =
                done.map_err(|e| NetError::Other(format!("a swarm client stopped: {e}")))?;
            let outcome = outcome.map_err(|e| NetError::Other(format!("client {id}: {e}")))?;
            outcomes[k] = Some(outcome);
        }
        Ok(outcomes.into_iter().map(|o| o.expect("joined")).collect())
    })
}

/// One client's life: sessions and reconnections with backoff, until the run is over.
async fn member(
    opts: &JoinOptions,
    cache: &DataCache,
    load: &DataLoader,
) -> Result<Outcome, NetError> {
    let mut prepared: Option<Arc<Prepared>> = None;
    let mut backoff = Duration::from_millis(500);
    let mut ever_welcomed = false;
    // Sessions in a row that the server closed right after the TLS handshake, before a word.
    let mut closed_at_once = 0;
    loop {
        match session(opts, &mut prepared, cache, load).await {
            Ok(outcome) => return Ok(outcome),
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Retry { reason, welcomed }) => {
                ever_welcomed |= welcomed;
                if welcomed {
                    backoff = Duration::from_millis(500);
                }
                // TLS 1.3 checks the client's certificate after the client's side of the
                // handshake is done; the server's alert can be lost when it closes at once, and
                // the client then sees only a closed connection (or a broken pipe). Three in a row, never welcomed:
                // a refusal, which retrying cannot mend.
                let closed = reason.contains("connection closed") || reason.contains("broken pipe");
                if !ever_welcomed && closed {
                    closed_at_once += 1;
                    if closed_at_once >= 3 {
                        return Err(NetError::Refused(format!(
                            "the server closed the connection right after the TLS handshake \
                             {closed_at_once} times in a row ({reason}): it most likely refuses \
                             this client's certificate (from another CA, or none)"
                        )));
                    }
                } else {
                    closed_at_once = 0;
                }
                // Jitter spreads a federation's reconnections after a server restart.
                let jitter = rand::rng().random_range(0.75..1.25);
                let wait = backoff.mul_f64(jitter);
                tracing::warn!(
                    client = %opts.id,
                    "{reason}; reconnecting in {:.1} s",
                    wait.as_secs_f64()
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = interrupted() => return Ok(Outcome::Stopped("interrupted".into())),
                }
                backoff = (backoff * 2).min(opts.max_backoff);
            }
        }
    }
}

fn message(body: client_message::Body) -> ClientMessage {
    ClientMessage { body: Some(body) }
}

/// One session, from connecting to its end.
async fn session(
    opts: &JoinOptions,
    prepared: &mut Option<Arc<Prepared>>,
    cache: &DataCache,
    load: &DataLoader,
) -> Result<Outcome, Failure> {
    let host = opts
        .server
        .rsplit_once(':')
        .map_or(opts.server.as_str(), |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let server_name = opts.server_name.as_deref().unwrap_or(host);
    let scheme = if opts.insecure { "http" } else { "https" };
    let mut endpoint =
        Endpoint::from_shared(format!("{scheme}://{}", opts.server)).map_err(|e| {
            Failure::Final(NetError::Address {
                addr: opts.server.clone(),
                message: e.to_string(),
            })
        })?;
    if !opts.insecure {
        let tls = pki::client_tls(&opts.certs, &opts.id, server_name, opts.present_certificate)
            .map_err(Failure::Final)?;
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Failure::Final(e.into()))?;
    }
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await.map_err(|e| {
        let chain = error_chain(&e);
        if is_certificate_failure(&chain) {
            Failure::Final(NetError::Refused(format!("TLS failed: {chain}")))
        } else {
            Failure::Retry {
                reason: format!("cannot connect to {}: {chain}", opts.server),
                welcomed: false,
            }
        }
    })?;
    let mut client = FederationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
        .accept_compressed(CompressionEncoding::Gzip);
    if opts.compress {
        client = client.send_compressed(CompressionEncoding::Gzip);
    }
    let (tx, rx) = mpsc::channel::<ClientMessage>(8);
    let hello = message(client_message::Body::Hello(Hello {
        protocol: PROTOCOL,
        shard: opts.shard.map(|k| k as u64),
        client_id: opts.insecure.then(|| opts.id.clone()),
    }));
    // The channel was just made: it has room.
    let _ = tx.try_send(hello);
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| from_status(&s, false))?
        .into_inner();
    let mut welcomed = false;
    let mut task: Option<(Task, Assembler, Arc<Prepared>)> = None;
    let lost = |reason: String, welcomed: bool| Failure::Retry { reason, welcomed };
    loop {
        let msg = tokio::select! {
            msg = inbound.message() => msg,
            _ = interrupted() => {
                let _ = tx.send(message(client_message::Body::Goodbye(Goodbye {
                    reason: "interrupted".into(),
                }))).await;
                drop(tx);
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(Outcome::Stopped("interrupted".into()));
            }
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err(lost("the server closed the session".into(), welcomed)),
            Err(status) => return Err(from_status(&status, welcomed)),
        };
        let Some(body) = msg.body else {
            return Err(Failure::Final(NetError::Protocol(
                "the server sent an empty message".into(),
            )));
        };
        match body {
            server_message::Body::Welcome(welcome) => {
                if welcome.protocol != PROTOCOL {
                    return Err(Failure::Final(NetError::Protocol(format!(
                        "the server speaks protocol {}, this client {PROTOCOL}",
                        welcome.protocol
                    ))));
                }
                let index = usize::try_from(welcome.client).unwrap_or(usize::MAX);
                let reuse = prepared.as_ref().is_some_and(|p| {
                    p.toml == welcome.experiment_toml
                        && p.index == index
                        && p.run_id == welcome.run_id
                });
                if !reuse {
                    let toml = welcome.experiment_toml;
                    let state = opts.state_dir.join(&opts.id);
                    let run = welcome.run_id;
                    let p = tokio::task::block_in_place(|| {
                        prepare(
                            toml,
                            run,
                            index,
                            opts.shard,
                            opts.threads,
                            cache,
                            load,
                            &state,
                        )
                    })
                    .map_err(Failure::Final)?;
                    tracing::info!(
                        client = %opts.id,
                        "joined as client {index}: {} on {} training examples",
                        p.config.data.dataset,
                        p.indices.len()
                    );
                    *prepared = Some(Arc::new(p));
                } else {
                    tracing::info!(client = %opts.id, "joined again as client {index}");
                }
                welcomed = true;
                let p = prepared.as_ref().expect("prepared above");
                let ready = message(client_message::Body::Ready(Ready {
                    num_examples: p.indices.len() as u64,
                    test_examples: p.data.test.len() as u64,
                }));
                if tx.send(ready).await.is_err() {
                    return Err(lost("the session closed".into(), welcomed));
                }
            }
            server_message::Body::Fit(fit) => {
                let Some(p) = prepared.clone() else {
                    return Err(Failure::Final(NetError::Protocol(
                        "a task before Welcome".into(),
                    )));
                };
                let layout = if fit.control {
                    p.layout.with_control()
                } else {
                    p.layout.clone()
                };
                task = Some((Task::Fit(fit), Assembler::new(&layout), p));
            }
            server_message::Body::Evaluate(evaluate) => {
                let Some(p) = prepared.clone() else {
                    return Err(Failure::Final(NetError::Protocol(
                        "a task before Welcome".into(),
                    )));
                };
                task = Some((Task::Evaluate(evaluate), Assembler::new(&p.layout), p));
            }
            server_message::Body::Chunk(chunk) => {
                let Some((_, assembler, _)) = task.as_mut() else {
                    return Err(Failure::Final(NetError::Protocol(
                        "weights outside a task".into(),
                    )));
                };
                assembler.push(&chunk).map_err(|e| {
                    Failure::Final(NetError::Protocol(format!("task weights: {e}")))
                })?;
            }
            server_message::Body::TaskEnd(_) => {
                let Some((header, assembler, p)) = task.take() else {
                    return Err(Failure::Final(NetError::Protocol(
                        "a task end without a task".into(),
                    )));
                };
                let received = assembler.finish_with_control().map_err(|e| {
                    Failure::Final(NetError::Protocol(format!("task weights: {e}")))
                })?;
                let (params, buffers, control) =
                    (received.params, received.buffers, received.control);
                let fit = match header {
                    Task::Fit(fit) => fit,
                    Task::Evaluate(evaluate) => {
                        let threads = opts.threads;
                        let p2 = p.clone();
                        let what = format!("the evaluation of round {}", evaluate.round);
                        let round = usize::try_from(evaluate.round).unwrap_or(usize::MAX);
                        let work = move || evaluate_locally(&p2, round, params, buffers, threads);
                        let counts = match off_the_runtime(&tx, what, work).await? {
                            Ok(counts) => counts,
                            Err(stopped) => return Ok(stopped),
                        };
                        let examples = counts.examples;
                        let answer = evaluation_message(&evaluate, counts);
                        if tx.send(answer).await.is_err() {
                            return Err(lost("the session closed while sending".into(), welcomed));
                        }
                        tracing::info!(
                            client = %opts.id,
                            round = evaluate.round,
                            "evaluation sent ({examples} test examples)"
                        );
                        continue;
                    }
                };
                let round = fit.round;
                let threads = opts.threads;
                let p2 = p.clone();
                let fit2 = fit.clone();
                let what = format!("training in round {round}");
                let control = fit.control.then(|| {
                    // 1 + the round of the control to train with; 0: none.
                    let since = fit
                        .control_since
                        .checked_sub(1)
                        .map(|r| usize::try_from(r).unwrap_or(usize::MAX));
                    (control, since)
                });
                let work = move || train(&p2, &fit2, params, buffers, control, threads);
                let result = match off_the_runtime(&tx, what, work).await? {
                    Ok(result) => result,
                    Err(stopped) => return Ok(stopped),
                };
                let mut messages = vec![message(client_message::Body::Update(UpdateHeader {
                    round,
                    task: fit.task,
                    num_examples: result.num_examples as u64,
                    train_loss: result.train_loss,
                    examples_seen: result.examples_seen as u64,
                }))];
                messages.extend(
                    p.layout
                        .chunks(&result.params, &result.buffers)
                        .into_iter()
                        .map(|c| message(client_message::Body::Chunk(c))),
                );
                messages.push(message(client_message::Body::UpdateEnd(UpdateEnd {})));
                for m in messages {
                    if tx.send(m).await.is_err() {
                        return Err(lost("the session closed while sending".into(), welcomed));
                    }
                }
                tracing::info!(
                    client = %opts.id,
                    round,
                    train_loss = result.train_loss,
                    "update sent ({} examples)",
                    result.num_examples
                );
            }
            server_message::Body::Finished(finished) => {
                tracing::info!(client = %opts.id, "the server ended the run: {}", finished.reason);
                let _ = tx
                    .send(message(client_message::Body::Goodbye(Goodbye {
                        reason: "the run is over".into(),
                    })))
                    .await;
                drop(tx);
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(if finished.complete {
                    Outcome::Complete(finished.reason)
                } else {
                    Outcome::Stopped(finished.reason)
                });
            }
        }
    }
}

/// Load the data and work out which examples this client trains on.
#[allow(clippy::too_many_arguments)]
fn prepare(
    toml: String,
    run_id: String,
    index: usize,
    shard: Option<usize>,
    threads: usize,
    cache: &DataCache,
    load: &DataLoader,
    state: &std::path::Path,
) -> Result<Prepared, NetError> {
    let config = ExperimentConfig::from_toml_str(&toml, "the server's experiment")?;
    config.validate("the server's experiment")?;
    let data = cache.get(&toml, &config, load)?;
    let spec = model_spec(&config, &data.train)?;
    let indices = match shard {
        Some(k) => {
            // The simulation's partition (and data sharing) of this copy of the dataset.
            let start = Model::new(&spec, config.run.seed)?;
            let fed = Federation::with_global(config.clone(), &data, threads, start)?;
            fed.partition.clients.get(k).cloned().ok_or_else(|| {
                NetError::Other(format!(
                    "shard {k} does not exist: the partition has {} clients",
                    fed.partition.clients.len()
                ))
            })?
        }
        None => (0..data.train.len()).collect(),
    };
    if indices.is_empty() {
        return Err(NetError::Other(format!(
            "client {index} has no training examples"
        )));
    }
    let shape = Model::new(&spec, 0)?;
    let layout = Layout::of(&shape);
    let frozen = fedra_fl::federation::frozen_ranges(&shape, &config.model.freeze)?;
    let frozen_statistics =
        fedra_fl::federation::frozen_statistics(&shape, &config.model.freeze_statistics)?;
    let local = if config.model.bn == fedra_nn::BnPolicy::Local {
        let layers = LocalLayers::open(state, &stamp(&toml, &run_id, index), &spec)?;
        Some(std::sync::Mutex::new(layers))
    } else {
        None
    };
    let scaffold = if config.strategy.name == "scaffold" {
        let dir = state.join("scaffold");
        let controls = ClientControls::open(&dir, &controls::stamp(&toml, &run_id, index), &spec)?;
        Some(ScaffoldClient {
            strategy: Scaffold::new(&config.strategy, &config.train, config.partition.clients),
            params: aggregated_params(&shape, &config, &frozen),
            controls: std::sync::Mutex::new(controls),
        })
    } else {
        None
    };
    Ok(Prepared {
        toml,
        run_id,
        index,
        config,
        data,
        indices,
        spec,
        layout,
        frozen,
        frozen_statistics,
        local,
        scaffold,
    })
}

impl ScaffoldClient {
    fn controls_lock(&self) -> std::sync::MutexGuard<'_, ClientControls> {
        self.controls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Prepared {
    fn local_layers(&self) -> Option<std::sync::MutexGuard<'_, LocalLayers>> {
        self.local
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The answer to an evaluation task. Score histograms too large for one message (a test set of
/// very many examples and classes) are sent at half the resolution, then a quarter..., until
/// they fit.
fn evaluation_message(task: &EvaluateTask, mut counts: fedra_nn::EvalCounts) -> ClientMessage {
    let build = |c: &fedra_nn::EvalCounts| {
        message(client_message::Body::Evaluation(Evaluation {
            round: task.round,
            task: task.task,
            num_examples: c.examples,
            loss_sum: c.loss_sum,
            correct: c.correct,
            confusion: c.confusion.clone(),
            score_bins: c.score_histograms.iter().map(|b| b.0).collect(),
            score_counts: c.score_histograms.iter().map(|b| b.1).collect(),
        }))
    };
    let limit = MAX_MESSAGE_BYTES - 64 * 1024;
    let mut answer = build(&counts);
    let mut halvings = 0;
    while prost::Message::encoded_len(&answer) > limit && halvings < 15 {
        halvings += 1;
        counts.coarsen(halvings);
        answer = build(&counts);
    }
    if halvings > 0 {
        tracing::warn!(
            round = task.round,
            "score histograms sent at 1/{} of their resolution to fit one message",
            1u32 << halvings
        );
    }
    answer
}

/// Run a task's `work` (training or evaluation, `what`) on a blocking thread, keeping the
/// session's transport alive meanwhile. On SIGINT/SIGTERM: say goodbye and return the stopped
/// outcome (`Ok(Err(..))`). If the work fails: say why and leave (the server drops a client
/// from the round when no answer comes), a final failure.
async fn off_the_runtime<T: Send + 'static>(
    tx: &mpsc::Sender<ClientMessage>,
    what: String,
    work: impl FnOnce() -> Result<T, NetError> + Send + 'static,
) -> Result<Result<T, Outcome>, Failure> {
    let goodbye = |reason: String| message(client_message::Body::Goodbye(Goodbye { reason }));
    let outcome = tokio::select! {
        done = tokio::task::spawn_blocking(work) => done,
        _ = interrupted() => {
            let _ = tx.send(goodbye("interrupted".into())).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(Err(Outcome::Stopped("interrupted".into())));
        }
    };
    match outcome {
        Ok(Ok(value)) => Ok(Ok(value)),
        Ok(Err(e)) => {
            let reason = format!("{what} failed: {e}");
            let _ = tx.send(goodbye(reason.clone())).await;
            Err(Failure::Final(NetError::Other(reason)))
        }
        Err(e) => Err(Failure::Final(NetError::Other(format!(
            "{what} stopped: {e}"
        )))),
    }
}

/// A task the server sent, whose weights are arriving.
enum Task {
    Fit(FitTask),
    Evaluate(EvaluateTask),
}

/// Evaluate the server's weights on this client's own test data.
fn evaluate_locally(
    p: &Prepared,
    round: usize,
    mut params: Vec<f32>,
    mut buffers: Vec<f32>,
    threads: usize,
) -> Result<fedra_nn::EvalCounts, NetError> {
    if let Some(local) = p.local_layers() {
        // After r rounds: the layers of this client's last training before round r.
        local.overlay(&mut params, &mut buffers, round);
    }
    let mut model = Model::new(&p.spec, 0)?;
    model.params_mut().copy_from_slice(&params);
    model.buffers_mut().copy_from_slice(&buffers);
    Ok(fedra_fl::federation::evaluate_counts(
        &model,
        &p.data.test,
        threads,
    )?)
}

/// One task's local training, with the simulation's client code.
fn train(
    p: &Prepared,
    fit: &FitTask,
    params: Vec<f32>,
    buffers: Vec<f32>,
    control: Option<(Vec<f32>, Option<usize>)>,
    threads: usize,
) -> Result<fedra_fl::FitResult, NetError> {
    let bn = bn_from_name(&fit.bn)
        .ok_or_else(|| NetError::Protocol(format!("unknown BatchNorm policy {:?}", fit.bn)))?;
    // With FedBN, this client's own normalisation layers in place of the server's.
    let (mut own_params, mut own_buffers) = (params.clone(), buffers.clone());
    let round = usize::try_from(fit.round).unwrap_or(usize::MAX);
    if let Some(local) = p.local_layers() {
        local.overlay(&mut own_params, &mut own_buffers, round);
    }
    // SCAFFOLD: the server's control c, and this client's own c_i of the round the server names.
    // A SCAFFOLD task without a control comes before the server's first aggregate: c = 0 and no
    // c_i yet, so no correction, but the step still makes this client's first c_i.
    let steered = control.is_some();
    let scaffold = match (control, p.scaffold.as_ref()) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(NetError::Protocol(
                "a SCAFFOLD control for a run that is not SCAFFOLD".into(),
            ));
        }
        (None, Some(s)) => Some((s, vec![0.0; params.len()], None, Vec::new())),
        (Some((c, since)), Some(s)) => {
            let own = s.controls_lock().since(since);
            Some((s, c, since, own))
        }
    };
    let mut start = Model::new(&p.spec, 0)?;
    start.params_mut().copy_from_slice(&own_params);
    start.buffers_mut().copy_from_slice(&own_buffers);
    let config = FitConfig {
        round,
        run_seed: fit.run_seed,
        local_epochs: fit.local_epochs as usize,
        batch_size: usize::try_from(fit.batch_size).unwrap_or(usize::MAX),
        sgd: SgdConfig {
            lr: fit.lr,
            momentum: fit.momentum,
            weight_decay: fit.weight_decay,
        },
        bn,
        prox_mu: fit.prox_mu,
        control: scaffold.as_ref().filter(|_| steered).map(|(_, c, _, own)| {
            let own = (!own.is_empty()).then_some(own.as_slice());
            Steering::Correction(Arc::new(correction(c, own)))
        }),
        frozen: p.frozen.clone(),
        frozen_statistics: p.frozen_statistics.clone(),
        flip_labels: false,
    };
    let job = FitJob {
        client: p.index,
        indices: &p.indices,
        start,
        config,
    };
    let mut result = run_job(job, &p.data.train, threads)?;
    if let Some((s, c, since, mut own)) = scaffold {
        // The server's control step sees the update after `strategy.clip_update_norm`.
        let mut seen = result.clone();
        if let Some(max_norm) = p.config.strategy.clip_update_norm {
            clip_update(&params, &mut seen.params, &s.params, max_norm);
        }
        s.strategy
            .client_step(round, &c, &params, &seen, &s.params, &mut own)?;
        s.controls_lock().keep(round, since, own)?;
    }
    if let Some(mut local) = p.local_layers() {
        local.keep(
            round,
            &mut result.params,
            &mut result.buffers,
            (&params, &buffers),
            &stamp(&p.toml, &p.run_id, p.index),
        )?;
    }
    Ok(result)
}
