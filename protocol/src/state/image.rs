//! Services from container images (`service create --image`): the image a task's container
//! runs and the container options Docker's `service create` maps onto it. A task with an
//! image is run by its node's Docker Engine instead of as a process in a namespace of
//! overlayd's; its command (`-- ARGS`) is then the container's `Cmd`, and may be empty (the
//! image's own).
//!
//! The state travels in postcard (control protocol), so no field here may be skipped when
//! serialized: every field is written, `#[serde(default)]` only lets older JSON files load.

use serde::{Deserialize, Serialize};

/// The image and container options of an image task.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContainerImage {
    /// The image reference, as `docker run` takes it (`bb:1`, `nginx:1.27`, `repo/x@sha256:…`).
    pub image: String,
    /// `--workdir`.
    #[serde(default)]
    pub workdir: Option<String>,
    /// `--user` (`USER[:GROUP]`).
    #[serde(default)]
    pub user: Option<String>,
    /// `--hostname`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// `--mount` (`type=bind|volume,source=…,target=…[,readonly]`), checked by [`Mount::parse`].
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// `--limit-cpu`, in billionths of a CPU (Docker's `NanoCPUs`).
    #[serde(default)]
    pub nano_cpus: Option<u64>,
    /// `--limit-memory`, bytes.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// `--restart-condition`, `--restart-max-attempts`, `--restart-delay`.
    #[serde(default)]
    pub restart: RestartPolicy,
}

/// When a task's ended container is replaced (Docker's `RestartPolicy` of a service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub condition: RestartCondition,
    /// Replacements at most (`None`: no limit).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// The wait before each replacement, milliseconds (`None`: the back-off, 0.5 s doubling
    /// to 10 s).
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    /// Whatever the end (Docker's default).
    #[default]
    Any,
    /// Only after a non-zero exit (an OOM kill, a `docker kill`, a failed start included).
    OnFailure,
    None,
}

impl RestartPolicy {
    /// Whether a container that ended (`failed`: not a zero exit) after `restarts`
    /// replacements is replaced again.
    pub fn restarts(&self, failed: bool, restarts: u32) -> bool {
        let wanted = match self.condition {
            RestartCondition::Any => true,
            RestartCondition::OnFailure => failed,
            RestartCondition::None => false,
        };
        wanted && self.max_attempts.is_none_or(|m| restarts < m)
    }
}

/// One `--mount`: a bind mount of a host path or a named volume of the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// `bind` or `volume`.
    pub kind: MountKind,
    /// The host path (bind) or volume name (volume; empty: an anonymous volume).
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    Bind,
    Volume,
}

impl Mount {
    /// Parses Docker's `--mount` form: comma-separated `key=value` (`type`, `source`/`src`,
    /// `target`/`destination`/`dst`, `readonly`/`ro`).
    pub fn parse(s: &str) -> Result<Mount, String> {
        let (mut kind, mut source, mut target, mut readonly) =
            (MountKind::Volume, String::new(), None, false);
        for part in s.split(',') {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            match k {
                "type" => {
                    kind = match v {
                        "bind" => MountKind::Bind,
                        "volume" => MountKind::Volume,
                        _ => return Err(format!("--mount {s:?}: type must be bind or volume")),
                    }
                }
                "source" | "src" => source = v.to_string(),
                "target" | "destination" | "dst" => target = Some(v.to_string()),
                "readonly" | "ro" => readonly = matches!(v, "" | "1" | "true"),
                _ => return Err(format!("--mount {s:?}: unknown key {k:?}")),
            }
        }
        let target = target
            .filter(|t| t.starts_with('/'))
            .ok_or_else(|| format!("--mount {s:?}: needs target=/ABSOLUTE/PATH"))?;
        if kind == MountKind::Bind && !source.starts_with('/') {
            return Err(format!(
                "--mount {s:?}: a bind mount needs source=/ABSOLUTE/PATH"
            ));
        }
        Ok(Mount {
            kind,
            source,
            target,
            readonly,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_as_docker_writes_them() {
        let m = Mount::parse("type=bind,source=/srv/www,target=/www,readonly").unwrap();
        assert_eq!(
            m,
            Mount {
                kind: MountKind::Bind,
                source: "/srv/www".into(),
                target: "/www".into(),
                readonly: true
            }
        );
        let v = Mount::parse("type=volume,src=data,dst=/data").unwrap();
        assert_eq!(
            (v.kind, v.source.as_str(), v.readonly),
            (MountKind::Volume, "data", false)
        );
        assert!(Mount::parse("type=tmpfs,target=/x").is_err());
        assert!(Mount::parse("type=bind,source=rel,target=/x").is_err());
        assert!(Mount::parse("type=volume,source=v").is_err());
        assert!(Mount::parse("type=volume,target=/x,colour=red").is_err());
    }

    #[test]
    fn restart_policies_decide_as_docker_s() {
        let any = RestartPolicy::default();
        assert!(any.restarts(false, 100) && any.restarts(true, 0));
        let on_failure = RestartPolicy {
            condition: RestartCondition::OnFailure,
            max_attempts: Some(2),
            delay_ms: None,
        };
        assert!(!on_failure.restarts(false, 0));
        assert!(on_failure.restarts(true, 1));
        assert!(!on_failure.restarts(true, 2));
        let none = RestartPolicy {
            condition: RestartCondition::None,
            ..Default::default()
        };
        assert!(!none.restarts(true, 0));
    }

    #[test]
    fn old_states_load_without_images() {
        let t: crate::state::TaskSpec = serde_json::from_str(r#"{"command":["true"]}"#).unwrap();
        assert_eq!(t.image, None);
    }
}
