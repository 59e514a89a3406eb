//! Wiring of one node and its single shutdown mechanism: a `CancellationToken` fired by
//! SIGTERM or SIGINT. On shutdown the API stops accepting, the agent lets go of its tasks
//! (they keep running, with their namespaces and TAPs, for the next start to adopt; with
//! `--stop-tasks` it stops them), the datapath thread ends and the socket file is removed.
//! The desired state stays on disk, so the next start re-creates what is missing.

use crate::agent::{Agent, Planes};
use crate::api::{self, ApiState};
use crate::cluster::candidate::Candidate;
use crate::cluster::pki::{self, Ca, Identity, Token};
use crate::cluster::server::{self, ServerCtx, Serving};
use crate::cluster::tokens::JoinTokens;
use crate::cluster::worker::{self, Credentials, Link};
use crate::cluster::{wire, Cluster, JoinInfo, Mode, View};
use crate::config::{Config, StoreKind, CONTROL_PORT};
use crate::epoch;
use crate::forward::io::Datapath;
use crate::forward::underlay::Sockets;
use crate::manager::Manager;
use crate::naming;
use crate::naming::Secret;
use crate::store::{LeaderInfo, Store};
use anyhow::{bail, Context};
use datapath::conntrack::ConnTable;
use datapath::stats::Counters;
use protocol::control::ToManager;
use protocol::state::Pool;
use protocol::state::Role;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Binds a Unix socket only root (and `group`, if given) may use: mode 0660, owned by root and
/// `group`. It is bound under a temporary name and renamed into place once its mode is set,
/// so nobody can connect in between. Refuses a socket that a live daemon is serving and
/// replaces a stale one.
fn bind_socket(path: &Path, group: Option<nix::unistd::Gid>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "socket {} is in use by another running overlayd",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .with_context(|| format!("binding API socket {}", tmp.display()))?;
    let secured = (|| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        if let Some(gid) = group {
            nix::unistd::chown(&tmp, None, Some(gid))?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = secured {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("securing API socket {}", path.display()));
    }
    Ok(listener)
}

/// The API socket's mode: its owner (root) and its group read and write; nobody else.
const SOCKET_MODE: u32 = 0o660;

/// `--socket-group`: the group whose members may use the API socket, as Docker's `docker`
/// group (membership is root-equivalent: the API starts processes in namespaces).
fn socket_group(name: Option<&str>) -> anyhow::Result<Option<nix::unistd::Gid>> {
    let Some(name) = name else { return Ok(None) };
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(Some(g.gid)),
        Ok(None) => bail!("--socket-group {name}: no such group"),
        Err(e) => bail!("--socket-group {name}: {e}"),
    }
}

/// Task namespaces are pinned by bind mounts under /run/netns; made from a private mount
/// namespace (as `ip netns exec` gives), nobody else can see them.
fn warn_if_private_mount_ns() {
    let ours = std::fs::read_link("/proc/self/ns/mnt");
    let init = std::fs::read_link("/proc/1/ns/mnt");
    if let (Ok(a), Ok(b)) = (ours, init) {
        if a != b {
            tracing::warn!(
                "overlayd runs in a private mount namespace: task namespaces under /run/netns \
                 will not be visible to overlayctl exec or ip netns exec. To run overlayd in a \
                 network namespace use `nsenter --net=/run/netns/NAME overlayd ...`, not \
                 `ip netns exec`"
            );
        }
    }
}

