//! SCAFFOLD (Karimireddy et al. 2020): control variates that correct each client's drift
//! towards its own data, kept by the server in-process and by each client over a network.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use fedra_nn::Model;

use super::{AggregationScope, FedNova, Strategy, check_results, weighted_mean};
use crate::client::{FitResult, Steering};
use crate::config::{StrategyConfig, TrainConfig};
use crate::error::FlError;

/// SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
/// Learning"), option II. Each client i carries a control variate c_i and the server one, c; a
/// client adds c - c_i to every gradient, which steers its local steps towards the global
/// objective rather than its own (the client drift label skew causes). After client i takes K_i
/// local steps at learning rate lr from x to y_i, its control becomes
/// `c_i+ = c_i - c + (x - y_i) / (K_i lr)`; the server moves x by `server_lr` times the
/// sample-weighted mean of the y_i - x (with `server_lr` = 1: FedAvg's mean, bit for bit) and c
/// by `|S| / N` times the mean of the c_i+ - c_i over the round's |S| of the N clients. Every
/// control starts at zero, so the first round is FedAvg's. In-process the server keeps the clients'
/// controls (one model-sized vector per client that has trained); over a network
/// ([`Strategy::keep_controls_on_clients`]) each client keeps its own and the server sends c,
/// computing the change of c from each update ([`Scaffold::client_step`] is the client's
/// side, with the same arithmetic). Either way the server counts K_i itself, as FedNova does;
/// with momentum on the clients the formula is applied as it stands. Buffers are averaged as
/// FedAvg averages them.
pub struct Scaffold {
    pub server_lr: f32,
    /// Counts clients' local steps.
    pub steps: FedNova,
    /// The clients' training settings (their learning rate schedule).
    pub train: TrainConfig,
    /// N, every client of the federation.
    pub clients: usize,
    /// The server's control c (empty until the first aggregate).
    pub c: Vec<f32>,
    /// Each client's control c_i (absent: zero), when the server keeps them (in-process).
    pub client_c: BTreeMap<usize, Vec<f32>>,
    /// The clients keep their own c_i ([`Strategy::keep_controls_on_clients`]).
    pub on_clients: bool,
    /// Then: the last round whose aggregate took each client's result, the round of the c_i
    /// the client must train with next.
    pub aggregated_in: BTreeMap<usize, usize>,
}

impl Scaffold {
    /// SCAFFOLD with `strategy.server_lr` for `clients` clients trained by `train`, every control
    /// zero.
    pub fn new(config: &StrategyConfig, train: &TrainConfig, clients: usize) -> Scaffold {
        Scaffold {
            server_lr: config.server_lr.unwrap_or(1.0),
            steps: FedNova {
                local_epochs: train.local_epochs,
                batch_size: train.batch_size,
                momentum: train.momentum,
            },
            train: train.clone(),
            clients,
            c: Vec::new(),
            client_c: BTreeMap::new(),
            on_clients: false,
            aggregated_in: BTreeMap::new(),
        }
    }

    /// The learning rate of `round`, which the control step divides by.
    fn lr(&self, round: usize) -> Result<f64, FlError> {
        let lr = f64::from(self.train.lr_at(round));
        if !(lr.is_finite() && lr > 0.0) {
            return Err(FlError::State(format!(
                "strategy scaffold: the learning rate of round {round} is {lr}; the controls \
                 divide by it (a train.lr_decay that reaches 0?)"
            )));
        }
        Ok(lr)
    }

