//! A task's interfaces: TAP devices created inside the task's namespace and configured over
//! netlink (rtnetlink), so no `ip` binary is needed at run time.

use super::{netns, tap};
use futures::TryStreamExt;
use protocol::types::MacAddr;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;

/// One interface to make in a task's namespace.
#[derive(Debug, Clone)]
pub struct IfaceSpec {
    pub name: String,
    pub mac: MacAddr,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The network's MTU (1450 unless `com.docker.network.driver.mtu` says otherwise).
    pub mtu: u16,
    /// Default route via this gateway (set on the first interface only).
    pub gateway: Option<Ipv4Addr>,
}

/// How long a TAP lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// As long as its namespace ([`tap::persist`]), or until made non-persistent again: a
    /// task's (process or image task), which outlives overlayd and is attached to again by
    /// the next run.
    Persistent,
    /// As long as overlayd holds one of its fds: a container endpoint's, made again by the
    /// next run.
    WithFds,
}

/// Creates the TAPs of `specs` inside the namespace at `ns`, with `queues` queues each and
/// the given lifetime, configures them (MTU, MAC, address, up, default route) and brings `lo`
/// up. Returns each TAP's queue fds in `specs` order.
pub fn create_task_ifaces(
    ns: &Path,
    specs: Vec<IfaceSpec>,
    queues: usize,
    lifetime: Lifetime,
) -> io::Result<Vec<Vec<OwnedFd>>> {
    netns::run_in(ns, move || {
        let fds = specs
            .iter()
            .map(|s| tap::create(&s.name, queues))
            .collect::<io::Result<Vec<_>>>()?;
        let persistent = fds
            .iter()
            .zip(&specs)
            .filter(|_| lifetime == Lifetime::Persistent);
        for (queues, s) in persistent {
            if let Some(first) = queues.first() {
                tap::persist(first).map_err(|e| io::Error::other(format!("{}: {e}", s.name)))?;
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(configure(&specs))?;
        Ok(fds)
    })
}

/// Attaches again to the persistent TAPs `names` a previous overlayd made in the namespace at
/// `ns` (a task it re-adopts), with `queues` queues each: their address, MAC and routes are
/// the kernel's and stay as they were. Returns each TAP's queue fds in `names` order.
pub fn reopen_task_ifaces(
    ns: &Path,
    names: Vec<String>,
    queues: usize,
) -> io::Result<Vec<Vec<OwnedFd>>> {
    netns::run_in(ns, move || {
        names
            .iter()
            .map(|n| {
                // Attaching by name would make a new, bare TAP if it were gone.
                if !exists(n) {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no interface {n}"),
                    ));
                }
                tap::create(n, queues).map_err(|e| io::Error::other(format!("{n}: {e}")))
            })
            .collect()
    })
}

/// Whether interface `name` exists in the calling thread's network namespace (the socket
/// `if_nametoindex` opens is made in it; `/sys` would show the mounter's).
fn exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Attaches again to the persistent TAPs a previous overlayd made for an image task, which
/// Docker moved into the container whose network namespace is at `ns` and renamed (eth0,
/// eth1, ...): each is found by its MAC (`macs`, in the task's attachment order), with
/// `queues` queues each. Returns each TAP's queue fds in `macs` order.
pub fn reopen_by_mac(
    ns: &Path,
    macs: Vec<MacAddr>,
    queues: usize,
) -> io::Result<Vec<Vec<OwnedFd>>> {
    netns::run_in(ns, move || {
        // getifaddrs(3) asks over a netlink socket made in this thread's namespace.
        let links: Vec<(String, [u8; 6])> = nix::ifaddrs::getifaddrs()
            .map_err(|e| io::Error::other(format!("listing interfaces: {e}")))?
            .filter_map(|a| {
                let mac = a.address?.as_link_addr()?.addr()?;
                Some((a.interface_name, mac))
            })
            .collect();
        macs.iter()
            .map(|mac| {
                let (name, _) = links.iter().find(|(_, m)| *m == mac.0).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no interface with MAC {mac}"),
                    )
                })?;
                // TUNSETIFF refuses a device that is not a TAP of the same flags.
                tap::create(name, queues).map_err(|e| io::Error::other(format!("{name}: {e}")))
            })
            .collect()
    })
}

