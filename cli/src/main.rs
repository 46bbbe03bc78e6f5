//! `weftctl`: is my mesh healthy, and what config does each proxy hold?
//!
//! Every query talks to a control plane's `weft.admin.v1` API over its TLS port (`--cp`,
//! `WEFT_CP`) as an operator (`--credentials`, `WEFT_CREDENTIALS`) and prints a table (the
//! default on a terminal), JSON or YAML (`-o`). JSON and YAML field names are stable: scripts
//! may rely on them.

mod demo;
mod install;
mod output;
mod query;

use std::net::SocketAddr;

use clap::{Parser, Subcommand};

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON (stable field names).
    Json,
    /// YAML (the same fields as JSON).
    Yaml,
}

#[derive(Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Is my mesh healthy, and what config does each proxy hold?"
)]
struct Cli {
    /// The control plane's TLS gRPC port, `HOST:PORT` (e.g. through
    /// `kubectl -n weft-system port-forward svc/weft-control-plane 15012`).
    #[arg(
        long,
        global = true,
        env = "WEFT_CP",
        default_value = "127.0.0.1:15012"
    )]
    cp: String,
    /// Operator credentials (certificate, key and mesh roots in one PEM file, made by
    /// `weft-control-plane operator issue`, `weftctl install` or `weftctl demo`); default
    /// `~/.config/weft/credentials.pem`.
    #[arg(long, global = true, env = "WEFT_CREDENTIALS")]
    credentials: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Format,
    /// Log line format on stderr (filter: `WEFT_LOG`, default `warn`): `text` (colour only on
    /// a terminal) or `json`.
    #[arg(long, global = true, env = "WEFT_LOG_FORMAT", default_value = "text")]
    log_format: weft_proto::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One row per connected proxy, from every control-plane replica (the REPLICA column says
    /// which holds it): per xDS type SYNCED / STALE / NACKED / NOT SENT (exit 1 on a NACK or
    /// an unreachable replica).
    Status,
    /// The services in the catalog, with endpoint counts and splits.
    Services,
    /// Rollouts: phase, canary weight, the current step's window and the last decision (all
    /// decisions with their reasons in JSON/YAML).
    Rollouts,
    /// Source problems: files that do not parse, objects that fail validation (exit 1 if any).
    Errors,
    /// Federation: every peer control plane, its link state (SYNCED, STALE, EXPIRED,
    /// CONNECTING), last update, what it imported, the last error (exit 1 unless all SYNCED).
    Peers,
    /// Diagnose the mesh: each problem with its object, cause and fix (exit 0 only when clean).
    Check,
    /// Where a service's requests go: its endpoints with cluster, zone, health and (with
    /// --proxy) the priority that proxy gives each.
    Endpoints {
        /// The service: `name` or `name.namespace`.
        service: String,
        /// Show priorities as this proxy (node id) sees them.
        #[arg(long)]
        proxy: Option<String>,
        /// Add what one proxy measured of each endpoint (outstanding requests, EWMA latency,
        /// ejection), read from its admin address (`/clusters`).
        #[arg(long, value_name = "ADMIN_ADDR")]
        from_proxy: Option<SocketAddr>,
    },
    /// Authorization: what the AuthorizationPolicies decide, computed by the control plane
    /// with the sidecars' own RBAC engine on the policies it sends them.
    Authz {
        #[command(subcommand)]
        command: AuthzCommand,
    },
    /// Join tokens: the proof of identity for workloads outside Kubernetes.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The config the control plane last sent to one proxy.
    ProxyConfig {
        /// The proxy's node id.
        proxy: String,
        /// Which resources.
        #[arg(value_enum, default_value = "all")]
        kind: query::ConfigKind,
        /// Read the config the proxy itself holds from its admin address (`/config_dump`):
        /// its clusters and endpoints (with `subscriptions`: what it subscribed to on demand,
        /// why and since when).
        #[arg(long, value_name = "ADMIN_ADDR")]
        from_proxy: Option<SocketAddr>,
        /// With --from-proxy: show where the proxy's clusters and endpoints differ from what
        /// the control plane sent (exit 1 when they do).
        #[arg(long, requires = "from_proxy")]
        diff: bool,
    },
    /// A proxy's workload identity: its SPIFFE ID, certificate chain and trust bundle with
    /// expiries, read from the proxy's admin address (exit 1 without a valid certificate).
    Certs {
        /// The proxy's admin address (`--admin-addr` of `weft-sidecar run`).
        admin: SocketAddr,
    },
    /// Install Weft into the current Kubernetes cluster (server-side apply), or with
    /// --dry-run print the manifests: install/ rendered with the options, plus a new mesh root
    /// and the webhook's serving certificate.
    Install(install::InstallArgs),
    /// Add Weft's sidecar to Pods or workload templates in a YAML file, offline, with the
    /// injector's own patch function; prints the result.
    Inject(install::InjectArgs),
    /// Run the mesh locally: a control plane, sample echo services in two zones, sidecars
    /// and a load generator, with a live view of where requests go. Ctrl-C stops it all.
    Demo(demo::DemoArgs),
}

