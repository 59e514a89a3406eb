//! `overlayctl`: the operator's CLI. It only talks to the local `overlayd` API (and, for
//! `exec`, enters a task's namespace). Verbs, flags, tables and `inspect` JSON follow
//! `docker network|service` so muscle memory works.

mod client;
mod exec;
mod flows;
mod pretty;
mod progress;
mod spec_flags;
mod table;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use client::{seg, Client};
use protocol::api::{
    DatapathStats, FlowInfo, Info, JoinToken, NetworkInspect, NetworkTarget, NodeView, PortSpec,
    ServiceInspect, TaskView,
};
use protocol::state::{EndpointMode, PortConfig, Vtep};
use serde_json::json;
use spec_flags::{HealthFlags, RollbackFlags, UpdateFlags};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "overlayctl",
    version,
    about = "Control a userspace overlay network node (overlayd)."
)]
struct Cli {
    /// overlayd's API socket [default: the only socket in /run/overlay].
    #[arg(long, global = true, env = "OVERLAY_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage overlay networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Manage services and their tasks.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Show the cluster's nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Cluster membership (on the manager).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Run a command inside a task's network namespace.
    Exec {
        /// Task name (`web.1`) or id.
        task: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show tasks as JSON (state, addresses, namespace).
    Inspect {
        /// Task names (`web.1`) or ids.
        #[arg(required = true)]
        tasks: Vec<String>,
    },
    /// Show this node's summary.
    Info,
    /// Show the datapath's frame counters and drop reasons.
    Stats,
    /// List this node's load-balanced flows (its clients' connections through service
    /// VIPs), as `conntrack -L` does: client, VIP, backend and its node, state, age, frames
    /// and bytes each way.
    Flows {
        /// Only this service's flows.
        #[arg(long)]
        service: Option<String>,
        /// Only flows to backends on this node.
        #[arg(long)]
        node: Option<String>,
        /// Keep watching: print each flow as it starts (`+`) and ends (`-`, with the state
        /// it was last seen in), and the datapath's drops by reason, sampled twice a second.
        #[arg(short, long)]
        follow: bool,
        /// Print JSON instead of a table.
        #[arg(long, conflicts_with = "follow")]
        json: bool,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network.
    Create {
        /// Driver (only "overlay").
        #[arg(short = 'd', long, default_value = "overlay")]
        driver: String,
        /// Subnet in CIDR form [default: next free /24 of the pool].
        #[arg(long)]
        subnet: Option<String>,
        /// Gateway address [default: first host of the subnet].
        #[arg(long)]
        gateway: Option<String>,
        /// Driver options, KEY=VALUE (e.g. com.docker.network.driver.overlay.vxlanid_list=4200),
        /// or `encrypted`: frames between nodes sealed in ESP (AES-256-GCM).
        #[arg(short = 'o', long = "opt")]
        opts: Vec<String>,
        /// Make it the routing mesh's network, replacing the current one (no service may be
        /// publishing a port).
        #[arg(long)]
        ingress: bool,
        name: String,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls {
        /// Only print names.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show networks as JSON.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Give an encrypted network a new key now (every node receives with it before any
    /// sends with it; the old key is accepted for a while after).
    RotateKey { name: String },
    /// Manage a network's external VTEP endpoints.
    #[command(subcommand)]
    Vtep(VtepCmd),
    /// Remove networks (refused while a service uses them).
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List nodes: name, address, state (ready/down), availability, role.
    #[command(alias = "list")]
    Ls,
    /// Show nodes as JSON.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Change a node: `--availability drain` moves its tasks to other nodes.
    Update {
        #[arg(long, value_parser = ["active", "drain"])]
        availability: String,
        name: String,
    },
    /// Make nodes managers: their certificates get the manager role (they renew at once)
    /// and their operators may change the cluster.
    Promote {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Make managers workers (the last manager cannot be demoted).
    Demote {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Upgrade this node's overlayd in place: it starts the binary now on disk (the file it
    /// was started from, replaced or not) with the same arguments and hands the node over
    /// to it; its tasks keep running. Waits until the new process serves the API.
    Upgrade,
    /// Remove nodes from the cluster: their certificates are refused from then on. A node
    /// that is not down is refused unless --force.
    #[command(alias = "remove")]
    Rm {
        /// Remove a node even if it is up.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Print the command that joins a new node to this cluster as a worker (the default)
    /// or a manager.
    JoinToken {
        #[arg(value_parser = ["worker", "manager"], default_value = "worker")]
        role: String,
        /// Make a new token for this role: the old one is refused for new joins (nodes that
        /// joined with it are unaffected).
        #[arg(long)]
        rotate: bool,
        /// Only print the token.
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Subcommand)]
enum VtepCmd {
    /// Declare an endpoint behind a standard VXLAN device (not an overlayd node).
    Add {
        network: String,
        /// Underlay address of the VTEP.
        #[arg(long)]
        address: String,
        /// MAC of the endpoint behind it.
        #[arg(long)]
        mac: String,
        /// IPv4 address of the endpoint (the routers answer ARP for it).
        #[arg(long)]
        ip: Option<String>,
    },
    /// List a network's external VTEP endpoints.
    #[command(alias = "list")]
    Ls { network: String },
    /// Remove an external VTEP endpoint.
    #[command(alias = "remove")]
    Rm {
        network: String,
        #[arg(long)]
        mac: String,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Create a service: CMD runs in each task's own network namespace, or with --image
    /// each task is a container its node's Docker Engine runs (ARGS its command).
    Create(Box<CreateArgs>),
    /// List services.
    #[command(alias = "list")]
    Ls {
        #[arg(short, long)]
        quiet: bool,
    },
    /// List the tasks of a service.
    Ps { name: String },
    /// Show the output of a service's tasks on this node (image tasks from the engine,
    /// process tasks from their log files), each line prefixed SERVICE.SLOT.ID@NODE |.
    Logs {
        /// Follow the output.
        #[arg(short, long)]
        follow: bool,
        /// Number of lines to show from the end of each task's log [default: all].
        #[arg(short = 'n', long)]
        tail: Option<u64>,
        /// Show timestamps (image tasks).
        #[arg(short, long)]
        timestamps: bool,
        name: String,
    },
    /// Show services as JSON (Docker's shape), or as Docker's pretty text.
    Inspect {
        /// Print the information in a human friendly format.
        #[arg(long)]
        pretty: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Change a service. What needs new tasks (command, environment, networks, health
    /// check, grace period, --force, a first or last published port) rolls out under the
    /// update policy; the rest applies at once. Waits for the service to converge and
    /// shows progress unless --detach.
    Update(Box<UpdateArgs>),
    /// Return a service to its previous spec, rolled out under its rollback policy.
    Rollback {
        /// Exit immediately instead of waiting for the service to converge.
        #[arg(short, long)]
        detach: bool,
        /// Suppress progress output.
        #[arg(short, long)]
        quiet: bool,
        name: String,
    },
    /// Scale services: NAME=REPLICAS ...
    Scale {
        #[arg(required = true)]
        specs: Vec<String>,
    },
    /// Remove services, their tasks and their addresses.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// `service create`'s flags, as Docker's.
#[derive(clap::Args)]
struct CreateArgs {
    #[arg(long)]
    name: String,
    /// Network to attach to: NAME, or name=NAME[,alias=ALIAS...] (repeat for several;
    /// the task gets eth0, eth1, ... in this order, and eth0 carries the default route).
    #[arg(long = "network", required = true)]
    networks: Vec<String>,
    /// vip (a virtual IP per network, load-balanced) or dnsrr (DNS gives task addresses).
    #[arg(long, value_parser = ["vip", "dnsrr"])]
    endpoint_mode: Option<String>,
    /// Idle time after which a load-balanced flow is forgotten, e.g. 30s, 15m, 2h
    /// [default: the node's, 24h].
    #[arg(long, value_parser = parse_duration_secs)]
    lb_idle_timeout: Option<u64>,
    /// Publish a port on every node: [PUBLISHED:]TARGET[/udp], or
    /// published=P,target=T[,protocol=udp][,mode=host][,proxy=v2] (repeat for several;
    /// without a published port one is chosen from 30000-32767).
    #[arg(short = 'p', long = "publish", value_parser = parse_publish_flag)]
    publish: Vec<PortSpec>,
    /// Number of tasks (replicated mode).
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// replicated (--replicas tasks) or global (one task on every eligible node).
    #[arg(long, value_parser = ["replicated", "global"], default_value = "replicated")]
    mode: String,
    /// Environment variables, KEY=VALUE.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    #[command(flatten)]
    health: HealthFlags,
    /// Time a stopping task has to finish its connections, then between SIGTERM and
    /// SIGKILL (ns|us|ms|s|m|h) [default: 10s].
    #[arg(long, value_parser = spec_flags::parse_whole_secs)]
    stop_grace_period: Option<u64>,
    #[command(flatten)]
    update: UpdateFlags,
    #[command(flatten)]
    rollback: RollbackFlags,
    #[command(flatten)]
    container: ContainerFlags,
    /// The command and its arguments (after `--`; with --image, the container's arguments,
    /// and optional).
    #[arg(last = true)]
    command: Vec<String>,
}

/// `service create`'s container flags: the image and what Docker maps onto its container.
#[derive(clap::Args, Default)]
struct ContainerFlags {
    /// Run each task as a container of IMAGE on its node's Docker Engine (overlayd's
    /// --docker-host, with --docker-plugin) instead of as a process.
    #[arg(long)]
    image: Option<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// Username or UID (format: <name|uid>[:<group|gid>]).
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Container hostname.
    #[arg(long)]
    hostname: Option<String>,
    /// Attach a filesystem mount: type=bind|volume,source=...,target=...[,readonly].
    #[arg(long = "mount")]
    mounts: Vec<String>,
    /// Limit CPUs (e.g. 0.5).
    #[arg(long = "limit-cpu")]
    limit_cpu: Option<f64>,
    /// Limit memory (bytes, or with a unit: 64M, 1G).
    #[arg(long = "limit-memory", value_parser = parse_bytes)]
    limit_memory: Option<u64>,
    /// Replace an ended container: any, on-failure or none [default: any].
    #[arg(long = "restart-condition", value_parser = ["any", "on-failure", "none"])]
    restart_condition: Option<String>,
    /// Maximum number of replacements [default: no limit].
    #[arg(long = "restart-max-attempts")]
    restart_max_attempts: Option<u32>,
    /// Delay between replacements (ns|us|ms|s|m|h) [default: back-off, 0.5s doubling to 10s].
    #[arg(long = "restart-delay", value_parser = spec_flags::parse_duration_ms)]
    restart_delay: Option<u64>,
}

impl ContainerFlags {
    /// The image and its options, or `None` without --image (then no other flag here may be
    /// given).
    fn to_image(&self) -> anyhow::Result<Option<protocol::state::ContainerImage>> {
        let Some(image) = &self.image else {
            if self.workdir.is_some()
                || self.user.is_some()
                || self.hostname.is_some()
                || !self.mounts.is_empty()
                || self.limit_cpu.is_some()
                || self.limit_memory.is_some()
                || self.restart_condition.is_some()
                || self.restart_max_attempts.is_some()
                || self.restart_delay.is_some()
            {
                bail!(
                    "--workdir, --user, --hostname, --mount, --limit-* and --restart-* need \
                     --image (process tasks are always restarted)"
                );
            }
            return Ok(None);
        };
        let mounts = self
            .mounts
            .iter()
            .map(|m| protocol::state::Mount::parse(m).map_err(|e| anyhow!(e)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let nano_cpus = match self.limit_cpu {
            Some(c) if !(c > 0.0 && c <= 1024.0) => bail!("--limit-cpu {c}: expected 0 < CPUs"),
            Some(c) => Some((c * 1e9).round() as u64),
            None => None,
        };
        Ok(Some(protocol::state::ContainerImage {
            image: image.clone(),
            workdir: self.workdir.clone(),
            user: self.user.clone(),
            hostname: self.hostname.clone(),
            mounts,
            nano_cpus,
            memory_bytes: self.limit_memory,
            restart: protocol::state::RestartPolicy {
                condition: match self.restart_condition.as_deref() {
                    Some("on-failure") => protocol::state::RestartCondition::OnFailure,
                    Some("none") => protocol::state::RestartCondition::None,
                    _ => protocol::state::RestartCondition::Any,
                },
                max_attempts: self.restart_max_attempts,
                delay_ms: self.restart_delay,
            },
        }))
    }
}

/// `--limit-memory`: bytes, or a number with b, k, m, g (Docker's units, powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.strip_suffix('b').unwrap_or(&lower);
    let (num, mult) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 512m or 1g"))?;
    if n <= 0.0 {
        return Err(format!("{s:?}: must be more than 0"));
    }
    Ok((n * mult as f64) as u64)
}

/// `service update`'s flags, as Docker's.
#[derive(clap::Args)]
struct UpdateArgs {
    /// The service's command and its arguments, split as a shell would.
    #[arg(long, conflicts_with = "command")]
    args: Option<String>,
    /// Add or update an environment variable, KEY=VALUE.
    #[arg(long = "env-add")]
    env_add: Vec<String>,
    /// Remove an environment variable, KEY.
    #[arg(long = "env-rm")]
    env_rm: Vec<String>,
    /// Number of tasks.
    #[arg(long)]
    replicas: Option<u32>,
    /// Attach a network: NAME, or name=NAME[,alias=ALIAS...].
    #[arg(long = "network-add")]
    network_add: Vec<String>,
    /// Detach a network.
    #[arg(long = "network-rm")]
    network_rm: Vec<String>,
    /// vip or dnsrr.
    #[arg(long, value_parser = ["vip", "dnsrr"])]
    endpoint_mode: Option<String>,
    /// Idle time after which a load-balanced flow is forgotten, e.g. 30s, 15m, 2h.
    #[arg(long, value_parser = parse_duration_secs)]
    lb_idle_timeout: Option<u64>,
    /// Publish another port (same forms as `create --publish`).
    #[arg(long = "publish-add", value_parser = parse_publish_flag)]
    publish_add: Vec<PortSpec>,
    /// Stop publishing a port: PUBLISHED[/PROTOCOL].
    #[arg(long = "publish-rm")]
    publish_rm: Vec<String>,
    #[command(flatten)]
    health: HealthFlags,
    /// Time a stopping task has to finish its connections, then between SIGTERM and
    /// SIGKILL (ns|us|ms|s|m|h).
    #[arg(long, value_parser = spec_flags::parse_whole_secs)]
    stop_grace_period: Option<u64>,
    #[command(flatten)]
    update: UpdateFlags,
    #[command(flatten)]
    rollback_policy: RollbackFlags,
    /// Replace every task even if nothing changes.
    #[arg(long)]
    force: bool,
    /// Return to the previous spec (as `service rollback`).
    #[arg(long)]
    rollback: bool,
    /// The image the tasks run (a service created with --image); rolls the tasks out.
    #[arg(long)]
    image: Option<String>,
    /// Exit immediately instead of waiting for the service to converge.
    #[arg(short, long)]
    detach: bool,
    /// Suppress progress output.
    #[arg(short, long)]
    quiet: bool,
    name: String,
    /// The command and its arguments, as another way to give --args (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
}

impl UpdateArgs {
    /// The API's request.
    fn request(&self) -> anyhow::Result<protocol::api::ServiceUpdate> {
        for e in &self.env_add {
            if !e.contains('=') {
                bail!("invalid --env-add {e:?}: expected KEY=VALUE");
            }
        }
        for r in &self.publish_rm {
            protocol::api::parse_publish_rm(r).map_err(|e| anyhow!(e))?;
        }
        let args = match &self.args {
            Some(a) => Some(spec_flags::split_args(a).map_err(|e| anyhow!("--args: {e}"))?),
            None if !self.command.is_empty() => Some(self.command.clone()),
            None => None,
        };
        if args.as_ref().is_some_and(|a| a.is_empty()) {
            bail!("--args: the command is empty");
        }
        let network_add = self
            .network_add
            .iter()
            .map(|n| parse_network_flag(n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let endpoint_mode = self.endpoint_mode.as_deref().map(|m| match m {
            "dnsrr" => EndpointMode::Dnsrr,
            _ => EndpointMode::Vip,
        });
        Ok(protocol::api::ServiceUpdate {
            publish_add: self.publish_add.clone(),
            publish_rm: self.publish_rm.clone(),
            args,
            env_add: self.env_add.clone(),
            env_rm: self.env_rm.clone(),
            replicas: self.replicas,
            network_add,
            network_rm: self.network_rm.clone(),
            endpoint_mode,
            lb_idle_timeout: self.lb_idle_timeout,
            health: self.health.to_update(),
            stop_grace_period_s: self.stop_grace_period,
            update_config: self.update.to_change()?,
            rollback_config: self.rollback_policy.to_change()?,
            force: self.force,
            rollback: self.rollback,
            image: self.image.clone(),
        })
    }
}

/// Network options: KEY=VALUE, or a bare flag as Docker takes `--opt encrypted`.
fn network_opts(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let (k, v) = p.split_once('=').unwrap_or((p.as_str(), ""));
        if k.is_empty() {
            bail!("invalid option {p:?}: expected KEY[=VALUE]");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// `--network NAME` or the long form `--network name=NAME,alias=A,alias=B`.
fn parse_network_flag(s: &str) -> anyhow::Result<NetworkTarget> {
    if !s.contains('=') {
        return Ok(NetworkTarget::from(s));
    }
    let mut target = None;
    let mut aliases = Vec::new();
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("name" | "target", v)) if !v.is_empty() => target = Some(v.to_string()),
            Some(("alias", v)) if !v.is_empty() => aliases.push(v.to_string()),
            _ => bail!("invalid --network {s:?}: expected NAME or name=NAME[,alias=ALIAS...]"),
        }
    }
    let target = target.ok_or_else(|| anyhow!("invalid --network {s:?}: name=NAME is missing"))?;
    Ok(NetworkTarget { target, aliases })
}

fn parse_publish_flag(s: &str) -> Result<PortSpec, String> {
    protocol::api::parse_publish(s)
}

/// A duration in whole seconds: `90`, `90s`, `15m`, `2h`, `1d`.
fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration {s:?}: expected e.g. 30s, 15m, 2h");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!("invalid duration {s:?}: must be at least 1s")),
        Some(v) => Ok(v),
        None => Err(bad()),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn network(c: &Client, cmd: NetworkCmd) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create {
            driver,
            subnet,
            gateway,
            opts,
            ingress,
            name,
        } => {
            let options = network_opts(&opts)?;
            let body = json!({"name": name, "driver": driver, "subnet": subnet, "gateway": gateway, "options": options, "ingress": ingress});
            let n: NetworkInspect = c.post("/networks/create", body).await?;
            println!("{}", n.id);
        }
        NetworkCmd::Ls { quiet } => {
            let nets: Vec<NetworkInspect> = c.get("/networks").await?;
            if quiet {
                nets.iter().for_each(|n| println!("{}", n.name));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = nets
                .iter()
                .map(|n| {
                    let subnet = n
                        .ipam
                        .config
                        .first()
                        .map(|c| c.subnet.clone())
                        .unwrap_or_default();
                    vec![
                        table::short_id(&n.id),
                        n.name.clone(),
                        n.driver.clone(),
                        n.scope.clone(),
                        subnet,
                        n.vni.to_string(),
                    ]
                })
                .collect();
            table::print(
                &["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET", "VNI"],
                &rows,
            );
        }
        NetworkCmd::Inspect { names } => {
            let mut out = Vec::new();
            for n in names {
                out.push(
                    c.get::<NetworkInspect>(&format!("/networks/{}", seg(&n)))
                        .await?,
                );
            }
            print_json(&out)?;
        }
        NetworkCmd::RotateKey { name } => {
            c.request(
                hyper::Method::POST,
                &format!("/networks/{}/rotate-key", seg(&name)),
                None,
            )
            .await?;
            println!("{name}");
        }
        NetworkCmd::Vtep(cmd) => vtep(c, cmd).await?,
        NetworkCmd::Rm { names } => {
            for n in names {
                c.delete(&format!("/networks/{}", seg(&n))).await?;
                println!("{n}");
            }
        }
    }
    Ok(())
}

async fn vtep(c: &Client, cmd: VtepCmd) -> anyhow::Result<()> {
    let print = |v: Vec<Vtep>| {
        let rows: Vec<Vec<String>> = v
            .iter()
            .map(|v| {
                vec![
                    v.mac.to_string(),
                    v.ip.map(|i| i.to_string()).unwrap_or_default(),
                    v.address.to_string(),
                ]
            })
            .collect();
        table::print(&["MAC", "IP", "VTEP ADDRESS"], &rows);
    };
    match cmd {
        VtepCmd::Add {
            network,
            address,
            mac,
            ip,
        } => {
            let body = json!({"address": address, "mac": mac, "ip": ip});
            print(
                c.post(&format!("/networks/{}/vteps", seg(&network)), body)
                    .await?,
            );
        }
        VtepCmd::Ls { network } => {
            print(c.get(&format!("/networks/{}/vteps", seg(&network))).await?)
        }
        VtepCmd::Rm { network, mac } => {
            c.delete(&format!("/networks/{}/vteps/{}", seg(&network), seg(&mac)))
                .await?;
            println!("{mac}");
        }
    }
    Ok(())
}

async fn node(c: &Client, cmd: NodeCmd) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Ls => {
            let nodes: Vec<NodeView> = c.get("/nodes").await?;
            // Which manager leads (holds the state), as Docker's MANAGER STATUS column.
            let mut status = std::collections::BTreeMap::new();
            for n in nodes.iter().filter(|n| n.role == "manager") {
                let v: serde_json::Value =
                    c.get(&format!("/nodes/{}/inspect", seg(&n.name))).await?;
                let m = &v["ManagerStatus"];
                let s = if m["Leader"].as_bool() == Some(true) {
                    "Leader".to_string()
                } else {
                    capital(m["Reachability"].as_str().unwrap_or_default())
                };
                status.insert(n.name.clone(), s);
            }
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    let name = if n.this_node {
                        format!("{} *", n.name)
                    } else {
                        n.name.clone()
                    };
                    vec![
                        name,
                        n.address.clone().unwrap_or_else(|| "-".into()),
                        capital(&n.state),
                        capital(&n.availability),
                        status.get(&n.name).cloned().unwrap_or_default(),
                    ]
                })
                .collect();
            table::print(
                &[
                    "HOSTNAME",
                    "ADDRESS",
                    "STATUS",
                    "AVAILABILITY",
                    "MANAGER STATUS",
                ],
                &rows,
            );
        }
        NodeCmd::Inspect { names } => {
            let mut out = Vec::new();
            for n in names {
                out.push(
                    c.get::<serde_json::Value>(&format!("/nodes/{}/inspect", seg(&n)))
                        .await?,
                );
            }
            print_json(&out)?;
        }
        NodeCmd::Promote { names } => {
            for n in names {
                let _: serde_json::Value = c
                    .post(&format!("/nodes/{}/promote", seg(&n)), json!({}))
                    .await?;
                println!("Node {n} promoted to a manager in the cluster.");
            }
        }
        NodeCmd::Demote { names } => {
            for n in names {
                let _: serde_json::Value = c
                    .post(&format!("/nodes/{}/demote", seg(&n)), json!({}))
                    .await?;
                println!("Manager {n} demoted in the cluster.");
            }
        }
        NodeCmd::Rm { force, names } => {
            for n in names {
                let q = if force { "?force=true" } else { "" };
                c.delete(&format!("/nodes/{}{q}", seg(&n))).await?;
                println!("{n}");
            }
        }
        NodeCmd::Upgrade => {
            let v: serde_json::Value = c.post("/node/upgrade", json!({})).await?;
            let pid = v["pid"].as_u64().unwrap_or_default() as u32;
            c.wait_served_by(pid, std::time::Duration::from_secs(60))
                .await?;
            println!(
                "overlayd upgraded in place: pid {pid} ({})",
                v["binary"].as_str().unwrap_or_default()
            );
        }
        NodeCmd::Update { availability, name } => {
            let body = json!({ "availability": availability });
            let _: NodeView = c
                .post(&format!("/nodes/{}/update", seg(&name)), body)
                .await?;
            println!("{name}");
        }
    }
    Ok(())
}

async fn service(c: &Client, cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Create(args) => {
            let CreateArgs {
                name,
                networks,
                endpoint_mode,
                lb_idle_timeout,
                publish,
                replicas,
                mode,
                env,
                health,
                stop_grace_period,
                update,
                rollback,
                container,
                command,
            } = *args;
            let image = container.to_image()?;
            if image.is_none() && command.is_empty() {
                bail!("a service needs a command (after --) or an --image");
            }
            for e in &env {
                if !e.contains('=') {
                    bail!("invalid env {e:?}: expected KEY=VALUE");
                }
            }
            let networks = networks
                .iter()
                .map(|n| parse_network_flag(n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let healthcheck = health
                .to_update()
                .applied_to(None)
                .map_err(|e| anyhow!(e))?;
            let body = json!({"name": name, "networks": networks, "replicas": replicas,
                "command": command, "env": env, "endpoint_mode": endpoint_mode,
                "lb_idle_timeout": lb_idle_timeout, "ports": publish,
                "healthcheck": healthcheck, "stop_grace_period_s": stop_grace_period,
                "update_config": update.to_change()?, "rollback_config": rollback.to_change()?,
                "mode": mode, "image": image});
            let s: ServiceInspect = c.post("/services/create", body).await?;
            println!("{}", s.id);
        }
        ServiceCmd::Ls { quiet } => {
            let svcs: Vec<ServiceInspect> = c.get("/services").await?;
            if quiet {
                svcs.iter().for_each(|s| println!("{}", s.spec.name));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = svcs
                .iter()
                .map(|s| {
                    let ports: Vec<String> = s
                        .endpoint
                        .ports
                        .iter()
                        .map(|p| PortConfig::from(*p).to_string())
                        .collect();
                    vec![
                        table::short_id(&s.id),
                        s.spec.name.clone(),
                        s.spec.mode.name().into(),
                        format!("{}/{}", s.running, s.spec.replicas),
                        ports.join(", "),
                        s.spec
                            .container_spec
                            .image
                            .clone()
                            .unwrap_or_else(|| s.spec.container_spec.command.join(" ")),
                    ]
                })
                .collect();
            table::print(
                &["ID", "NAME", "MODE", "REPLICAS", "PORTS", "COMMAND"],
                &rows,
            );
        }
        ServiceCmd::Logs {
            follow,
            tail,
            timestamps,
            name,
        } => {
            let mut path = format!(
                "/services/{}/logs?follow={follow}&timestamps={timestamps}",
                seg(&name)
            );
            if let Some(n) = tail {
                path.push_str(&format!("&tail={n}"));
            }
            c.stream_to_stdout(&path).await?;
        }
        ServiceCmd::Ps { name } => {
            let mut tasks: Vec<TaskView> = c
                .get(&format!("/tasks?service={}&history=true", seg(&name)))
                .await?;
            // Each slot's current task, then its past ones (newest first), as docker does.
            tasks.sort_by_key(|t| (t.slot, t.desired_state != "running"));
            let t_now = now();
            let rows: Vec<Vec<String>> = tasks
                .iter()
                .map(|t| {
                    // Docker's `Running (healthy) 5 seconds ago`.
                    let health = match t.status.health {
                        Some(h) if t.status.state == protocol::api::TaskState::Running => {
                            format!(" ({h})")
                        }
                        _ => String::new(),
                    };
                    let state = format!(
                        "{}{health} {}",
                        capital(&t.status.state.to_string()),
                        table::ago(t.status.since.unix_secs(), t_now)
                    );
                    let addrs: Vec<String> = t
                        .attachments
                        .iter()
                        .map(|a| format!("{}={}", a.network, a.address))
                        .collect();
                    // The slot's name, as Docker shows every task of a slot (a start-first
                    // replacement's own name is `web.1.ID`).
                    let slot_name = format!("{}.{}", t.service, t.slot);
                    let name = if t.desired_state == "running" {
                        slot_name
                    } else {
                        format!(" \\_ {slot_name}")
                    };
                    vec![
                        table::short_id(&t.id),
                        name,
                        t.node.clone(),
                        capital(&t.desired_state),
                        state,
                        t.status.error.clone().unwrap_or_default(),
                        addrs.join(","),
                    ]
                })
                .collect();
            table::print(
                &[
                    "ID",
                    "NAME",
                    "NODE",
                    "DESIRED STATE",
                    "CURRENT STATE",
                    "ERROR",
                    "ADDRESSES",
                ],
                &rows,
            );
        }
        ServiceCmd::Inspect { pretty, names } => {
            if pretty {
                for (i, n) in names.iter().enumerate() {
                    let s: ServiceInspect = c.get(&format!("/services/{}", seg(n))).await?;
                    if i > 0 {
                        println!();
                    }
                    print!("{}", pretty::render(&s, now()));
                }
                return Ok(());
            }
            // As the API gives it (Docker's shape), whatever this CLI knows of it.
            let mut out = Vec::new();
            for n in names {
                out.push(
                    c.get::<serde_json::Value>(&format!("/services/{}", seg(&n)))
                        .await?,
                );
            }
            print_json(&out)?;
        }
        ServiceCmd::Update(u) => {
            let body = serde_json::to_value(u.request()?)?;
            let _: ServiceInspect = c
                .post(&format!("/services/{}/update", seg(&u.name)), body)
                .await?;
            println!("{}", u.name);
            if !u.detach {
                progress::follow(c, &u.name, u.rollback, u.quiet).await?;
            }
        }
        ServiceCmd::Rollback {
            detach,
            quiet,
            name,
        } => {
            let _: ServiceInspect = c
                .post(&format!("/services/{}/rollback", seg(&name)), json!({}))
                .await?;
            println!("{name}");
            if !detach {
                progress::follow(c, &name, true, quiet).await?;
            }
        }
        ServiceCmd::Scale { specs } => {
            let mut parsed = Vec::new();
            for s in &specs {
                let (name, n) = s
                    .split_once('=')
                    .ok_or_else(|| anyhow!("invalid scale {s:?}: expected NAME=REPLICAS"))?;
                let n: u32 = n
                    .parse()
                    .map_err(|_| anyhow!("invalid replica count in {s:?}"))?;
                parsed.push((name.to_string(), n));
            }
            for (name, n) in parsed {
                let _: ServiceInspect = c
                    .post(
                        &format!("/services/{}/scale", seg(&name)),
                        json!({"replicas": n}),
                    )
                    .await?;
                println!("{name} scaled to {n}");
            }
        }
        ServiceCmd::Rm { names } => {
            for n in names {
                c.delete(&format!("/services/{}", seg(&n))).await?;
                println!("{n}");
            }
        }
    }
    Ok(())
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// What is left to do once the API has answered.
enum Outcome {
    Done,
    /// `exec`: run the command in these namespaces (network, mount), outside the async runtime.
    Exec(PathBuf, Option<PathBuf>),
}

async fn dispatch(c: &Client, cmd: Cmd) -> anyhow::Result<Outcome> {
    match cmd {
        Cmd::Network(n) => network(c, n).await?,
        Cmd::Service(s) => service(c, s).await?,
        Cmd::Node(n) => node(c, n).await?,
        Cmd::Cluster(ClusterCmd::JoinToken {
            role,
            rotate,
            quiet,
        }) => {
            let t: JoinToken = if rotate {
                let t = c
                    .post(
                        &format!("/cluster/join-token/rotate?role={role}"),
                        json!({}),
                    )
                    .await?;
                if !quiet {
                    println!("Successfully rotated {role} join token.\n");
                }
                t
            } else {
                c.get(&format!("/cluster/join-token?role={role}")).await?
            };
            if quiet {
                println!("{}", t.token);
            } else {
                println!(
                    "To add a {role} to this cluster, run on it:\n\n    {}\n",
                    t.command
                );
            }
        }
        Cmd::Inspect { tasks } => {
            let mut out = Vec::new();
            for t in tasks {
                out.push(c.get::<TaskView>(&format!("/tasks/{}", seg(&t))).await?);
            }
            print_json(&out)?;
        }
        Cmd::Info => print_json(&c.get::<Info>("/info").await?)?,
        Cmd::Stats => print_json(&c.get::<DatapathStats>("/datapath/stats").await?)?,
        Cmd::Flows {
            service,
            node,
            follow,
            json,
        } => {
            let query: Vec<String> = [("service", &service), ("node", &node)]
                .into_iter()
                .filter_map(|(k, v)| Some(format!("{k}={}", seg(v.as_deref()?))))
                .collect();
            let path = match query.is_empty() {
                true => "/flows".to_string(),
                false => format!("/flows?{}", query.join("&")),
            };
            if follow {
                flows::follow(c, &path).await?;
            } else {
                let list: Vec<FlowInfo> = c.get(&path).await?;
                if json {
                    print_json(&list)?;
                } else {
                    flows::print(&list);
                }
            }
        }
        Cmd::Exec { task, .. } => {
            let t: TaskView = c.get(&format!("/tasks/{}", seg(&task))).await?;
            return Ok(Outcome::Exec(
                PathBuf::from(t.netns),
                t.mountns.map(PathBuf::from),
            ));
        }
    }
    Ok(Outcome::Done)
}

fn run() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    let socket = match cli.socket {
        Some(s) => s,
        None => client::default_socket(std::path::Path::new("/run/overlay"))?,
    };
    let exec_cmd = match &cli.command {
        Cmd::Exec { command, .. } => command.clone(),
        _ => Vec::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let outcome = rt.block_on(dispatch(&Client::new(socket), cli.command))?;
    drop(rt);
    match outcome {
        Outcome::Done => Ok(0),
        Outcome::Exec(netns, mountns) => exec::run(&netns, mountns.as_deref(), &exec_cmd),
    }
}

fn main() -> std::process::ExitCode {
    // `overlayctl service ls | head -1`: a reader that goes away ends us quietly, as it does
    // any Unix tool, instead of a "Broken pipe" panic (Rust ignores SIGPIPE by default).
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid action.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    match run() {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("overlayctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::state::{FailureAction, UpdateOrder};

    fn update(args: &[&str]) -> UpdateArgs {
        let mut argv = vec!["overlayctl", "service", "update"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Cmd::Service(ServiceCmd::Update(u))) => *u,
            Ok(_) => panic!("not an update"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn service_update_flags_parse_as_dockers() {
        let u = update(&[
            "--env-add",
            "V=2",
            "--env-rm",
            "OLD",
            "--replicas",
            "5",
            "--args",
            "python3 -c 'print(1)'",
            "--network-add",
            "name=b,alias=db",
            "--network-rm",
            "a",
            "--endpoint-mode",
            "dnsrr",
            "--lb-idle-timeout",
            "15m",
            "--publish-add",
            "8080:80",
            "--publish-rm",
            "9000/udp",
            "--health-cmd",
            "curl -f localhost",
            "--health-interval",
            "5s",
            "--health-retries",
            "2",
            "--stop-grace-period",
            "30s",
            "--update-parallelism",
            "2",
            "--update-delay",
            "10s",
            "--update-failure-action",
            "rollback",
            "--update-monitor",
            "500ms",
            "--update-max-failure-ratio",
            "0.25",
            "--update-order",
            "start-first",
            "--rollback-parallelism",
            "0",
            "--rollback-failure-action",
            "continue",
            "--force",
            "-d",
            "web",
        ]);
        assert!(u.detach && u.force && !u.rollback);
        let r = u.request().unwrap();
        assert_eq!(r.args.unwrap(), ["python3", "-c", "print(1)"]);
        assert_eq!(
            (r.env_add, r.env_rm),
            (vec!["V=2".to_string()], vec!["OLD".to_string()])
        );
        assert_eq!(r.replicas, Some(5));
        assert_eq!(r.network_add[0].target, "b");
        assert_eq!(r.network_add[0].aliases, ["db"]);
        assert_eq!(r.endpoint_mode, Some(EndpointMode::Dnsrr));
        assert_eq!(r.lb_idle_timeout, Some(900));
        assert_eq!(r.publish_add[0].published_port, 8080);
        assert_eq!(r.health.command.unwrap(), ["sh", "-c", "curl -f localhost"]);
        assert_eq!((r.health.interval_s, r.health.retries), (Some(5), Some(2)));
        assert_eq!(r.stop_grace_period_s, Some(30));
        let c = r.update_config;
        assert_eq!(
            (c.parallelism, c.delay_ms, c.monitor_ms),
            (Some(2), Some(10_000), Some(500))
        );
        assert_eq!(c.failure_action, Some(FailureAction::Rollback));
        assert_eq!(c.order, Some(UpdateOrder::StartFirst));
        assert_eq!(c.max_failure_ratio.unwrap().to_string(), "0.25");
        let rb = r.rollback_config;
        assert_eq!(
            (rb.parallelism, rb.failure_action),
            (Some(0), Some(FailureAction::Continue))
        );
        // The command after `--`, as create takes it.
        let u = update(&["web", "--", "sleep", "60"]);
        assert_eq!(u.request().unwrap().args.unwrap(), ["sleep", "60"]);
        // Nothing given: an update that changes nothing (Docker allows it).
        assert_eq!(update(&["web"]).request().unwrap(), Default::default());
    }

    #[test]
    fn bad_update_flags_are_refused() {
        for bad in [
            vec!["--update-failure-action", "explode", "web"],
            vec!["--rollback-failure-action", "rollback", "web"],
            vec!["--update-order", "sideways", "web"],
            vec!["--update-max-failure-ratio", "2", "web"],
            vec!["--update-delay", "soon", "web"],
            vec!["--health-interval", "1500ms", "web"],
            vec!["--args", "x", "web", "--", "y"],
        ] {
            let mut argv = vec!["overlayctl", "service", "update"];
            argv.extend_from_slice(&bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
        assert!(update(&["--env-add", "NOVALUE", "web"]).request().is_err());
        assert!(update(&["--args", "'open", "web"]).request().is_err());
    }

    #[test]
    fn service_create_takes_health_and_policies() {
        let argv = [
            "overlayctl",
            "service",
            "create",
            "--name",
            "web",
            "--network",
            "a",
            "--health-cmd",
            "true",
            "--no-healthcheck",
            "--stop-grace-period",
            "1m",
            "--update-order",
            "start-first",
            "--rollback-monitor",
            "1s",
            "--",
            "sleep",
            "1",
        ];
        let Ok(Cmd::Service(ServiceCmd::Create(create))) =
            Cli::try_parse_from(argv).map(|c| c.command)
        else {
            panic!("not a create");
        };
        let CreateArgs {
            health,
            stop_grace_period,
            update,
            rollback,
            ..
        } = *create;
        assert_eq!(stop_grace_period, Some(60));
        assert!(
            health.to_update().applied_to(None).is_err(),
            "--no-healthcheck with --health-cmd"
        );
        assert_eq!(
            update.to_change().unwrap().order,
            Some(UpdateOrder::StartFirst)
        );
        assert_eq!(rollback.to_change().unwrap().monitor_ms, Some(1_000));
        let Ok(Cmd::Service(ServiceCmd::Rollback { name, detach, .. })) =
            Cli::try_parse_from(["overlayctl", "service", "rollback", "-d", "web"])
                .map(|c| c.command)
        else {
            panic!("not a rollback");
        };
        assert_eq!((name.as_str(), detach), ("web", true));
    }
}
