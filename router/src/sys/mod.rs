//! The operating-system edge: the only place with `unsafe` (TAP ioctls, namespace syscalls)
//! and the only place that configures interfaces. Each unsafe block carries a `// SAFETY:`
//! line and sits behind a safe function.

pub mod iface;
pub mod malloc;
pub mod mntns;
pub mod netns;
pub mod pages;
pub mod pidfd;
pub mod steer;
pub mod tap;
pub mod tap_steer;
