//! `overlayd --metrics-addr ADDR`: what the node does, as OpenMetrics text for Prometheus
//! (`GET /metrics`), encoded by the `prometheus-client` crate; and the cluster map in the
//! browser at `/` ([`map`]).
//!
//! Nothing here is counted on its own: every value is read at scrape time from the counters
//! the node already keeps for `overlayctl stats` (the datapath's per-worker frame counts on
//! cache lines of their own, drops by reason, the load balancer's per-service counters, the
//! routing mesh's per-port counters), from the cluster view the agent follows, and from
//! `/proc/self`. So scraping costs the data path nothing, and a metric cannot disagree with
//! `overlayctl stats`. Label values come from bounded sets only: workers, drop reasons,
//! services, backends (task addresses), published ports, task states, node health, never a
//! client's address.

pub mod map;

use crate::cluster::{Cluster, Mode};
use crate::dns::server::Shared as DnsShared;
use crate::ingress::stats::Registry as IngressRegistry;
use datapath::conntrack::{BackendCounters, ConnTable};
use datapath::stats::Counters;
use datapath::stats::BATCH_BOUNDS;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use protocol::api::{DatapathStats, TaskState};
use protocol::control::NodeHealth;
use protocol::types::NodeName;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Error;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The content type of an OpenMetrics exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Where the node's metrics are read from at each scrape.
#[derive(Clone)]
pub struct Sources {
    pub cluster: Cluster,
    pub counters: Arc<Counters>,
    /// The load balancer's connection table (what live flows moved).
    pub flows: Arc<ConnTable>,
    pub ingress: Arc<IngressRegistry>,
    /// The resolvers' shared state, with their counters.
    pub dns: Arc<DnsShared>,
    pub node: NodeName,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").field("node", &self.node).finish()
    }
}