/// Starts this node as the manager of a cluster: CA, join token, QUIC endpoint.
async fn start_manager(
    cfg: &Config,
    store: Store,
    pool: Pool,
    advertise: std::net::Ipv4Addr,
    shutdown: &CancellationToken,
) -> anyhow::Result<Cluster> {
    let view = View::new(Default::default());
    let ca = cluster_ca(&store, true)?;
    let cert_expiry = cert_expiry(cfg, &store)?;
    let listen = control_listen(cfg, advertise);
    let endpoint = control_endpoint(&ca, listen)?;
    // Loading first: on etcd it imports a file-store manager's join secrets.
    let manager = Arc::new(Manager::open(
        store.clone(),
        pool,
        &cfg.node,
        Some((advertise, cfg.data_path_port)),
        &view,
    )?);
    let tokens = Arc::new(JoinTokens::open(
        &store,
        pki::ca_digest(ca.cert_der()?.as_ref()),
    )?);
    configure(&manager, cfg)?;
    manager.spawn_ticks(shutdown.clone());
    let ctx = Arc::new(ServerCtx::new(
        manager.clone(),
        ca,
        tokens.clone(),
        cert_expiry,
        listen,
        cfg.control_full_snapshots,
    ));
    // A manager on the file store always leads: its sender lives as long as the endpoint.
    let (serving, leads) = watch::channel(Serving::Leader(ctx));
    let stop = shutdown.clone();
    tokio::spawn(async move {
        server::serve(endpoint, leads, stop).await;
        drop(serving);
    });
    info!(%listen, "cluster manager listening (QUIC, mutual TLS)");
    let join = Some(JoinInfo {
        tokens,
        addr: listen,
    });
    Ok(Cluster::new(Mode::Manager { manager, join }, view))
}

/// Starts this node as a member: joins first if it has no certificate yet.
async fn start_worker(
    cfg: &Config,
    store: Store,
    advertise: std::net::Ipv4Addr,
    shutdown: &CancellationToken,
) -> anyhow::Result<Cluster> {
    let dir = store.dir().to_path_buf();
    let (cert, key, ca, mgr) = (
        naming::node_cert(&dir),
        naming::node_key(&dir),
        naming::ca_cert(&dir),
        naming::manager_addr_file(&dir),
    );
    join_if_new(cfg, &dir, advertise).await?;
    // `--join` first, then the managers this node last knew.
    let mut managers: Vec<_> = cfg.join.into_iter().collect();
    managers.extend(worker::read_managers(&mgr));
    if managers.is_empty() {
        bail!("no manager address in {}: pass --join ADDR", mgr.display());
    }
    let creds = Credentials {
        identity: Identity {
            cert_pem: pki::read(&cert)?,
            key_pem: pki::read(&key)?,
        },
        ca_pem: pki::read(&ca)?,
        cert_path: cert,
        key_path: key,
    };
    let view = View::new(store.load()?);
    let link = Arc::new(Link::new(managers, cfg.node.clone(), view.clone()));
    let hello = ToManager::Hello {
        version: protocol::control::VERSION,
        node: cfg.node.clone(),
        advertise_addr: advertise,
        data_port: cfg.data_path_port,
        control_addr: None,
    };
    tokio::spawn(
        link.clone()
            .run(creds, advertise, hello, store, shutdown.clone()),
    );
    Ok(Cluster::new(Mode::Worker(link), view))
}

/// How long the node certificates this manager signs last: `--cert-expiry` (kept in the
/// store for later starts and other managers), or what was kept, or Swarm's 90 days. A
/// manager that does not lead cannot keep it: the leader's is what counts.
fn cert_expiry(cfg: &Config, store: &Store) -> anyhow::Result<Duration> {
    if let Some(d) = cfg.cert_expiry {
        match store.put_secret(Secret::CertExpiry, d.as_secs().to_string().as_bytes()) {
            Ok(()) => return Ok(d),
            Err(e) => {
                warn!(error = %e, "--cert-expiry is kept by the leading manager; set it there")
            }
        }
    }
    match store.secret(Secret::CertExpiry)? {
        Some(s) => String::from_utf8_lossy(&s)
            .trim()
            .parse()
            .map(Duration::from_secs)
            .context("reading the kept certificate expiry"),
        None => Ok(cfg.cert_expiry.unwrap_or(pki::DEFAULT_CERT_EXPIRY)),
    }
}

