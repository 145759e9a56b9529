//! Errors of the federated layer.

/// What can go wrong while configuring or running a federation.
#[derive(thiserror::Error, Debug)]
pub enum FlError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Nn(#[from] fedra_nn::NnError),
    /// A client's training buffers for `train.batch_size` examples (or all its examples, if
    /// fewer) could not be allocated.
    #[error("client {client}: train.batch_size = {batch_size}: {error}")]
    BatchTooBig {
        client: usize,
        batch_size: usize,
        error: fedra_nn::NnError,
    },
    #[error(transparent)]
    Partition(#[from] fedra_data::partition::PartitionError),
    #[error("client {client} in round {round}: {message}")]
    Client {
        client: usize,
        round: usize,
        message: String,
    },
    #[error(
        "round {round}: client {client} sent a non-finite update (NaN or infinity in `{tensor}`); lower the learning rate or check the data"
    )]
    NonFiniteUpdate {
        round: usize,
        client: usize,
        tensor: String,
    },
    #[error(
        "round {round}: strategy {strategy} produced a non-finite global model (NaN or infinity in `{tensor}`); lower its server learning rate"
    )]
    NonFiniteGlobal {
        round: usize,
        strategy: String,
        tensor: String,
    },
    /// A client that did not deliver a usable result (it vanished, missed the round's deadline
    /// or sent an update the server refused): the round goes on without it.
    #[error("round {round}: client {client} dropped: {reason}")]
    Dropped {
        round: usize,
        client: usize,
        reason: String,
    },
    /// Round `round` (counted from 1) got too few results after every attempt to sample again.
    #[error(
        "round {round}: only {got} of the at least {needed} client results a round needs (deploy.min_fit_clients) after {attempts} attempts"
    )]
    TooFewResults {
        round: usize,
        got: usize,
        needed: usize,
        attempts: usize,
    },
    /// Not one client could be given a task for round `round` (counted from 1, as in
    /// `metrics.csv`): a server waited `deploy.join_timeout_s` for `deploy.min_fit_clients` and
    /// nobody was there. The run stops rather than release a round without training, which
    /// under `[privacy]` would spend budget on noise alone.
    #[error(
        "round {round}: no client is connected to train (waited deploy.join_timeout_s for deploy.min_fit_clients); the last checkpoint stays for --resume"
    )]
    NoClientsAvailable { round: usize },
    #[error("round {round}: no client results to aggregate")]
    NoResults { round: usize },
    #[error("round {round}: client {client} sent {got} values, the model has {expected}")]
    UpdateShape {
        round: usize,
        client: usize,
        expected: usize,
        got: usize,
    },
    #[error("{0}")]
    State(String),
}
