//! The leader's pushes: one feed for every session, built once per change and once a
//! second, each push a full snapshot and the delta from the push before.
//!
//! Every member session used to build, encode and send the whole state every second: with
//! 50 nodes and 10 000 tasks, 50 copies of a multi-megabyte state a second, most of it
//! unchanged. The feed builds the snapshot once (sharing the manager's `Arc` of the state, so
//! an unchanged state is neither copied nor compared), computes the [`SnapshotDelta`] from the
//! previous push once, and encodes each frame at most once; a session sends a node the delta
//! when the node holds the push before, and the whole snapshot when it holds none (a new
//! session, a `Resync`, or a session that fell behind by more than one push).
//!
//! Bursts of changes (a script creating services) are gathered for [`COALESCE`] before a
//! push is built, so a burst costs one push rather than one per change.

use super::server::snapshot;
use super::worker::AbortOnDrop;
use crate::manager::Manager;
use protocol::control::{self, FrameError, Snapshot, ToNode};
use protocol::delta::SnapshotDelta;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

/// A push goes out at least this often, changed or not: it tells nodes the manager is there.
pub const PUSH_EVERY: Duration = super::session::manager::PUSH_EVERY;
/// How long changes are gathered before a push is built.
pub const COALESCE: Duration = Duration::from_millis(10);

/// An encoded frame, shared by every session that sends it.
pub type Frame = Arc<[u8]>;

/// One push of the feed.
pub struct Push {
    /// Numbered from 1 in the feed's order; a session names it to the node.
    pub number: u64,
    pub snapshot: Arc<Snapshot>,
    /// From push `number - 1` (`None` for the feed's first push).
    pub delta: Option<SnapshotDelta>,
    full: OnceLock<Result<Frame, String>>,
    diff: OnceLock<Result<Frame, String>>,
}

/// What a session sends a node to bring it to a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToSend {
    /// The node holds this push already.
    Nothing,
    Delta(Frame),
    Full(Frame),
}

impl Push {
    fn new(number: u64, snapshot: Arc<Snapshot>, delta: Option<SnapshotDelta>) -> Push {
        Push {
            number,
            snapshot,
            delta,
            full: OnceLock::new(),
            diff: OnceLock::new(),
        }
    }

    /// The frame that brings a node holding push `held` to this one: the delta if it holds
    /// the push before (and `full_only` is off), the whole snapshot otherwise.
    pub fn frame_for(&self, held: Option<u64>, full_only: bool) -> Result<ToSend, String> {
        if held == Some(self.number) {
            return Ok(ToSend::Nothing);
        }
        match &self.delta {
            Some(delta) if !full_only && held == Some(self.number - 1) => self
                .diff
                .get_or_init(|| {
                    encode(&ToNode::Delta {
                        base: self.number - 1,
                        push: self.number,
                        delta: Box::new(delta.clone()),
                    })
                })
                .clone()
                .map(ToSend::Delta),
            _ => self
                .full
                .get_or_init(|| {
                    encode(&ToNode::Snapshot {
                        push: self.number,
                        snapshot: Box::new((*self.snapshot).clone()),
                    })
                })
                .clone()
                .map(ToSend::Full),
        }
    }
}

fn encode(msg: &ToNode) -> Result<Frame, String> {
    control::encode(msg)
        .map(Frame::from)
        .map_err(|e: FrameError| e.to_string())
}

/// The feed of one leadership: its pushes, and the task that makes them (stopped when the
/// feed is dropped).
pub struct Feed {
    pushes: watch::Receiver<Arc<Push>>,
    _task: AbortOnDrop,
}

impl Feed {
    /// Starts the feed of `manager`'s state (needs a tokio runtime). Its first push is ready
    /// at once.
    pub fn spawn(manager: Arc<Manager>) -> Feed {
        let first = Arc::new(Push::new(1, Arc::new(snapshot(&manager)), None));
        let (tx, pushes) = watch::channel(first);
        let task = tokio::spawn(run(manager, tx));
        Feed {
            pushes,
            _task: AbortOnDrop(task),
        }
    }

    /// The pushes from now on (the current one counts as seen).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Push>> {
        let mut rx = self.pushes.clone();
        rx.mark_unchanged();
        rx
    }

    /// The newest push.
    pub fn current(&self) -> Arc<Push> {
        self.pushes.borrow().clone()
    }
}

async fn run(manager: Arc<Manager>, tx: watch::Sender<Arc<Push>>) {
    let mut changes = manager.subscribe();
    let mut tick = tokio::time::interval(PUSH_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                tokio::time::sleep(COALESCE).await;
                changes.mark_unchanged();
                tick.reset();
            }
            _ = tick.tick() => {}
        }
        let prev = tx.borrow().clone();
        let m = manager.clone();
        let built = tokio::task::spawn_blocking(move || {
            let next = snapshot(&m);
            let delta = SnapshotDelta::between(&prev.snapshot, &next);
            Push::new(prev.number + 1, Arc::new(next), Some(delta))
        })
        .await;
        match built {
            Ok(push) => {
                tx.send_replace(Arc::new(push));
            }
            Err(e) => {
                tracing::warn!(error = %e, "building a control-plane push failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::state::ClusterState;
    use std::collections::BTreeMap;

    fn snap(revision: u64) -> Arc<Snapshot> {
        let state = ClusterState {
            revision,
            ..ClusterState::default()
        };
        Arc::new(Snapshot {
            state: Arc::new(state),
            statuses: BTreeMap::new(),
            health: BTreeMap::new(),
            keys: Default::default(),
        })
    }

    fn decode(frame: &Frame) -> ToNode {
        control::decode(&frame[4..]).unwrap()
    }

    #[test]
    fn a_node_gets_the_delta_only_if_it_holds_the_push_before() {
        let (a, b) = (snap(1), snap(2));
        let push = Push::new(5, b.clone(), Some(SnapshotDelta::between(&a, &b)));
        assert_eq!(push.frame_for(Some(5), false), Ok(ToSend::Nothing));
        let Ok(ToSend::Delta(f)) = push.frame_for(Some(4), false) else {
            panic!("a delta for the node holding push 4");
        };
        assert!(matches!(
            decode(&f),
            ToNode::Delta {
                base: 4,
                push: 5,
                ..
            }
        ));
        for held in [None, Some(3), Some(9)] {
            let Ok(ToSend::Full(f)) = push.frame_for(held, false) else {
                panic!("a full snapshot for {held:?}");
            };
            let ToNode::Snapshot { push: 5, snapshot } = decode(&f) else {
                panic!("push 5");
            };
            assert_eq!(*snapshot, *b);
        }
        // Full snapshots only (the bench's baseline), even for the node holding push 4.
        assert!(matches!(push.frame_for(Some(4), true), Ok(ToSend::Full(_))));
    }

    #[test]
    fn the_first_push_has_no_delta() {
        let push = Push::new(1, snap(0), None);
        assert!(matches!(
            push.frame_for(Some(0), false),
            Ok(ToSend::Full(_))
        ));
    }
}
