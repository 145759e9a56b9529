//! `fedra serve`: run an experiment's round loop with remote clients (`fedra join`), writing
//! the same run folder as `fedra run`, with a checkpoint after every round.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context, bail};

use fedra_fl::ExperimentConfig;
use fedra_fl::config::Evaluation;
use fedra_fl::federation::model_spec;
use fedra_fl::privacy::NoiseSource;
use fedra_fl::sweep::expand;
use fedra_net::pki;
use fedra_net::server::{ServerSettings, start};
use fedra_net::wire::Layout;
use fedra_nn::Model;
use fedra_sim::{Run, RunFolder};

use crate::cmd_run::{describe, load_data, print_summary};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Experiment file (TOML); its optional [deploy] table says how many clients to wait for,
    /// how long a round may take and who may join.
    #[arg(required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0: a free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Folder holding ca.pem, server.pem and server.key (`fedra certs` writes them). With
    /// --local-clients and no --certs, certificates are made in RUN_DIR/certs.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Run folder: config.toml, metrics.csv, summary.json, final.safetensors, checkpoint/.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint. Clients of a server that was killed
    /// reconnect by themselves; a server stopped with SIGINT/SIGTERM told its clients the run
    /// was over, so they must be started again.
    #[arg(long)]
    resume: bool,
    /// Test data for evaluating the global model on the server (and the dataset's training
    /// labels for the partition the --shard clients use). Without it, MNIST uses the embedded
    /// subset; with `deploy.evaluate = "clients"` the server needs no data at all (the clients
    /// evaluate on their own test data).
    #[arg(long, env = "FEDRA_DATA")]
    data_dir: Option<PathBuf>,
    /// Apply the experiment's `[profile.NAME]` overrides.
    #[arg(long)]
    profile: Option<String>,
    /// Threads for the server's own work (evaluation, the SGD twin).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Serve without TLS: accepted only on a loopback --listen address; clients then name
    /// themselves (unauthenticated) and must join with --insecure. For debugging on one machine.
    #[arg(long, conflicts_with = "certs")]
    insecure: bool,
    /// Compress what the server sends (global weights) with gzip; with --local-clients, they
    /// compress their updates too. Clients always accept it. Raw f32 weights shrink little
    /// (see the README's network costs); the log says what crossed the wire.
    #[arg(long)]
    compress: bool,
    /// Also start N `fedra join --shard K` processes against this server on 127.0.0.1: a real
    /// multi-process federation on one machine.
    #[arg(long)]
    local_clients: Option<usize>,
}

fn experiment(args: &ServeArgs) -> anyhow::Result<ExperimentConfig> {
    let mut config = if args.resume {
        ExperimentConfig::from_file(&args.out.join("config.toml"))
            .with_context(|| format!("--resume: no run to resume in {}", args.out.display()))?
    } else {
        let path = args.config.as_ref().expect("clap requires it");
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read experiment {}", path.display()))?;
        let mut cells = expand(&text, &path.display().to_string(), args.profile.as_deref())?;
        if cells.len() != 1 {
            bail!(
                "{} expands to {} runs; `fedra serve` runs one experiment (use --profile, or a \
                 file without [sweep])",
                path.display(),
                cells.len()
            );
        }
        cells.pop().expect("one cell").config
    };
    if args.data_dir.is_some() {
        config.data.data_dir = args.data_dir.clone();
    }
    config.validate("experiment")?;
    if let Some(privacy) = config.privacy.as_mut() {
        match privacy.noise {
            // The clients receive the experiment, seed included: noise derived from it would be
            // theirs to subtract.
            None => privacy.noise = Some(NoiseSource::Secret),
            Some(NoiseSource::Seeded) => eprintln!(
                "warning: privacy.noise = \"seeded\": the sampling and the noise follow run.seed, \
                 which every client receives, so they protect nothing; use it to check a \
                 deployment against `fedra run`, never with data that needs the privacy"
            ),
            Some(NoiseSource::Secret) => {}
        }
        if config.deploy.as_ref().map(|d| d.evaluate) == Some(Evaluation::Clients) {
            bail!(
                "experiment: [privacy] with deploy.evaluate = \"clients\": each round's noised model \
                 would go to the clients before the round's checkpoint is written, and a server \
                 restarted then would run that round again with the same noise over possibly \
                 other clients, so that the difference of the two models carries no noise; \
                 evaluate on the server"
            );
        }
    }
    if config.attack.is_some() {
        bail!(
            "experiment: [attack] makes simulated clients misbehave to measure an aggregator; a \
             server does not tell real clients to attack (use `fedra run`)"
        );
    }
    let evaluate = config
        .deploy
        .as_ref()
        .map(|d| d.evaluate)
        .unwrap_or_default();
    if config.model.bn == fedra_nn::BnPolicy::Local && evaluate != Evaluation::Clients {
        bail!(
            "experiment: model.bn = \"local\" (FedBN) keeps each client's normalisation layers on \
             its own machine, so the server cannot evaluate the models they make: set \
             deploy.evaluate = \"clients\" (each client evaluates the global weights with its own \
             layers on its own test data)"
        );
    }
    let d = &config.data;
    if d.dataset == fedra_data::DatasetName::ImageFolder
        && (d.classes.is_none() || d.channels.is_none() || d.image_size.is_none())
    {
        bail!(
            "experiment: a federation of image folders must set data.classes, data.channels and \
             data.image_size, so that every site numbers the classes and shapes its images alike \
             (a site lacking a class would otherwise shift the labels of the others)"
        );
    }
    Ok(config)
}