/// Deletes the interfaces of the calling process's own namespace whose names start with one
/// of `prefixes` (the persistent TAPs of image tasks a previous run left and this one does
/// not adopt); returns their names.
pub async fn delete_own(prefixes: &[String]) -> io::Result<Vec<String>> {
    let names: Vec<String> = nix::net::if_::if_nameindex()
        .map_err(|e| io::Error::other(format!("listing interfaces: {e}")))?
        .iter()
        .filter_map(|i| i.name().to_str().ok().map(str::to_string))
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
        .collect();
    if names.is_empty() {
        return Ok(names);
    }
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let driver = tokio::spawn(conn);
    let result = async {
        for name in &names {
            let idx = link_index(&handle, name).await?;
            handle
                .link()
                .del(idx)
                .execute()
                .await
                .map_err(nl("deleting interface"))?;
        }
        Ok(())
    }
    .await;
    driver.abort();
    result.map(|()| names)
}

/// Creates a TAP in the calling process's own namespace, with the MTU and MAC of `spec` but
/// no address, for a runtime to move into its container (Docker's join: libnetwork moves it,
/// renames it and configures the address and routes), with the given lifetime (an image
/// task's is persistent, so its container keeps it while no router runs). Returns its
/// queue fds.
pub async fn create_detached(
    spec: &IfaceSpec,
    queues: usize,
    lifetime: Lifetime,
) -> io::Result<Vec<OwnedFd>> {
    let fds = tap::create(&spec.name, queues)?;
    if let (Lifetime::Persistent, Some(first)) = (lifetime, fds.first()) {
        tap::persist(first).map_err(|e| io::Error::other(format!("{}: {e}", spec.name)))?;
    }
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let driver = tokio::spawn(conn);
    let result = set_link(&handle, spec, false).await;
    driver.abort();
    result.map(|_| fds)
}

/// Sets an interface's MTU and MAC (and brings it up if `up`); returns its index.
async fn set_link(handle: &rtnetlink::Handle, s: &IfaceSpec, up: bool) -> io::Result<u32> {
    let idx = link_index(handle, &s.name).await?;
    let mut link = LinkUnspec::new_with_index(idx)
        .mtu(u32::from(s.mtu))
        .address(s.mac.0.to_vec());
    if up {
        link = link.up();
    }
    handle
        .link()
        .set(link.build())
        .execute()
        .await
        .map_err(nl("setting MTU, MAC and up"))?;
    Ok(idx)
}

fn nl(what: &str) -> impl FnOnce(rtnetlink::Error) -> io::Error + '_ {
    move |e| io::Error::other(format!("{what}: {e}"))
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> io::Result<u32> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {name}"),
        )),
        Err(e) => Err(nl("looking up interface")(e)),
    }
}

async fn configure(specs: &[IfaceSpec]) -> io::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let driver = tokio::spawn(conn);
    let result = async {
        let lo = link_index(&handle, "lo").await?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .map_err(nl("bringing lo up"))?;
        for s in specs {
            let idx = set_link(&handle, s, true).await?;
            handle
                .address()
                .add(idx, s.address.into(), s.prefix_len)
                .execute()
                .await
                .map_err(nl("adding address"))?;
            if let Some(gw) = s.gateway {
                let route = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                    .gateway(gw)
                    .output_interface(idx)
                    .build();
                handle
                    .route()
                    .add(route)
                    .execute()
                    .await
                    .map_err(nl("adding default route"))?;
            }
        }
        Ok(())
    }
    .await;
    driver.abort();
    result
}
