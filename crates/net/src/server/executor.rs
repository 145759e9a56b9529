//! The executor's side of a round: sending each client its task, waiting for the answers up to
//! the round's timeout, and turning them into the round loop's results, evaluations and drop-outs.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use prost::Message;

use fedra_data::Dataset;
use fedra_fl::config::Evaluation as EvaluateOn;
use fedra_fl::federation::MAX_ROUND_ATTEMPTS;
use fedra_fl::{CENTRAL_ID, Executor, FitJob, FitResult, FlError, Steering, run_job};
use fedra_nn::{EvalCounts, Model};

use super::{Answer, Event, InFlight, NetExecutor, Outbox, TaskKind, bn_name, message};
use crate::proto::{EvaluateTask, FitTask, ServerMessage, TaskEnd, server_message};
use crate::wire::Layout;

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
