//! Update and rollback policies: how a service's tasks are replaced when its spec changes,
//! as Docker's `--update-*` and `--rollback-*` flags set them.
//!
//! A service holds two [`UpdateConfig`]s (in its `Deploy`, `update.rs`): one for updates,
//! one for rollbacks. The rollout state machine (`rollout.rs`) reads the one in force.
//! [`UpdateConfigChange`] is what a request changes in one of them.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Docker's `--update-monitor` / `--rollback-monitor` default.
pub const DEFAULT_MONITOR_MS: u64 = 5_000;

/// What a rollout does when too many of its new tasks fail (`--update-failure-action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    /// Stop replacing tasks; the service keeps what it runs (Docker's default).
    #[default]
    Pause,
    /// Go on replacing tasks whatever fails.
    Continue,
    /// Return to the previous spec (updates only: a rollback never rolls back).
    Rollback,
}

impl fmt::Display for FailureAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureAction::Pause => "pause",
            FailureAction::Continue => "continue",
            FailureAction::Rollback => "rollback",
        })
    }
}

impl FromStr for FailureAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pause" => Ok(FailureAction::Pause),
            "continue" => Ok(FailureAction::Continue),
            "rollback" => Ok(FailureAction::Rollback),
            _ => Err(format!(
                "invalid failure action {s:?}: pause, continue or rollback"
            )),
        }
    }
}

/// Whether a slot's old task stops before its replacement starts (`--update-order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// The old task leaves, then the new one is placed (Docker's default).
    #[default]
    StopFirst,
    /// The new task runs beside the old one, which leaves once the new one is ready.
    StartFirst,
}

impl fmt::Display for UpdateOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpdateOrder::StopFirst => "stop-first",
            UpdateOrder::StartFirst => "start-first",
        })
    }
}

impl FromStr for UpdateOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stop-first" => Ok(UpdateOrder::StopFirst),
            "start-first" => Ok(UpdateOrder::StartFirst),
            _ => Err(format!(
                "invalid update order {s:?}: stop-first or start-first"
            )),
        }
    }
}

/// A share of a rollout's tasks, 0 to 1 (`--update-max-failure-ratio`), kept in millionths
/// so that policies compare exactly. Human-readable formats (JSON) carry it as a number
/// such as `0.25`; binary ones as the integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct FailureRatio(u32);

impl FailureRatio {
    pub const PER: u32 = 1_000_000;

    /// From a number between 0 and 1.
    pub fn from_f64(v: f64) -> Result<FailureRatio, String> {
        if !(0.0..=1.0).contains(&v) {
            return Err(format!(
                "invalid failure ratio {v}: expected a number from 0 to 1"
            ));
        }
        Ok(FailureRatio((v * Self::PER as f64).round() as u32))
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / Self::PER as f64
    }

    /// Whether `failed` out of `total` is more than this ratio (Swarm's rule: with 0, one
    /// failure is too many).
    pub fn exceeded(self, failed: usize, total: usize) -> bool {
        failed as u128 * Self::PER as u128 > self.0 as u128 * total as u128
    }
}

impl fmt::Display for FailureRatio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_f64())
    }
}

impl FromStr for FailureRatio {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v: f64 = s
            .parse()
            .map_err(|_| format!("invalid failure ratio {s:?}: expected a number from 0 to 1"))?;
        FailureRatio::from_f64(v)
    }
}

impl Serialize for FailureRatio {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_f64(self.as_f64())
        } else {
            s.serialize_u32(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for FailureRatio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let v = f64::deserialize(d)?;
            FailureRatio::from_f64(v).map_err(serde::de::Error::custom)
        } else {
            let v = u32::deserialize(d)?;
            if v > Self::PER {
                return Err(serde::de::Error::custom("failure ratio above 1"));
            }
            Ok(FailureRatio(v))
        }
    }
}