/// Start `n` clients on this machine, each acting as its simulation shard.
fn local_clients(
    n: usize,
    addr: SocketAddr,
    certs: Option<&Path>,
    data_dir: Option<&Path>,
    compress: bool,
    state_dir: &Path,
) -> anyhow::Result<Vec<Child>> {
    let exe = std::env::current_exe().context("cannot find the fedra executable")?;
    let mut children = Vec::new();
    for k in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(["join", "--server"])
            .arg(format!("127.0.0.1:{}", addr.port()))
            .args(["--server-name", "localhost", "--id"])
            .arg(format!("c{k}"))
            .arg("--shard")
            .arg(k.to_string());
        match certs {
            Some(certs) => cmd.arg("--certs").arg(certs),
            None => cmd.arg("--insecure"),
        };
        if let Some(dir) = data_dir {
            cmd.arg("--data-dir").arg(dir);
        }
        if compress {
            cmd.arg("--compress");
        }
        cmd.arg("--state-dir").arg(state_dir);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        children.push(
            cmd.spawn()
                .with_context(|| format!("cannot start local client c{k}"))?,
        );
    }
    Ok(children)
}

/// The id of the run in `out` (`RUN_DIR/run-id`): made afresh for a new run, read back on
/// `--resume` (and made for a run folder from before run ids).
fn run_id(out: &Path, resume: bool) -> anyhow::Result<String> {
    let path = out.join("run-id");
    if resume && let Ok(text) = std::fs::read_to_string(&path) {
        let id = text.trim().to_string();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    let id = format!("{:016x}", rand::random::<u64>());
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let config = experiment(&args)?;
    let folder = Run::inspect(&args.out, &config)?;
    match (&folder, args.resume) {
        (RunFolder::Finished(_), _) => bail!("{} holds a finished run", args.out.display()),
        (RunFolder::Checkpointed, false) => bail!(
            "{} holds an interrupted run: add --resume to continue it",
            args.out.display()
        ),
        (RunFolder::Empty | RunFolder::Unfinished, true) => bail!(
            "--resume: {} holds no checkpoint to resume from",
            args.out.display()
        ),
        _ => {}
    }
    if args.insecure && !args.listen.ip().is_loopback() {
        bail!(
            "--insecure serves without TLS, so only on a loopback address (--listen 127.0.0.1:PORT \
             or [::1]:PORT), not {}",
            args.listen
        );
    }
    let certs = match (&args.certs, args.local_clients) {
        _ if args.insecure => None,
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(n)) => {
            let dir = args.out.join("certs");
            if !dir.join("ca.pem").exists() {
                let ids: Vec<String> = (0..n).map(|k| format!("c{k}")).collect();
                pki::generate(&dir, &["localhost".into(), "127.0.0.1".into()], &ids)?;
            }
            Some(dir)
        }
        (None, None) => bail!(
            "--certs is required (or --local-clients for a one-machine try, or --insecure on \
             loopback)"
        ),
    };
    let tls = certs.as_deref().map(pki::server_tls).transpose()?;
    let clients_file = args.out.join("clients.toml");
    if !args.resume && clients_file.exists() {
        // A fresh run starts with no client holding an index.
        std::fs::remove_file(&clients_file)
            .with_context(|| format!("cannot remove {}", clients_file.display()))?;
    }
    let run_id = run_id(&args.out, args.resume)?;
    let evaluate = config
        .deploy
        .as_ref()
        .map(|d| d.evaluate)
        .unwrap_or_default();
    let data = if evaluate == Evaluation::Clients && config.data.data_dir.is_none() {
        // The clients hold every example: the server needs only the dataset's shape and classes.
        let data = fedra_data::describe(config.data.dataset, &config.data.load_options())
            .with_context(|| format!("describing {}", config.data.dataset))?;
        eprintln!(
            "no data on the server: the clients evaluate the global model on their own test data"
        );
        data
    } else {
        load_data(&config)?
    };
    let selected = config.data.select(data.clone())?;
    let spec = model_spec(&config, &selected.train)?;
    let layout = Layout::of(&Model::new(&spec, 0)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let settings = ServerSettings {
        experiment_toml: config.to_toml_string(),
        clients: config.partition.clients,
        deploy: config.deploy.clone().unwrap_or_default(),
        layout,
        classes: spec.classes,
        threads: args.threads,
        clients_file: Some(clients_file),
        run_id,
        compress: args.compress,
    };
    let (mut server, executor) = start(runtime.handle(), args.listen, tls, settings)?;
    let announcer = server.announcer();
    runtime.spawn(async move {
        fedra_net::client::interrupted().await;
        tracing::warn!(
            "stopping on a signal: the last completed round's checkpoint stays for --resume"
        );
        announcer
            .announce(false, "the server stopped; it may be resumed")
            .await;
        std::process::exit(0);
    });
    let threads = args.threads;
    let data_dir = config.data.data_dir.clone();
    let mut run = if args.resume {
        let run = Run::resume_with(&args.out, data, threads, Box::new(executor))?;
        eprintln!(
            "resuming {} after round {}",
            args.out.display(),
            run.federation.rounds_done
        );
        run
    } else {
        eprintln!(
            "{}: {} clients, scheme {}, {} rounds -> {}",
            config.data.dataset,
            config.partition.clients,
            config.partition.scheme,
            config.train.rounds,
            args.out.display()
        );
        Run::start_with(config, data, &args.out, threads, Box::new(executor))?
    };
    run.set_checkpoint_every(1);
    // Only a run that could be set up (partition, initial model) admits clients.
    server.serve();
    match &certs {
        Some(certs) => println!(
            "listening on {} (TLS, client certificates from {})",
            server.addr,
            certs.display()
        ),
        None => println!(
            "listening on {} WITHOUT TLS (--insecure): clients are not authenticated",
            server.addr
        ),
    }
    let mut children = match args.local_clients {
        Some(n) => local_clients(
            n,
            server.addr,
            certs.as_deref(),
            data_dir.as_deref(),
            args.compress,
            &args.out.join("client-state"),
        )?,
        None => Vec::new(),
    };
    let outcome = (|| -> anyhow::Result<fedra_sim::Summary> {
        while !run.federation.finished() {
            if let Some(row) = run.step()? {
                println!("{}", describe(&row));
            }
        }
        Ok(run.finish()?)
    })();
    match outcome {
        Ok(summary) => {
            server.finish(true, "run complete");
            print_summary(&args.out.display().to_string(), &summary);
            for child in &mut children {
                let _ = child.wait();
            }
            Ok(())
        }
        Err(e) => {
            server.finish(false, &format!("the server failed: {e:#}"));
            for child in &mut children {
                let _ = child.wait();
            }
            Err(e)
        }
    }
}
