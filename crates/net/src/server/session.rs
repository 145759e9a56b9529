//! Reading one client's session: the messages a client sends, checked one by one (their order,
//! the update's names, shapes and values through a [`wire::Assembler`](crate::wire::Assembler)),
//! turned into the [`Step`]s the service acts on. Every byte here comes from the network, so the
//! reader refuses with a reason instead of panicking; the server's tests fuzz it.

use prost::Message;
use tonic::Streaming;

use fedra_fl::FitResult;
use fedra_nn::EvalCounts;

use super::{Answer, Event, Shared, TaskKind};
use crate::proto::{ClientMessage, client_message};
use crate::wire::{Assembler, Layout};

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
pub(super) async fn read_session(
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