/// How a rollout replaces tasks: Docker's `UpdateConfig` (and `RollbackConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Slots replaced at once; 0: all of them.
    pub parallelism: u32,
    /// Wait after a slot's new task is ready before the next slot starts, milliseconds.
    pub delay_ms: u64,
    pub failure_action: FailureAction,
    /// How long after it is ready a new task's failure still counts against the
    /// rollout, milliseconds.
    pub monitor_ms: u64,
    pub max_failure_ratio: FailureRatio,
    pub order: UpdateOrder,
}

impl Default for UpdateConfig {
    /// Docker's defaults, the same for updates and rollbacks.
    fn default() -> Self {
        UpdateConfig {
            parallelism: 1,
            delay_ms: 0,
            failure_action: FailureAction::Pause,
            monitor_ms: DEFAULT_MONITOR_MS,
            max_failure_ratio: FailureRatio::default(),
            order: UpdateOrder::StopFirst,
        }
    }
}

/// What a request changes in an [`UpdateConfig`]: each field given replaces the current one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfigChange {
    #[serde(default)]
    pub parallelism: Option<u32>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    #[serde(default)]
    pub failure_action: Option<FailureAction>,
    #[serde(default)]
    pub monitor_ms: Option<u64>,
    #[serde(default)]
    pub max_failure_ratio: Option<FailureRatio>,
    #[serde(default)]
    pub order: Option<UpdateOrder>,
}

impl UpdateConfigChange {
    pub fn is_empty(&self) -> bool {
        *self == UpdateConfigChange::default()
    }

    /// `config` with the given fields replaced.
    pub fn applied_to(&self, config: UpdateConfig) -> UpdateConfig {
        UpdateConfig {
            parallelism: self.parallelism.unwrap_or(config.parallelism),
            delay_ms: self.delay_ms.unwrap_or(config.delay_ms),
            failure_action: self.failure_action.unwrap_or(config.failure_action),
            monitor_ms: self.monitor_ms.unwrap_or(config.monitor_ms),
            max_failure_ratio: self.max_failure_ratio.unwrap_or(config.max_failure_ratio),
            order: self.order.unwrap_or(config.order),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_parses_compares_and_serializes() {
        let r: FailureRatio = "0.25".parse().unwrap();
        assert_eq!(r.to_string(), "0.25");
        assert!(!r.exceeded(1, 4), "1 of 4 is not more than 0.25");
        assert!(r.exceeded(2, 4));
        let zero = FailureRatio::default();
        assert!(!zero.exceeded(0, 3));
        assert!(zero.exceeded(1, 1000), "with 0 one failure is too many");
        assert!(!FailureRatio::from_f64(1.0).unwrap().exceeded(3, 3));
        for bad in ["-0.1", "1.5", "x", "NaN"] {
            assert!(bad.parse::<FailureRatio>().is_err(), "{bad}");
        }
        assert_eq!(serde_json::to_string(&r).unwrap(), "0.25");
        assert_eq!(serde_json::from_str::<FailureRatio>("0.25").unwrap(), r);
        let bytes = postcard::to_stdvec(&r).unwrap();
        assert_eq!(postcard::from_bytes::<FailureRatio>(&bytes).unwrap(), r);
    }

    #[test]
    fn docker_defaults_and_changes() {
        let d = UpdateConfig::default();
        assert_eq!(
            (d.parallelism, d.delay_ms, d.monitor_ms),
            (1, 0, DEFAULT_MONITOR_MS)
        );
        assert_eq!(
            (d.failure_action, d.order),
            (FailureAction::Pause, UpdateOrder::StopFirst)
        );
        let change = UpdateConfigChange {
            parallelism: Some(2),
            order: Some(UpdateOrder::StartFirst),
            ..Default::default()
        };
        let c = change.applied_to(d);
        assert_eq!(
            (c.parallelism, c.order, c.monitor_ms),
            (2, UpdateOrder::StartFirst, 5000)
        );
        assert!(UpdateConfigChange::default().is_empty() && !change.is_empty());
        assert_eq!(
            serde_json::to_string(&UpdateOrder::StartFirst).unwrap(),
            "\"start-first\""
        );
        assert_eq!("rollback".parse(), Ok(FailureAction::Rollback));
        assert!("stop".parse::<UpdateOrder>().is_err());
    }
}