    /// A client's side of a round over a network: its control `own` (c_i, zero if empty) after
    /// training from the global weights `x` of `round` to `result` with the server's control
    /// `c`, over the aggregated parameters `params`; the same arithmetic as the server's
    /// in-process [`Strategy::aggregate`], so the bits agree.
    pub fn client_step(
        &self,
        round: usize,
        c: &[f32],
        x: &[f32],
        result: &FitResult,
        params: &[Range<usize>],
        own: &mut Vec<f32>,
    ) -> Result<(), FlError> {
        let n = x.len();
        if c.len() != n || result.params.len() != n {
            return Err(FlError::State(format!(
                "strategy scaffold: a control of {} values for a model of {n} parameters",
                c.len()
            )));
        }
        if own.is_empty() {
            own.resize(n, 0.0);
        }
        if own.len() != n {
            return Err(FlError::State(format!(
                "strategy scaffold: this client's control has {} values, the model {n}",
                own.len()
            )));
        }
        let lr = self.lr(round)?;
        let steps = self
            .steps
            .steps(result.num_examples, result.examples_seen)
            .max(1) as f64;
        control_step(c, x, &result.params, steps * lr, params, Some(own), None);
        Ok(())
    }
}

/// SCAFFOLD's correction c - c_i (c itself for a client without a control yet).
pub fn correction(c: &[f32], own: Option<&[f32]>) -> Vec<f32> {
    match own {
        Some(own) => c.iter().zip(own).map(|(c, o)| c - o).collect(),
        None => c.to_vec(),
    }
}

/// Option II's control change of one client, over `params`: after K local steps at `lr` from x
/// to y, delta = -c + (x - y) / (K lr) (`k_lr` = K lr), added to `own` (c_i) and to `sum`.
fn control_step(
    c: &[f32],
    x: &[f32],
    y: &[f32],
    k_lr: f64,
    params: &[Range<usize>],
    mut own: Option<&mut [f32]>,
    mut sum: Option<&mut [f64]>,
) {
    for i in params.iter().flat_map(|range| range.clone()) {
        let delta = -f64::from(c[i]) + (f64::from(x[i]) - f64::from(y[i])) / k_lr;
        if let Some(own) = own.as_deref_mut() {
            own[i] = (f64::from(own[i]) + delta) as f32;
        }
        if let Some(sum) = sum.as_deref_mut() {
            sum[i] += delta;
        }
    }
}