/// The cluster CA, from the store (a file store's files, or etcd's keys, where any manager
/// that leads finds it). Made there if there is none and `may_create` (a manager that makes
/// the cluster).
fn cluster_ca(store: &Store, may_create: bool) -> anyhow::Result<Ca> {
    let text = |s: Secret| -> anyhow::Result<Option<String>> {
        Ok(store
            .secret(s)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    };
    if let (Some(cert_pem), Some(key_pem)) = (text(Secret::CaCert)?, text(Secret::CaKey)?) {
        return Ok(Ca { cert_pem, key_pem });
    }
    if !may_create {
        bail!(
            "the store holds no cluster CA: start the first manager with --init, and join the \
             others with the manager token"
        );
    }
    let ca = Ca::generate()?;
    store.put_secret(Secret::CaKey, ca.key_pem.as_bytes())?;
    store.put_secret(Secret::CaCert, ca.cert_pem.as_bytes())?;
    info!("created the cluster CA");
    Ok(ca)
}

/// Where the control endpoint listens: `--listen-addr`, or the advertised address on 2377.
fn control_listen(cfg: &Config, advertise: Ipv4Addr) -> SocketAddr {
    cfg.listen_addr
        .unwrap_or_else(|| SocketAddr::new(advertise.into(), CONTROL_PORT))
}

/// The address other nodes reach the control endpoint at (a wildcard listen address is
/// reached on the advertised one).
fn control_advertised(listen: SocketAddr, advertise: Ipv4Addr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(advertise.into(), listen.port())
    } else {
        listen
    }
}

/// The control endpoint (QUIC, TLS 1.3 with the CA's manager identity, client certificates
/// verified when shown) bound on `listen`.
fn control_endpoint(ca: &Ca, listen: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let identity = ca.manager_identity()?;
    let tls = pki::server_config(ca, &identity)?;
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("QUIC TLS config")?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_cfg.transport_config(wire::transport());
    // An upgrade's predecessor may hold it a moment longer.
    crate::upgrade::patiently(|| quinn::Endpoint::server(server_cfg.clone(), listen))
        .with_context(|| format!("binding the control port {listen} (UDP)"))
}

/// Joins the cluster at `--join` with `--token` if this node holds no certificate yet; keeps
/// the key, the certificate, the CA it trusts and the manager's address.
async fn join_if_new(cfg: &Config, dir: &Path, advertise: Ipv4Addr) -> anyhow::Result<()> {
    if naming::node_cert(dir).exists() {
        return Ok(());
    }
    let (Some(addr), Some(token)) = (cfg.join, cfg.token.as_deref()) else {
        bail!("this node has not joined a cluster: pass --join ADDR --token TOKEN");
    };
    let token = Token::parse(token)?;
    let (id, ca_pem) = worker::join(addr, &token, &cfg.node, advertise, cfg.data_path_port)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    pki::write_private(&naming::node_key(dir), &id.key_pem)?;
    pki::write_private(&naming::node_cert(dir), &id.cert_pem)?;
    pki::write_private(&naming::ca_cert(dir), &ca_pem)?;
    pki::write_private(&naming::manager_addr_file(dir), &addr.to_string())?;
    info!(manager = %addr, "joined the cluster");
    Ok(())
}

/// Whether this manager on etcd makes the cluster (`--init`, or a file-store manager's
/// directory moving to etcd) rather than joining it: it holds no member certificate yet.
fn founds_cluster(cfg: &Config, dir: &Path) -> bool {
    !naming::node_cert(dir).exists() && (cfg.init || naming::ca_key(dir).exists())
}