/// `weftctl authz ...`.
#[derive(Subcommand)]
enum AuthzCommand {
    /// May this caller make this request? Per endpoint of the service in this cluster:
    /// ALLOWED or DENIED and the deciding policy and rule (exit 0 when every endpoint allows,
    /// 1 when one denies).
    Check(query::AuthzQuestion),
}

/// `weftctl token ...`.
#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a single-use token bound to one namespace/service account (printed on stdout;
    /// its id, for `revoke`, on stderr).
    Create {
        /// Namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Service account.
        #[arg(long)]
        service_account: String,
        /// Lifetime: seconds, or with s/m/h/d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
    },
    /// Revoke a token by its id (printed by `create`): refused from then on, even unredeemed.
    Revoke {
        /// The token's id.
        id: String,
    },
}

/// Parses `90`, `90s`, `15m`, `1h`, `7d` into seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let (n, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    n.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("{s:?} is not a duration like 3600, 15m, 1h or 7d"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = std::env::var("WEFT_LOG").unwrap_or_else(|_| "warn".into());
    weft_proto::logging::init(&filter, "warn", cli.log_format);
    let cp = query::Cp {
        addr: cli.cp.clone(),
        credentials: cli.credentials.clone(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let code = rt.block_on(async move {
        match cli.command {
            Command::Status => query::status(&cp, cli.output).await,
            Command::Services => query::services(&cp, cli.output).await,
            Command::Errors => query::errors(&cp, cli.output).await,
            Command::Peers => query::peers(&cp, cli.output).await,
            Command::Rollouts => query::rollouts(&cp, cli.output).await,
            Command::Check => query::check(&cp, cli.output).await,
            Command::Endpoints {
                service,
                proxy,
                from_proxy,
            } => query::endpoints(&cp, &service, proxy, from_proxy, cli.output).await,
            Command::Token {
                command:
                    TokenCommand::Create {
                        namespace,
                        service_account,
                        ttl,
                    },
            } => query::token_create(&cp, &namespace, &service_account, ttl, cli.output).await,
            Command::Token {
                command: TokenCommand::Revoke { id },
            } => query::token_revoke(&cp, &id, cli.output).await,
            Command::Authz {
                command: AuthzCommand::Check(q),
            } => query::authz_check(&cp, q, cli.output).await,
            Command::Completions { shell } => {
                use clap::CommandFactory;
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "weftctl",
                    &mut std::io::stdout(),
                );
                Ok(0)
            }
            Command::ProxyConfig {
                proxy,
                kind,
                from_proxy: Some(admin),
                diff,
            } => query::proxy_view(&cp, &proxy, admin, kind, diff, cli.output).await,
            Command::ProxyConfig { proxy, kind, .. } => {
                query::proxy_config(&cp, &proxy, kind, cli.output).await
            }
            Command::Certs { admin } => query::certs(admin, cli.output).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Install(args) => install::install(args).await,
            Command::Inject(args) => install::inject(&args, &cp).await,
        }
    })?;
    std::process::exit(code);
}