/// The exposition of everything in [`Sources`], as served at `/metrics`.
pub fn render(sources: &Sources) -> Result<String, Error> {
    let mut registry = Registry::with_prefix("overlay");
    // One reading of the datapath's counters serves both of its collectors.
    let stats = Arc::new(sources.counters.snapshot());
    registry.register_collector(Box::new(Datapath(stats.clone())));
    registry.register_collector(Box::new(Balancer {
        stats,
        moved: backend_moved(&sources.counters, &sources.flows),
    }));
    registry.register_collector(Box::new(Mesh(sources.clone())));
    registry.register_collector(Box::new(Dns(sources.clone())));
    registry.register_collector(Box::new(Control(sources.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    // The process's own figures carry the standard names (no prefix), as every Prometheus
    // client's process collector writes them; appended before the exposition's `# EOF`.
    let mut process = Registry::default();
    process.register_collector(Box::new(Process));
    let mut rest = String::new();
    prometheus_client::encoding::text::encode(&mut rest, &process)?;
    if let Some(body) = text.strip_suffix("# EOF\n") {
        let mut joined = body.to_string();
        joined.push_str(&rest);
        return Ok(joined);
    }
    Ok(text)
}

/// One family: a name, its help, an optional unit and its samples by label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), Error> {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let kind = first.metric_type();
    let mut family = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, metric) in samples {
        if labels.is_empty() {
            // A family without labels has one sample.
            return metric.encode(family);
        }
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

fn one(v: bool) -> ConstGauge<i64> {
    ConstGauge::new(i64::from(v))
}

/// A histogram of batch sizes read from the datapath's buckets ([`datapath::stats::Batches`]).
#[derive(Debug)]
struct BatchHistogram(protocol::api::BatchStats);

impl EncodeMetric for BatchHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), Error> {
        // Per bucket, not cumulative: the encoder sums them; the last bound is f64::MAX,
        // which it writes as +Inf (as the crate's own histogram does).
        let mut buckets: Vec<(f64, u64)> = Vec::new();
        for (i, n) in self.0.buckets.iter().enumerate() {
            let bound = BATCH_BOUNDS.get(i).map_or(f64::MAX, |b| *b as f64);
            buckets.push((bound, *n));
        }
        if buckets.last().is_none_or(|(b, _)| *b != f64::MAX) {
            buckets.push((f64::MAX, 0));
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.0.items as f64,
            count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Frames moved and dropped by the datapath.
#[derive(Debug)]
struct Datapath(Arc<DatapathStats>);

impl Collector for Datapath {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), Error> {
        let s = &self.0;
        let per_worker = |f: fn(&protocol::api::WorkerStats) -> u64| {
            s.workers
                .iter()
                .enumerate()
                .map(move |(i, w)| (vec![("worker", i.to_string())], counter(f(w))))
        };
        family(
            &mut e,
            "datapath_received_frames",
            "Frames the datapath read (from TAPs and the underlay), per worker.",
            None,
            per_worker(|w| w.rx_frames),
        )?;
        family(
            &mut e,
            "datapath_sent_frames",
            "Frames the datapath wrote (to TAPs and the underlay), per worker.",
            None,
            per_worker(|w| w.tx_frames),
        )?;
        family(
            &mut e,
            "underlay_received_datagrams",
            "VXLAN and ESP datagrams received from other nodes and VTEPs, per worker.",
            None,
            per_worker(|w| w.underlay_rx),
        )?;
        family(
            &mut e,
            "underlay_received",
            "Bytes of those datagrams (UDP payload), per worker.",
            Some(&Unit::Bytes),
            per_worker(|w| w.underlay_rx_bytes),
        )?;
        family(
            &mut e,
            "underlay_sent_datagrams",
            "VXLAN and ESP datagrams sent to other nodes and VTEPs, per worker.",
            None,
            per_worker(|w| w.underlay_tx),
        )?;
        family(
            &mut e,
            "underlay_sent",
            "Bytes of those datagrams (UDP payload), per worker.",
            Some(&Unit::Bytes),
            per_worker(|w| w.underlay_tx_bytes),
        )?;
        family(
            &mut e,
            "underlay_gso_datagrams_per_send",
            "Datagrams per underlay send (UDP GSO: one system call for a run to one VTEP), per worker.",
            None,
            s.workers.iter().enumerate().map(|(i, w)| {
                (vec![("worker", i.to_string())], BatchHistogram(w.gso.clone()))
            }),
        )?;
        family(
            &mut e,
            "datapath_gro_segments_per_frame",
            "Segments per frame written to a task's interface by the userspace GRO (merged runs only), per worker.",
            None,
            s.workers.iter().enumerate().map(|(i, w)| {
                (vec![("worker", i.to_string())], BatchHistogram(w.gro.clone()))
            }),
        )?;
        let per_network = |f: fn(&protocol::api::NetworkLaneStats) -> u64| {
            s.networks.iter().flat_map(move |(net, lanes)| {
                lanes.iter().enumerate().map(move |(i, l)| {
                    (
                        vec![("network", net.clone()), ("worker", i.to_string())],
                        counter(f(l)),
                    )
                })
            })
        };
        family(
            &mut e,
            "network_received_frames",
            "Frames read from a network's local interfaces (its tasks, containers and the ingress endpoint), per worker; a super-frame counts once.",
            None,
            per_network(|l| l.from_ports),
        )?;
        family(
            &mut e,
            "network_received",
            "Bytes of those frames (Ethernet frames, without the virtio-net header).",
            Some(&Unit::Bytes),
            per_network(|l| l.from_ports_bytes),
        )?;
        family(
            &mut e,
            "network_sent_frames",
            "Frames written to a network's local interfaces, per worker; a merged (GRO) frame counts once.",
            None,
            per_network(|l| l.to_ports),
        )?;
        family(
            &mut e,
            "network_sent",
            "Bytes of those frames.",
            Some(&Unit::Bytes),
            per_network(|l| l.to_ports_bytes),
        )?;
        family(
            &mut e,
            "datapath_dropped_frames",
            "Frames the datapath did not deliver, by reason.",
            None,
            s.drops
                .iter()
                .map(|(reason, n)| (vec![("reason", reason.clone())], counter(*n))),
        )?;
        family(
            &mut e,
            "datapath_replies",
            "Frames the router answered itself (ARP, gateway ping, VIP).",
            None,
            [(vec![], counter(s.replies))],
        )?;
        family(
            &mut e,
            "datapath_flooded_frames",
            "Frames flooded to every port of a network (unknown unicast, broadcast).",
            None,
            [(vec![], counter(s.flooded))],
        )?;
        family(
            &mut e,
            "esp_sealed_datagrams",
            "ESP datagrams sealed for encrypted networks.",
            None,
            [(vec![], counter(s.esp_sealed))],
        )?;
        family(
            &mut e,
            "esp_opened_datagrams",
            "ESP datagrams opened (their tag checked, their sequence number new); the others are drops by reason (esp_*).",
            None,
            [(vec![], counter(s.esp_opened))],
        )?;
        family(
            &mut e,
            "esp_receive_states_evicted",
            "ESP receiving states (a sender's key and replay window) forgotten to stay within the bound.",
            None,
            [(vec![], counter(s.esp_evicted))],
        )
    }
}

/// Frames and bytes each backend's flows moved (both ways), by service and backend: its
/// ended flows' (kept in its counters) and its live flows' (read from the table, one walk).
fn backend_moved(counters: &Counters, flows: &ConnTable) -> BTreeMap<(String, String), (u64, u64)> {
    let backends = counters.lb.backends();
    let mut live: HashMap<*const BackendCounters, (u64, u64)> = HashMap::new();
    flows.visit(|f| {
        let ((f1, b1), (f2, b2)) = f.moved();
        let e = live.entry(Arc::as_ptr(&f.backend_counts)).or_default();
        e.0 += f1 + f2;
        e.1 += b1 + b2;
    });
    backends
        .into_iter()
        .map(|(service, ip, c)| {
            let (frames, bytes) = live.get(&Arc::as_ptr(&c)).copied().unwrap_or_default();
            let ended = (
                c.ended_frames.load(Ordering::Relaxed),
                c.ended_bytes.load(Ordering::Relaxed),
            );
            (
                (service, ip.to_string()),
                (ended.0 + frames, ended.1 + bytes),
            )
        })
        .collect()
}

/// The load balancer's flows per service (this node's clients).
#[derive(Debug)]
struct Balancer {
    stats: Arc<DatapathStats>,
    moved: BTreeMap<(String, String), (u64, u64)>,
}

impl Collector for Balancer {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), Error> {
        let moved = |bytes: bool| {
            self.moved.iter().map(move |((service, backend), (f, b))| {
                (
                    vec![("service", service.clone()), ("backend", backend.clone())],
                    counter(if bytes { *b } else { *f }),
                )
            })
        };
        family(
            &mut e,
            "lb_backend_frames",
            "Frames of load-balanced flows to and from each backend task, both ways (a super-frame counts once).",
            None,
            moved(false),
        )?;
        family(
            &mut e,
            "lb_backend",
            "Bytes of load-balanced flows to and from each backend task, both ways (whole Ethernet frames).",
            Some(&Unit::Bytes),
            moved(true),
        )?;
        let services = &self.stats.services;
        let by = |f: fn(&protocol::api::ServiceLbStats) -> u64| {
            services
                .iter()
                .map(move |(name, s)| (vec![("service", name.clone())], f(s)))
        };
        family(
            &mut e,
            "lb_active_flows",
            "Load-balanced flows in the connection table now, per service.",
            None,
            by(|s| s.active_flows).map(|(l, v)| (l, gauge(v))),
        )?;
        family(
            &mut e,
            "lb_new_flows",
            "Load-balanced flows created, per service.",
            None,
            by(|s| s.new_flows).map(|(l, v)| (l, counter(v))),
        )?;
        family(
            &mut e,
            "lb_refused_flows",
            "New flows refused because the connection table was full, per service.",
            None,
            by(|s| s.refused_flows).map(|(l, v)| (l, counter(v))),
        )?;
        family(
            &mut e,
            "lb_backend_active_flows",
            "Load-balanced flows to each backend task now.",
            None,
            services.iter().flat_map(|(name, s)| {
                s.backends.iter().map(move |(backend, n)| {
                    (
                        vec![("service", name.clone()), ("backend", backend.clone())],
                        gauge(*n),
                    )
                })
            }),
        )
    }
}

/// The routing mesh, per published port.
#[derive(Debug)]
struct Mesh(Sources);

impl Collector for Mesh {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), Error> {
        let ports = self.0.ingress.snapshot();
        let labels = |port: &str, p: &protocol::api::IngressPortStats| {
            vec![
                ("port", port.to_string()),
                ("service", p.service.clone()),
                ("mode", p.mode.clone()),
            ]
        };
        let series = |f: fn(&protocol::api::IngressPortStats) -> u64| {
            ports.iter().map(move |(port, p)| (labels(port, p), f(p)))
        };
        family(
            &mut e,
            "mesh_listening",
            "Whether the node listens on the published port (1) or could not open it (0).",
            None,
            ports
                .iter()
                .map(|(port, p)| (labels(port, p), one(p.listening))),
        )?;
        family(
            &mut e,
            "mesh_open_connections",
            "Routing-mesh connections (TCP) or client mappings (UDP) open now.",
            None,
            series(|p| p.active).map(|(l, v)| (l, gauge(v))),
        )?;
        for (name, help, f) in [
            (
                "mesh_accepted_connections",
                "Connections accepted (TCP) or client mappings made (UDP).",
                (|p| p.accepted) as fn(&protocol::api::IngressPortStats) -> u64,
            ),
            (
                "mesh_refused_connections",
                "Connections refused: no task to send to, or too many open.",
                |p| p.refused,
            ),
            (
                "mesh_reset_connections",
                "Connections ended by a reset (either side, or their task left).",
                |p| p.reset,
            ),
            (
                "mesh_dropped_datagrams",
                "UDP datagrams that could not be queued.",
                |p| p.dropped,
            ),
            (
                "mesh_evicted_mappings",
                "UDP client mappings ended to make room for a new client.",
                |p| p.evicted,
            ),
            (
                "mesh_received_bytes",
                "Payload bytes from clients to tasks (TCP stream, UDP datagrams).",
                |p| p.bytes_in,
            ),
            (
                "mesh_sent_bytes",
                "Payload bytes from tasks back to clients.",
                |p| p.bytes_out,
            ),
        ] {
            family(
                &mut e,
                name,
                help,
                None,
                series(f).map(|(l, v)| (l, counter(v))),
            )?;
        }
        Ok(())
    }
}

/// The embedded resolvers (every task's and the gateways').
#[derive(Debug)]
struct Dns(Sources);

impl Collector for Dns {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), Error> {
        let stats = &self.0.dns.stats;
        family(
            &mut e,
            "dns_queries",
            "Queries to the embedded resolvers, by question type and outcome.",
            None,
            stats.queries().map(|(t, o, n)| {
                (
                    vec![("type", t.to_string()), ("outcome", o.label().to_string())],
                    counter(n),
                )
            }),
        )?;
        let upstream = e.encode_descriptor(
            "dns_upstream_duration",
            "Time upstream resolvers took to answer a forwarded query.",
            Some(&Unit::Seconds),
            stats.upstream.metric_type(),
        )?;
        stats.upstream.encode(upstream)
    }
}