/// Starts this node as one of the managers that share the state on etcd
/// ([`crate::cluster::candidate`]): the first one (`--init`, or a file-store manager's
/// directory) makes the cluster and leads; the others join with the manager token. Each
/// takes the CA and join secrets from etcd, serves the control endpoint and leads or follows
/// as etcd's election decides.
async fn start_candidate(
    cfg: &Config,
    store: Store,
    pool: Pool,
    advertise: Ipv4Addr,
    shutdown: &CancellationToken,
) -> anyhow::Result<Cluster> {
    let dir = store.dir().to_path_buf();
    let founding = founds_cluster(cfg, &dir);
    let view = if founding {
        // It leads (`run` waited). Imports a file-store manager's state and secrets into an empty etcd.
        View::new(store.load()?)
    } else {
        join_if_new(cfg, &dir, advertise).await?;
        let cert = pki::read(&naming::node_cert(&dir))?;
        if pki::cert_info_pem(&cert).and_then(|c| c.role) != Some(Role::Manager) {
            bail!(
                "this node's certificate is a worker's: --store etcd is for managers (join with \
                 the manager token, or promote the node and let it renew its certificate)"
            );
        }
        View::new(store.read_state()?.unwrap_or_default())
    };
    let ca = cluster_ca(&store, founding)?;
    let tokens = Arc::new(JoinTokens::open(
        &store,
        pki::ca_digest(ca.cert_der()?.as_ref()),
    )?);
    let cert_expiry = cert_expiry(cfg, &store)?;
    let listen = control_listen(cfg, advertise);
    let endpoint = control_endpoint(&ca, listen)?;
    let leader = store.leader().and_then(|l| l.control);
    let (serving, serving_rx) = watch::channel(Serving::Follower { leader });
    tokio::spawn(server::serve(endpoint, serving_rx, shutdown.clone()));
    info!(%listen, "cluster manager listening (QUIC, mutual TLS); leading or following as etcd decides");
    let settings = cfg.clone();
    let candidate = Candidate {
        node: cfg.node.clone(),
        advertise,
        data_port: cfg.data_path_port,
        control: control_advertised(listen, advertise),
        pool,
        state_dir: dir,
        store,
        ca,
        tokens,
        cert_expiry,
        full_snapshots: cfg.control_full_snapshots,
        serving,
        configure: Arc::new(move |m: &Manager| configure(m, &settings)),
    };
    let cluster = candidate.start(view, shutdown.clone());
    if founding {
        // It leads in etcd already (`run` waited); the API answers once it also leads here,
        // so that `cluster join-token` right after the socket appears finds a manager.
        let deadline = tokio::time::Instant::now() + crate::store::etcd::STARTUP_WAIT;
        while !matches!(cluster.mode(), Mode::Manager { .. }) {
            if tokio::time::Instant::now() >= deadline {
                warn!(
                    "founding manager has not taken over yet; the API serves as a follower for now"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(cluster)
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    warn_if_private_mount_ns();
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::upgrade::note_restart();
    // Started by an overlayd being upgraded: it releases the node once we said ready (and
    // forwards until we are up); everything below then starts as on any start, with its
    // underlay sockets, and adopts its tasks.
    let handover = match &cfg.upgrade_from {
        Some(sock) => Some(
            tokio::task::block_in_place(|| crate::upgrade::take_over(sock))
                .context("taking over from the running overlayd")?,
        ),
        None => None,
    };
    let state_dir = cfg.state_dir();
    let socket = cfg.socket();
    let store = match cfg.store {
        StoreKind::File => Store::open(&state_dir)?,
        StoreKind::Etcd => {
            let Some(advertise) = cfg.advertise_addr else {
                bail!("--store etcd is for a cluster's managers: pass --advertise-addr");
            };
            let etcd = cfg.etcd();
            let me = LeaderInfo {
                node: cfg.node.to_string(),
                control: Some(control_advertised(
                    control_listen(&cfg, advertise),
                    advertise,
                )),
            };
            let store = Store::open_etcd(&state_dir, &etcd, &me)?;
            // The manager that makes the cluster must lead; before anything else is bound.
            if founds_cluster(&cfg, &state_dir) {
                store.wait_leading(crate::store::etcd::STARTUP_WAIT).await?;
            }
            info!(endpoints = %etcd.endpoints.join(","), prefix = %etcd.prefix, "the desired state is on etcd");
            store
        }
    };
    // Task namespaces are named after the node (ov-NODE-TASK), and a starting node adopts or
    // removes its leftovers: two live daemons with one node name would destroy each other's tasks.
    let node_lock_path = naming::node_lock(&cfg.node);
    let node_lock = crate::upgrade::patiently(|| {
        crate::store::NameLock::acquire(&node_lock_path)
            .with_context(|| format!("locking {}", node_lock_path.display()))?
            .with_context(|| {
                format!(
                    "node name {} is in use by another overlayd on this machine",
                    cfg.node
                )
            })
    })?;
    let group = socket_group(cfg.socket_group.as_deref())?;
    let listener = crate::upgrade::patiently(|| bind_socket(&socket, group))?;
    let log_dir = naming::logs_dir(&state_dir);
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let upstreams = if cfg.dns_upstreams.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        crate::dns::server::upstreams_from_resolv_conf(&text)
    } else {
        cfg.dns_upstreams.clone()
    };
    info!(?upstreams, "DNS upstream resolvers");
    let dns = Arc::new(crate::dns::server::Shared::new(upstreams));

    let pool = Pool {
        pool: cfg.default_addr_pool.trunc(),
        prefix: cfg.default_addr_pool_mask_length,
    };
    if pool.prefix < pool.pool.prefix_len() {
        bail!(
            "--default-addr-pool-mask-length {} is shorter than the pool {}",
            pool.prefix,
            pool.pool
        );
    }
    let on_etcd = cfg.store == StoreKind::Etcd;
    let is_worker = !on_etcd && (cfg.join.is_some() || naming::node_cert(&state_dir).exists());
    let is_manager = on_etcd || cfg.init || naming::ca_key(&state_dir).exists();
    if is_worker && is_manager {
        bail!(
            "{} holds a manager's CA: this node cannot also join another cluster",
            state_dir.display()
        );
    }
    let (mut handover, handed_underlay) = match handover {
        Some(mut h) => {
            let fds = std::mem::take(&mut h.underlay);
            (Some(h), fds)
        }
        None => (None, vec![]),
    };
    let underlay = match cfg.advertise_addr {
        Some(a) if !handed_underlay.is_empty() => Some(
            Sockets::adopt(a, handed_underlay)
                .context("taking the handed-over underlay sockets")?,
        ),
        Some(a) => Some(
            Sockets::bind(a, cfg.data_path_port, cfg.workers())
                .with_context(|| format!("binding the VXLAN port {a}:{}", cfg.data_path_port))?,
        ),
        None if is_worker || is_manager => bail!("--advertise-addr is needed to run in a cluster"),
        None => None,
    };
    // Copies of the underlay's receiving sockets, for a successor (`upgrade`).
    let underlay_rx: Vec<std::os::fd::OwnedFd> = match &underlay {
        Some(u) => {
            u.rx.iter()
                .map(|s| s.try_clone().map(std::os::fd::OwnedFd::from))
                .collect::<std::io::Result<_>>()
                .context("copying the underlay sockets")?
        }
        None => vec![],
    };
    let shutdown = CancellationToken::new();
    let cluster = match cfg.advertise_addr {
        Some(a) if on_etcd => start_candidate(&cfg, store, pool, a, &shutdown).await?,
        Some(a) if is_worker => start_worker(&cfg, store, a, &shutdown).await?,
        Some(a) if is_manager => start_manager(&cfg, store, pool, a, &shutdown).await?,
        advertise => {
            let view = View::new(Default::default());
            let manager = Manager::open(
                store,
                pool,
                &cfg.node,
                advertise.map(|a| (a, cfg.data_path_port)),
                &view,
            )?;
            configure(&manager, &cfg)?;
            let manager = Arc::new(manager);
            manager.spawn_ticks(shutdown.clone());
            Cluster::new(
                Mode::Manager {
                    manager,
                    join: None,
                },
                view,
            )
        }
    };

    let counters = Arc::new(Counters::default());
    let ingress_counters = Arc::new(crate::ingress::stats::Registry::default());
    let flows = Arc::new(ConnTable::new(cfg.lb_max_flows));
    // The previous run's established flows to VIPs, resumed by their next segment.
    match crate::forward::saved_flows::load(&state_dir) {
        Ok((saved, bad)) => {
            if !saved.is_empty() || bad > 0 {
                info!(
                    flows = saved.len(),
                    unreadable = bad,
                    "resuming the previous run's flows"
                );
            }
            flows.offer_resumable(saved);
        }
        Err(e) => warn!(error = %e, "cannot read the previous run's flows"),
    }
    let esp_epoch = epoch::next(&state_dir)
        .inspect_err(|e| {
            error!(
                "{e}; this node will not send on encrypted networks (their frames are \
                 dropped as esp_no_epoch) until it starts with an epoch it can keep"
            )
        })
        .ok();
    // An upgrade's successor reads the underlay once its tables are up (the agent says).
    let datapath = Datapath::start(
        counters.clone(),
        underlay,
        flows.clone(),
        dns.clone(),
        cfg.workers(),
        esp_epoch,
        Some(state_dir.clone()),
        handover.is_none(),
    )
    .context("starting the datapath thread")?;
    let planes = Planes::new(
        datapath,
        counters.clone(),
        ingress_counters.clone(),
        cfg.ingress_max_connections as usize,
    )
    .context("starting the ingress proxy")?;
    let kept: crate::agent::KeptDatapath = Default::default();
    let agent = Agent::new(
        cfg.node.clone(),
        planes,
        cluster.clone(),
        counters.clone(),
        &state_dir,
        dns.clone(),
        cfg.data_path_port,
    )
    .stop_tasks_on_shutdown(cfg.stop_tasks)
    .with_engine(
        cfg.docker_plugin
            .as_ref()
            .map(|_| cfg.docker_host.as_path()),
    )
    .keep_datapath(kept.clone());
    let agent = match handover.take() {
        Some(h) => {
            // Once the tasks are adopted and the tables published, the predecessor stops
            // forwarding and sends the flows it made meanwhile.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (dir, table) = (state_dir.clone(), flows.clone());
            tokio::spawn(async move {
                if rx.await.is_ok() {
                    if let Ok(f) = tokio::task::spawn_blocking(move || h.up(&dir)).await {
                        info!(flows = f.len(), "took the old overlayd's final flows");
                        table.offer_resumable(f);
                    }
                    // The mesh opened the ports it publishes by now; the rest are no one's.
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    crate::upgrade::drop_unclaimed();
                }
            });
            agent.on_settled(tx)
        }
        None => agent,
    };
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));

    let cluster_for_plugin = cluster.clone();
    let metrics = match cfg.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?;
            let sources = crate::metrics::Sources {
                cluster: cluster.clone(),
                counters: counters.clone(),
                flows: flows.clone(),
                ingress: ingress_counters.clone(),
                dns: dns.clone(),
                node: cfg.node.clone(),
            };
            info!(%addr, "serving metrics at /metrics");
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                sources,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let final_flows = flows.clone();
    let (upgrade_tx, mut upgrade_rx) = tokio::sync::mpsc::channel::<api::UpgradeRequest>(1);
    cluster
        .view()
        .logs
        .set_local(crate::cluster::logs::LocalLogs {
            node: cfg.node.clone(),
            state_dir: state_dir.clone(),
            docker_host: cfg.docker_plugin.as_ref().map(|_| cfg.docker_host.clone()),
        });
    let app = api::router(ApiState {
        upgrade: Some(upgrade_tx),
        cluster,
        counters,
        flows,
        ingress: ingress_counters,
        node: cfg.node.clone(),
        state_dir: state_dir.clone(),
        docker_host: cfg.docker_plugin.as_ref().map(|_| cfg.docker_host.clone()),
    });
    let plugin = match &cfg.docker_plugin {
        Some(path) => {
            let listener = crate::upgrade::patiently(|| bind_socket(path, None))?;
            let plugin = crate::docker::Plugin::new(
                cluster_for_plugin,
                cfg.node.clone(),
                cfg.docker_host.clone(),
                &state_dir,
            );
            let app = plugin
                .router()
                .into_make_service_with_connect_info::<crate::docker::PeerPid>();
            let stop = shutdown.clone();
            info!(socket = %path.display(), "serving Docker's network and IPAM plugin");
            Some(tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
            }))
        }
        None => {
            drop(cluster_for_plugin);
            None
        }
    };
    let api_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(api_shutdown.cancelled_owned())
            .await
    });
    info!(node = %cfg.node, socket = %socket.display(), state_dir = %state_dir.display(), "overlayd ready");

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing SIGUSR2 handler")?;
    let successor = loop {
        let reply = tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break None }
            _ = int.recv() => { info!("SIGINT: shutting down"); break None }
            _ = usr2.recv() => { info!("SIGUSR2: upgrading in place"); None }
            Some(reply) = upgrade_rx.recv() => { info!("upgrading in place (API)"); Some(reply) }
        };
        match crate::upgrade::start_successor(&state_dir).await {
            Ok(next) => {
                info!(pid = next.pid, binary = %next.binary.display(), "the new overlayd is ready: handing over");
                if let Some(r) = reply {
                    let _ = r.send(Ok((next.pid, next.binary.display().to_string())));
                }
                break Some(next);
            }
            Err(e) => {
                error!("upgrade failed, this overlayd goes on serving: {e:#}");
                if let Some(r) = reply {
                    let _ = r.send(Err(format!("{e:#}")));
                }
            }
        }
    };
    // Upgrade requests that came meanwhile are answered now: nothing reads them any more,
    // and their handlers would hold the API server open.
    upgrade_rx.close();
    while let Ok(r) = upgrade_rx.try_recv() {
        let _ = r.send(Err(
            "this overlayd is already stopping or handing over".into()
        ));
    }
    if successor.is_some() {
        // The datapath forwards on until the successor's is up.
        if let Ok(mut k) = kept.lock() {
            k.0 = true;
        }
    }
    shutdown.cancel();
    let _ = agent_task.await;
    // A server lets its open answers finish, and some never do by themselves (a followed
    // log): each gets a moment, then is ended.
    wind_down(server, "the API").await;
    if let Some(m) = metrics {
        wind_down(m, "the metrics server").await;
    }
    let _ = std::fs::remove_file(&socket);
    if let (Some(p), Some(path)) = (plugin, &cfg.docker_plugin) {
        wind_down(p, "the Docker plugin").await;
        let _ = std::fs::remove_file(path);
    }
    drop(node_lock);
    let (kept, kept_ingress) = kept
        .lock()
        .ok()
        .map(|mut k| (k.1.take(), k.2.take()))
        .unwrap_or_default();
    if successor.is_some() {
        // The store is locked while anything of the control plane holds it: let its last
        // tasks end before the successor opens it.
        let lock = crate::naming::state_lock(&state_dir);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while crate::store::lock_exclusive(&lock).ok().flatten().is_none() {
            if tokio::time::Instant::now() >= deadline {
                warn!("the store is still locked by this process; the successor waits for it");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    if let Some(mut next) = successor {
        let drain = (kept_ingress, cfg.upgrade_drain_timeout);
        return finish_handover(
            &mut next,
            underlay_rx,
            kept,
            drain,
            &final_flows,
            &state_dir,
        )
        .await;
    }
    // The datapath has stopped: the flows made since the sweeper's last save are saved
    // too, for the next run to resume.
    save_flows(&state_dir, &final_flows);
    info!("overlayd stopped");
    Ok(())
}

/// How long a server may take to finish its open answers once shutdown began.
const WIND_DOWN: Duration = Duration::from_secs(2);

/// Waits for a server's task to end on its own for [`WIND_DOWN`], then ends it.
async fn wind_down<T>(mut task: tokio::task::JoinHandle<T>, what: &str) {
    if tokio::time::timeout(WIND_DOWN, &mut task).await.is_err() {
        info!("{what} still had answers open (a followed log?): ending them");
        task.abort();
        let _ = task.await;
    }
}

/// Saves the table's established flows in `dir` (`forward::saved_flows`).
fn save_flows(dir: &Path, flows: &ConnTable) {
    let established = flows.established();
    if established.is_empty() {
        return;
    }
    let saved = std::fs::create_dir_all(dir)
        .and_then(|()| crate::forward::saved_flows::save(dir, &established));
    if let Err(e) = saved {
        warn!(error = %e, "cannot save the established flows");
    }
}

/// The end of an upgrade, once this process stopped all but its datapath (`kept`) and let
/// go of its locks and sockets: hands the underlay sockets over, forwards until the
/// successor is up, then stops, saves the flows it made meanwhile for it, and returns (the
/// process exits). If the successor fails before it is up, this process starts afresh from
/// its own binary, as a restart would.
async fn finish_handover(
    next: &mut crate::upgrade::Successor,
    underlay_rx: Vec<std::os::fd::OwnedFd>,
    kept: Option<Datapath>,
    (mut ingress, drain_timeout): (Option<crate::ingress::Ingress>, Duration),
    flows: &ConnTable,
    state_dir: &Path,
) -> anyhow::Result<()> {
    // The link over which the successor's proxy passes this one's connections' segments
    // (and sends its frames) while they drain.
    let drain = match (&ingress, crate::ingress::link::pair()) {
        (Some(_), Ok(pair)) => Some(pair),
        (Some(_), Err(e)) => {
            warn!(error = %e, "no drain link: the mesh's established connections end here");
            None
        }
        (None, _) => None,
    };
    let handed = next.release(&underlay_rx, drain.as_ref().map(|(_, theirs)| theirs));
    drop(underlay_rx);
    let mine = drain.map(|(mine, _theirs)| mine);
    let up = match handed {
        Ok(()) => next.wait_up().await,
        Err(e) => Err(e),
    };
    let started = std::time::Instant::now();
    match (&up, &ingress, mine) {
        (Ok(true), Some(i), Some(mine)) => i.relink(mine),
        _ => {
            if let Some(mut i) = ingress.take() {
                i.stop();
            }
        }
    }
    drop(kept);
    match up {
        Ok(true) => {
            save_flows(&crate::upgrade::final_flows_dir(state_dir), flows);
            next.flows_saved().await;
            info!(stopped_in = ?started.elapsed(), "handed over to the new overlayd");
            if let Some(mut i) = ingress {
                let drained =
                    tokio::task::spawn_blocking(move || i.wait_drained(drain_timeout)).await;
                match drained {
                    Ok(true) => info!(after = ?started.elapsed(), "mesh connections drained"),
                    _ => warn!(
                        timeout = ?drain_timeout,
                        "mesh connections still open at the drain timeout: reset"
                    ),
                }
            }
            info!("overlayd stopped");
            Ok(())
        }
        Ok(false) => {
            save_flows(state_dir, flows);
            warn!(
                pid = next.pid,
                "the new overlayd runs but is not up yet (no state from its manager): it keeps \
                 the node; overlayd stopped"
            );
            Ok(())
        }
        Err(e) => {
            error!("upgrade failed after this overlayd let go of the node: {e:#}; starting again from this binary");
            save_flows(state_dir, flows);
            let e = crate::upgrade::restart_self();
            bail!("starting again: {e}")
        }
    }
}

/// The manager's settings from the command line.
fn configure(manager: &Manager, cfg: &Config) -> anyhow::Result<()> {
    manager.set_key_rotation(cfg.key_rotation_interval);
    manager.set_reschedule_after(cfg.reschedule_after);
    manager
        .set_task_history_limit(cfg.task_history_limit)
        .map_err(|e| anyhow::anyhow!("setting the task history limit: {e}"))
}
