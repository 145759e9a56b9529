//! The `fedra` command line.

mod charts;
mod cmd_bench;
mod cmd_certs;
mod cmd_data;
mod cmd_join;
mod cmd_partition;
mod cmd_report;
mod cmd_run;
mod cmd_serve;
mod paper;
mod plot;

use clap::{Parser, Subcommand};

/// fedra: federated learning on non-IID data.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmark fedra's training engine (samples/s, GFLOP/s, GEMM peak, workspace memory).
    Bench(cmd_bench::BenchArgs),
    /// Inspect or download a dataset (MNIST, CIFAR-10, Speech Commands).
    Data(cmd_data::DataArgs),
    /// Split a training set over clients with a scheme; print the client x class table with
    /// sizes and EMD, and optionally write it as JSON and draw it as a heat-map.
    Partition(cmd_partition::PartitionArgs),
    /// Run experiments (TOML files, sweeps expanded): federated rounds, metrics, checkpoints.
    Run(cmd_run::RunArgs),
    /// Tables and figures from finished runs, printed next to the reference study's numbers.
    Report(cmd_report::ReportArgs),
    /// Run an experiment as the server of a real federation: clients on other machines (or
    /// processes) join over gRPC with TLS and train on their own data.
    Serve(cmd_serve::ServeArgs),
    /// Take part in a federation as one client, training on this machine's data.
    Join(cmd_join::JoinArgs),
    /// Write a test federation's certificates: a CA, the server's, one per client id.
    Certs(cmd_certs::CertsArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => cmd_bench::run(args),
        Command::Data(args) => cmd_data::run(args),
        Command::Partition(args) => cmd_partition::run(args),
        Command::Run(args) => cmd_run::run(args),
        Command::Report(args) => cmd_report::run(args),
        Command::Serve(args) => cmd_serve::run(args),
        Command::Join(args) => cmd_join::run(args),
        Command::Certs(args) => cmd_certs::run(args),
    }
}