/// The control plane as this node sees it.
#[derive(Debug)]
struct Control(Sources);

impl Collector for Control {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), Error> {
        let cluster = &self.0.cluster;
        let leading = matches!(cluster.mode(), Mode::Manager { .. });
        family(
            &mut e,
            "node_info",
            "This node: its name and overlayd's version.",
            None,
            [(
                vec![
                    ("node", self.0.node.to_string()),
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                ],
                one(true),
            )],
        )?;
        family(
            &mut e,
            "control_leading",
            "Whether this node holds the desired state (the leading manager, or standalone).",
            None,
            [(vec![], one(leading))],
        )?;
        family(
            &mut e,
            "control_manager_reachable",
            "Whether this node reaches a manager now (a leading manager always does).",
            None,
            [(vec![], one(cluster.manager_reachable()))],
        )?;
        // A follower's state is as old as the last push it received; a leader's is current.
        let age = match cluster.mode() {
            Mode::Manager { .. } => Some(0.0),
            Mode::Worker(link) => link.since_last_push().map(|d| d.as_secs_f64()),
        };
        if let Some(age) = age {
            family(
                &mut e,
                "control_snapshot_age",
                "Time since this node last received the desired state from a manager (0 on the leader).",
                Some(&Unit::Seconds),
                [(vec![], ConstGauge::new(age))],
            )?;
        }
        let snapshot = cluster.snapshot();
        family(
            &mut e,
            "control_state_revision",
            "The revision of the desired state this node follows.",
            None,
            [(vec![], gauge(snapshot.state.revision))],
        )?;
        // The board holds every node's reports while this node leads: count the tasks the
        // desired state places here, by what this node reported of them.
        let mut own = by_state();
        if let Ok(board) = cluster.local_board().read() {
            for (name, task) in &snapshot.state.tasks {
                if task.node != self.0.node {
                    continue;
                }
                if let Some(entry) = board.get(name).filter(|e| e.id == task.id) {
                    *own.entry(entry.status.state.to_string()).or_default() += 1;
                }
            }
        }
        family(
            &mut e,
            "node_tasks",
            "This node's tasks in the desired state, by the state it reports.",
            None,
            own.iter()
                .map(|(s, n)| (vec![("state", s.to_string())], gauge(*n))),
        )?;
        // Cluster-wide figures from the leader only, so that summing over nodes counts each
        // node and task once.
        if !leading {
            return Ok(());
        }
        let mut health: BTreeMap<&str, u64> = BTreeMap::from([("ready", 0), ("down", 0)]);
        for h in snapshot.health.values() {
            let key = match h {
                NodeHealth::Ready => "ready",
                NodeHealth::Down => "down",
            };
            *health.entry(key).or_default() += 1;
        }
        family(
            &mut e,
            "cluster_nodes",
            "The cluster's nodes by health (from the leading manager).",
            None,
            health
                .iter()
                .map(|(h, n)| (vec![("health", h.to_string())], gauge(*n))),
        )?;
        let mut tasks = by_state();
        for (_, status) in snapshot.statuses.values() {
            *tasks.entry(status.state.to_string()).or_default() += 1;
        }
        family(
            &mut e,
            "cluster_tasks",
            "The cluster's tasks by last reported state (from the leading manager).",
            None,
            tasks
                .iter()
                .map(|(s, n)| (vec![("state", s.to_string())], gauge(*n))),
        )?;
        family(
            &mut e,
            "cluster_services",
            "Services in the desired state (from the leading manager).",
            None,
            [(vec![], gauge(snapshot.state.services.len() as u64))],
        )
    }
}