impl Strategy for Scaffold {
    fn name(&self) -> &'static str {
        "scaffold"
    }

    fn has_control(&self, _client: usize) -> bool {
        !self.c.is_empty()
    }

    fn control(&self, client: usize) -> Option<Steering> {
        if self.c.is_empty() {
            return None;
        }
        if self.on_clients {
            return Some(Steering::ServerControl {
                c: Arc::new(self.c.clone()),
                since: self.aggregated_in.get(&client).copied(),
            });
        }
        Some(Steering::Correction(Arc::new(correction(
            &self.c,
            self.client_c.get(&client).map(Vec::as_slice),
        ))))
    }

    fn keep_controls_on_clients(&mut self, on_clients: bool) -> Result<(), FlError> {
        if on_clients && !self.client_c.is_empty() {
            return Err(FlError::State(
                "strategy scaffold: this checkpoint holds the clients' controls, made in-process; \
                 over a network the clients keep their own, so it can only be continued by \
                 `fedra run --resume`"
                    .into(),
            ));
        }
        if !on_clients && !self.aggregated_in.is_empty() {
            return Err(FlError::State(
                "strategy scaffold: this checkpoint comes from a server whose clients keep their \
                 own controls; it can only be continued by `fedra serve --resume`"
                    .into(),
            ));
        }
        self.on_clients = on_clients;
        Ok(())
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        check_results(round, global, results)?;
        let x = global.params().to_vec();
        if self.c.is_empty() {
            self.c = vec![0.0; x.len()];
        }
        if self.c.len() != x.len() {
            return Err(FlError::State(format!(
                "strategy scaffold: a control of {} values for a model of {} parameters",
                self.c.len(),
                x.len()
            )));
        }
        let lr = self.lr(round)?;
        let mut c_step = vec![0f64; x.len()];
        for r in results {
            let steps = self.steps.steps(r.num_examples, r.examples_seen).max(1) as f64;
            let own = if self.on_clients {
                self.aggregated_in.insert(r.client, round);
                None
            } else {
                Some(
                    self.client_c
                        .entry(r.client)
                        .or_insert_with(|| vec![0.0; x.len()])
                        .as_mut_slice(),
                )
            };
            control_step(
                &self.c,
                &x,
                &r.params,
                steps * lr,
                &scope.params,
                own,
                Some(&mut c_step),
            );
        }
        let share = results.len() as f64 / self.clients.max(1) as f64;
        let n = results.len().max(1) as f64;
        for i in scope.params.iter().flat_map(|range| range.clone()) {
            self.c[i] = (f64::from(self.c[i]) + share * c_step[i] / n) as f32;
        }
        if let Some(i) = self.c.iter().position(|v| !v.is_finite()) {
            return Err(FlError::State(format!(
                "strategy scaffold: the server control became {} at parameter {i} in round \
                 {round}",
                self.c[i]
            )));
        }
        weighted_mean(results, |r| &r.params, &scope.params, global.params_mut());
        if self.server_lr != 1.0 {
            let eta = f64::from(self.server_lr);
            let w = global.params_mut();
            for i in scope.params.iter().flat_map(|range| range.clone()) {
                w[i] = (f64::from(x[i]) + eta * (f64::from(w[i]) - f64::from(x[i]))) as f32;
            }
        }
        weighted_mean(
            results,
            |r| &r.buffers,
            &scope.buffers,
            global.buffers_mut(),
        );
        Ok(())
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        if self.c.is_empty() {
            return Vec::new();
        }
        let mut state = vec![("scaffold.c".to_string(), self.c.clone())];
        for (k, c) in &self.client_c {
            state.push((format!("scaffold.c.{k}"), c.clone()));
        }
        // Round numbers as f32 are exact below 2^24 rounds.
        for (k, &round) in &self.aggregated_in {
            state.push((format!("scaffold.aggregated_in.{k}"), vec![round as f32]));
        }
        state
    }

    fn restore(
        &mut self,
        state: Vec<(String, Vec<f32>)>,
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        self.c.clear();
        self.client_c.clear();
        self.aggregated_in.clear();
        for (name, values) in state {
            if name == "scaffold.c" {
                self.c = values;
            } else if let Some(k) = name
                .strip_prefix("scaffold.aggregated_in.")
                .and_then(|k| k.parse::<usize>().ok())
            {
                match values[..] {
                    [round] if round >= 0.0 && round.fract() == 0.0 && round < 16_777_216.0 => {
                        self.aggregated_in.insert(k, round as usize);
                    }
                    _ => {
                        return Err(FlError::State(format!(
                            "strategy scaffold: checkpoint tensor {name:?} is not a round number"
                        )));
                    }
                }
            } else if let Some(k) = name
                .strip_prefix("scaffold.c.")
                .and_then(|k| k.parse::<usize>().ok())
            {
                self.client_c.insert(k, values);
            } else {
                return Err(FlError::State(format!(
                    "strategy scaffold: unexpected checkpoint tensor {name:?}"
                )));
            }
        }
        let len = self.c.len();
        let needed = scope.params.iter().map(|r| r.end).max().unwrap_or(0);
        if len != 0 && len < needed {
            return Err(FlError::State(format!(
                "strategy scaffold: the checkpoint's control has {len} values, the model {needed}"
            )));
        }
        if len == 0 && !(self.client_c.is_empty() && self.aggregated_in.is_empty()) {
            return Err(FlError::State(
                "strategy scaffold: the checkpoint has client controls but no server control"
                    .into(),
            ));
        }
        if let Some((k, _)) = self.client_c.iter().find(|(_, c)| c.len() != len) {
            return Err(FlError::State(format!(
                "strategy scaffold: client {k}'s control does not match the server's size {len}"
            )));
        }
        Ok(())
    }
}
