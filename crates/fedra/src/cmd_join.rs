//! `fedra join`: take part in a federation as one client, training on this machine's data.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use fedra_fl::ExperimentConfig;
use fedra_net::client::{JoinOptions, Outcome, join, join_swarm};

#[derive(clap::Args)]
pub struct JoinArgs {
    /// The server's HOST:PORT.
    #[arg(long)]
    server: String,
    /// The name the server's certificate must carry (default: HOST of --server).
    #[arg(long)]
    server_name: Option<String>,
    /// This client's id; its certificate and key are CERTS/ID.pem and CERTS/ID.key.
    #[arg(long)]
    id: String,
    /// Folder holding ca.pem (the federation's CA) and this client's certificate and key.
    #[arg(long, required_unless_present = "insecure")]
    certs: Option<PathBuf>,
    /// Connect without TLS, to a server started with --insecure on this machine: accepted only
    /// when the server's address is loopback (127.0.0.1, ::1, localhost). The client names
    /// itself by --id, unauthenticated; for debugging, never between machines.
    #[arg(long, conflicts_with = "certs")]
    insecure: bool,
    /// This machine's copy of the dataset the experiment names (MNIST without it uses the
    /// embedded subset). The data never leaves this machine.
    #[arg(long, env = "FEDRA_DATA")]
    data_dir: Option<PathBuf>,
    /// Act as client K of the experiment's partition of the local dataset (a one-machine
    /// demonstration, or a comparison with `fedra run`): train on exactly what simulation client
    /// K trains on. Without it the client trains on all of its local training data.
    #[arg(long)]
    shard: Option<usize>,
    /// Run N clients in this process (a load test): ids ID0 .. ID{N-1} (certificates
    /// CERTS/IDk.pem), client k acting as --shard k; the data is loaded once for all.
    #[arg(long, conflicts_with = "shard")]
    swarm: Option<usize>,
    /// Compress the updates this client sends with gzip (tasks from a server started with
    /// --compress arrive compressed either way).
    #[arg(long)]
    compress: bool,
    /// Where this client keeps what outlives it, in STATE_DIR/ID/, read back when it is
    /// restarted for the same run of the same experiment: with `model.bn = "local"` (FedBN) its
    /// own normalisation layers (its last two trainings; they never leave this machine), with
    /// SCAFFOLD its control variate (in scaffold/, by round; kept here to spare the server one
    /// model-sized vector per client, not as a secret: the server could recompute it).
    #[arg(long, default_value = "fedra-state")]
    state_dir: PathBuf,
    /// Threads for local training (default 1).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Longest wait between reconnection attempts, in seconds.
    #[arg(long, default_value_t = 30.0)]
    max_backoff_s: f64,
    /// Connect without presenting the client certificate (the server refuses such a client;
    /// for trying that out).
    #[arg(long, hide = true)]
    no_client_certificate: bool,
}

/// The longest `--max-backoff-s`: a day, in seconds.
const MAX_BACKOFF_S: f64 = 86_400.0;

pub fn run(args: JoinArgs) -> anyhow::Result<()> {
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    // Bounded so that doubling a wait and adding it to the clock stay representable.
    if !(args.max_backoff_s.is_finite()
        && args.max_backoff_s > 0.0
        && args.max_backoff_s <= MAX_BACKOFF_S)
    {
        bail!(
            "--max-backoff-s must be a positive number of seconds up to {MAX_BACKOFF_S} (a day), \
             got {}",
            args.max_backoff_s
        );
    }
    let opts = JoinOptions {
        server: args.server.clone(),
        server_name: args.server_name.clone(),
        id: args.id.clone(),
        certs: args.certs.clone().unwrap_or_default(),
        shard: args.shard,
        threads: args.threads,
        present_certificate: !args.no_client_certificate,
        max_backoff: Duration::from_secs_f64(args.max_backoff_s),
        insecure: args.insecure,
        compress: args.compress,
        state_dir: args.state_dir.clone(),
    };
    let data_dir = args.data_dir.clone();
    let load = move |config: &ExperimentConfig| {
        let mut config = config.clone();
        // The server's data folder means nothing here: this machine's is --data-dir.
        config.data.data_dir = data_dir.clone();
        crate::cmd_run::load_data(&config).map_err(|e| format!("{e:#}"))
    };
    if let Some(n) = args.swarm {
        if n == 0 {
            bail!("--swarm must be at least 1");
        }
        let outcomes = join_swarm(&opts, n, std::sync::Arc::new(load))?;
        let complete = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Complete(_)))
            .count();
        eprintln!(
            "{}0..{}{}: {complete} of {n} clients saw the run complete",
            args.id,
            args.id,
            n - 1
        );
        return Ok(());
    }
    match join(&opts, &load)? {
        Outcome::Complete(reason) => eprintln!("{}: run over ({reason})", args.id),
        Outcome::Stopped(reason) => eprintln!("{}: stopped ({reason})", args.id),
    }
    Ok(())
}