/// A count per task state, every state present (zero until seen), so that a query over one
/// state finds a series.
fn by_state() -> BTreeMap<String, u64> {
    [
        TaskState::Pending,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Failed,
        TaskState::Shutdown,
        TaskState::Unknown,
    ]
    .iter()
    .map(|s| (s.to_string(), 0))
    .collect()
}

/// The process: resident memory, open file descriptors, threads, CPU time (`/proc/self`).
#[derive(Debug)]
struct Process;

impl Collector for Process {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), Error> {
        let stat = ProcStat::read();
        let fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        family(
            &mut e,
            "process_resident_memory",
            "Resident memory size.",
            Some(&Unit::Bytes),
            [(vec![], gauge(stat.rss_bytes))],
        )?;
        family(
            &mut e,
            "process_open_fds",
            "Open file descriptors.",
            None,
            [(vec![], gauge(fds))],
        )?;
        family(
            &mut e,
            "process_threads",
            "Threads of the process.",
            None,
            [(vec![], gauge(stat.threads))],
        )?;
        family(
            &mut e,
            "process_cpu",
            "User and system CPU time spent.",
            Some(&Unit::Seconds),
            [(vec![], ConstCounter::new(stat.cpu_seconds))],
        )
    }
}

/// What the process collector reads from `/proc/self/stat` (proc(5)).
#[derive(Debug, Default, PartialEq)]
struct ProcStat {
    rss_bytes: u64,
    threads: u64,
    cpu_seconds: f64,
}

