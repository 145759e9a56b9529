//! One session with the server, from connecting to its end: Hello and Welcome, then each task
//! as its weights arrive in chunks, the work run off the async runtime (keeping the transport
//! alive) and the answer streamed back.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::Endpoint;

use super::work::{DataCache, Prepared, evaluate_locally, prepare, train};
use super::{
    DataLoader, Failure, JoinOptions, Outcome, error_chain, from_status, interrupted,
    is_certificate_failure, message,
};
use crate::error::NetError;
use crate::proto::federation_client::FederationClient;
use crate::proto::{
    ClientMessage, EvaluateTask, Evaluation, FitTask, Goodbye, Hello, Ready, UpdateEnd,
    UpdateHeader, client_message, server_message,
};
use crate::server::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::wire::Assembler;
use crate::{MAX_MESSAGE_BYTES, PROTOCOL, pki};

/// One session, from connecting to its end.
pub(super) async fn session(
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
