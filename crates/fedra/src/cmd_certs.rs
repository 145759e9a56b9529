//! `fedra certs`: a test federation's certificates (a CA, the server, one per client).

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct CertsArgs {
    /// Folder to write ca.pem, ca.key, server.pem, server.key and ID.pem / ID.key per client.
    #[arg(long)]
    out: PathBuf,
    /// A name clients dial the server by (DNS name or IP address); repeat for several. All go
    /// into the server certificate. `localhost` is enough on one machine.
    #[arg(long = "server-name", required = true)]
    server_names: Vec<String>,
    /// Client ids, comma- or space-separated (e.g. `hospital-a,hospital-b`, or `c{0..199}` as
    /// the shell expands it); each id is written into its certificate, which is how the server
    /// knows who connects.
    #[arg(long, value_delimiter = ',', num_args = 1.., required = true)]
    clients: Vec<String>,
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let files = fedra_net::pki::generate(&args.out, &args.server_names, &args.clients)
        .with_context(|| format!("writing certificates into {}", args.out.display()))?;
    let shown = if args.clients.len() <= 8 {
        args.clients.join(", ")
    } else {
        format!(
            "{} ... {}",
            args.clients[..3].join(", "),
            args.clients[args.clients.len() - 1]
        )
    };
    println!(
        "wrote {} files into {}: CA (ca.pem; keep ca.key offline), server certificate for {}, {} client certificates ({shown})",
        files.len(),
        args.out.display(),
        args.server_names.join(", "),
        args.clients.len(),
    );
    println!(
        "give the server ca.pem, server.pem, server.key; give client ID ca.pem, ID.pem and ID.key"
    );
    Ok(())
}