impl ProcStat {
    fn read() -> ProcStat {
        std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| ProcStat::parse(&s, page_size(), ticks_per_second()))
            .unwrap_or_default()
    }

    /// Fields after the command (which may hold spaces and parentheses): utime is the 14th
    /// field of the line, stime the 15th, num_threads the 20th, rss (pages) the 24th.
    fn parse(line: &str, page: u64, ticks: u64) -> Option<ProcStat> {
        let rest = &line[line.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
        Some(ProcStat {
            rss_bytes: field(24)? * page,
            threads: field(20)?,
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks.max(1) as f64,
        })
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).unwrap_or(4096)
}

fn ticks_per_second() -> u64 {
    // SAFETY: as above.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(v).unwrap_or(100)
}

/// The content type of the classic Prometheus text format.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The same exposition in the classic Prometheus text format (0.0.4), for clients that do
/// not ask for OpenMetrics (curl, `promtool check metrics`, older scrapers), as the Go
/// client does: a counter's HELP and TYPE name its sample (`..._total`), no `# UNIT`, no
/// `# EOF`.
pub fn to_classic(open_metrics: &str) -> String {
    let mut out = String::with_capacity(open_metrics.len());
    let mut lines = open_metrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let counter = lines
                .peek()
                .is_some_and(|t| *t == format!("# TYPE {name} counter"));
            let name = if counter {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            out.push_str(&format!("# HELP {name} {help}\n"));
            if counter {
                lines.next();
                out.push_str(&format!("# TYPE {name} counter\n"));
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Serves `GET /metrics` on `listener` until `stop` (OpenMetrics to a client that accepts
/// it, as Prometheus does; the classic text format otherwise), and the cluster map at `/`
/// with its data at `/map.json` ([`map`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    sources: Sources,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let sources_for_map = sources.clone();
    let handler = move |headers: axum::http::HeaderMap| {
        let sources = sources.clone();
        async move {
            let open_metrics = headers
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            match render(&sources) {
                Ok(text) if open_metrics => {
                    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
                }
                Ok(text) => (
                    [(header::CONTENT_TYPE, CLASSIC_CONTENT_TYPE)],
                    to_classic(&text),
                )
                    .into_response(),
                Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
            }
        }
    };
    let sampler = Arc::new(map::Sampler::default());
    let sampling = {
        let (sampler, sources, stop) = (sampler.clone(), sources_for_map.clone(), stop.clone());
        async move {
            let mut every = tokio::time::interval(map::SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = every.tick() => sampler.sample(&sources),
                    _ = stop.cancelled() => return,
                }
            }
        }
    };
    tokio::spawn(sampling);
    let map_sources = sources_for_map;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(handler))
        .route(
            "/",
            axum::routing::get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    map::PAGE,
                )
            }),
        )
        .route(
            "/map.json",
            axum::routing::get(move || {
                let (sources, sampler) = (map_sources.clone(), sampler.clone());
                async move { axum::Json(map::view(&sources, &sampler)) }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A standalone manager's exposition: every family named as documented, label values
    /// from the counters, one `# EOF` at the end.
    #[test]
    fn a_standalone_node_exposes_its_counters() {
        let (m, view, dir) = crate::manager::standalone_for_test("metrics");
        let me = NodeName::new("n1").unwrap();
        let cluster = Cluster::new(
            Mode::Manager {
                manager: Arc::new(m),
                join: None,
            },
            view,
        );
        let counters = Arc::new(Counters::default());
        counters
            .lb
            .service("web")
            .new_flows
            .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        // A live flow to backend 10.0.0.5 that moved 2 frames out and 1 back, and an ended
        // flow's 10 frames of 1000 bytes.
        let flows = Arc::new(ConnTable::new(16));
        let backend = counters.lb.backend("web", "10.0.0.5".parse().unwrap());
        backend.ended_frames.fetch_add(10, Ordering::Relaxed);
        backend.ended_bytes.fetch_add(1000, Ordering::Relaxed);
        let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
        let flow = flows
            .insert(datapath::conntrack::Flow::new(
                datapath::conntrack::FlowKey {
                    vni: 4097,
                    proto: datapath::nat::PROTO_TCP,
                    src: ip("10.0.0.9"),
                    sport: 40000,
                    dst: ip("10.0.0.2"),
                    dport: 80,
                },
                protocol::types::MacAddr::from_ipv4(ip("10.0.0.2")),
                protocol::types::MacAddr::from_ipv4(ip("10.0.0.9")),
                datapath::vocab::PortId(1),
                (
                    ip("10.0.0.5"),
                    protocol::types::MacAddr::from_ipv4(ip("10.0.0.5")),
                    datapath::vocab::Location::Local(datapath::vocab::PortId(2)),
                ),
                1000,
                counters.lb.service("web"),
                backend,
                0,
            ))
            .unwrap();
        flow.count(datapath::conntrack::Dir::ToBackend, 74);
        flow.count(datapath::conntrack::Dir::ToBackend, 66);
        flow.count(datapath::conntrack::Dir::ToClient, 60);
        // A network's frames on worker 1, and worker 0's underlay sends: one run of 3.
        let net = counters.nets.network(4097);
        datapath::stats::bump(&net.lane(1).from_ports, 2);
        counters.nets.name([(4097, "demo".to_string())]);
        let w = counters.worker(0);
        datapath::stats::bump(&w.tx_frames, 3);
        datapath::stats::bump(&w.underlay_tx, 3);
        w.gso.record(3);
        let ingress = Arc::new(IngressRegistry::default());
        let port = ingress.port("8080/tcp", "web", "ingress");
        port.accepted
            .fetch_add(5, std::sync::atomic::Ordering::Relaxed);
        let dns = Arc::new(DnsShared::new(Vec::new()));
        dns.stats
            .count(b"\x01", crate::dns::stats::Outcome::Dropped);
        let text = render(&Sources {
            cluster,
            counters,
            flows,
            ingress,
            dns,
            node: me,
        })
        .unwrap();
        for line in [
            "overlay_lb_new_flows_total{service=\"web\"} 4",
            "overlay_lb_backend_frames_total{service=\"web\",backend=\"10.0.0.5\"} 13",
            "overlay_lb_backend_bytes_total{service=\"web\",backend=\"10.0.0.5\"} 1200",
            "overlay_network_received_frames_total{network=\"demo\",worker=\"1\"} 2",
            "overlay_network_received_frames_total{network=\"demo\",worker=\"0\"} 0",
            "overlay_underlay_sent_datagrams_total{worker=\"0\"} 3",
            "overlay_underlay_gso_datagrams_per_send_bucket{le=\"2.0\",worker=\"0\"} 0",
            "overlay_underlay_gso_datagrams_per_send_bucket{le=\"4.0\",worker=\"0\"} 1",
            "overlay_underlay_gso_datagrams_per_send_bucket{le=\"+Inf\",worker=\"0\"} 1",
            "overlay_underlay_gso_datagrams_per_send_sum{worker=\"0\"} 3.0",
            "overlay_mesh_accepted_connections_total{port=\"8080/tcp\",service=\"web\",mode=\"ingress\"} 5",
            "overlay_control_leading 1",
            "overlay_dns_queries_total{type=\"other\",outcome=\"dropped\"} 1",
            "overlay_dns_upstream_duration_seconds_count 0",
            "overlay_node_tasks{state=\"running\"} 0",
            "# TYPE process_resident_memory_bytes gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
        let classic = to_classic(&text);
        for line in [
            "# HELP overlay_lb_new_flows_total Load-balanced flows created, per service.",
            "# TYPE overlay_lb_new_flows_total counter",
            "overlay_lb_new_flows_total{service=\"web\"} 4",
            "# TYPE overlay_lb_active_flows gauge",
        ] {
            assert!(
                classic.lines().any(|l| l == line),
                "no {line:?} in\n{classic}"
            );
        }
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn proc_stat_reads_fields_after_a_command_with_spaces() {
        let line = "4242 (over (lay) d) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    7 0 1000 123456789 3000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let s = ProcStat::parse(line, 4096, 100).unwrap();
        assert_eq!(
            s,
            ProcStat {
                rss_bytes: 3000 * 4096,
                threads: 7,
                cpu_seconds: 3.0,
            }
        );
        assert_eq!(ProcStat::parse("garbage", 4096, 100), None);
    }
}
