//! The joining client (`fedra join`): connect with its certificate, learn the experiment, load
//! its own data, then train every task the server sends with the simulation's client code and
//! return the update. Network errors and server restarts are retried with exponential backoff
//! and jitter; a refusal of the client's identity (certificate, allow-list) or a server whose
//! certificate does not verify is final.
//!
//! Here: joining, reconnecting with backoff and classifying failures; one session's message loop
//! in `session`; what a client prepares once per experiment and the training and evaluation it
//! runs on its own data in `work`.

mod session;
mod work;

use work::{DataCache, Prepared};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tonic::Code;

use fedra_data::TrainTest;
use fedra_fl::ExperimentConfig;

use crate::error::NetError;
use crate::pki;
use crate::proto::{ClientMessage, client_message};

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
        match session::session(opts, &mut prepared, cache, load).await {
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
