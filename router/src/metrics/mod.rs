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
use datapath::stats::Counters;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use protocol::api::{DatapathStats, TaskState};
use protocol::control::NodeHealth;
use protocol::types::NodeName;
use std::collections::BTreeMap;
use std::fmt::Error;
use std::sync::Arc;

/// The content type of an OpenMetrics exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Where the node's metrics are read from at each scrape.
#[derive(Clone)]
pub struct Sources {
    pub cluster: Cluster,
    pub counters: Arc<Counters>,
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
    registry.register_collector(Box::new(Balancer(stats)));
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

/// Frames moved and dropped by the datapath.
#[derive(Debug)]
struct Datapath(Arc<DatapathStats>);

impl Collector for Datapath {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), Error> {
        let s = &self.0;
        let per_worker = |rx: bool| {
            s.workers.iter().enumerate().map(move |(i, w)| {
                let v = if rx { w.rx_frames } else { w.tx_frames };
                (vec![("worker", i.to_string())], counter(v))
            })
        };
        family(
            &mut e,
            "datapath_received_frames",
            "Frames the datapath read (from TAPs and the underlay), per worker.",
            None,
            per_worker(true),
        )?;
        family(
            &mut e,
            "datapath_sent_frames",
            "Frames the datapath wrote (to TAPs and the underlay), per worker.",
            None,
            per_worker(false),
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

/// The load balancer's flows per service (this node's clients).
#[derive(Debug)]
struct Balancer(Arc<DatapathStats>);

impl Collector for Balancer {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), Error> {
        let services = &self.0.services;
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
            ingress,
            dns,
            node: me,
        })
        .unwrap();
        for line in [
            "overlay_lb_new_flows_total{service=\"web\"} 3",
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
            "overlay_lb_new_flows_total{service=\"web\"} 3",
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
