//! Path notices: telling the peer at once that this end left the pair's path, and acting on
//! the peer's notices (see the module documentation of [`path`](crate::path)).

use std::time::{Duration, Instant};

use super::{Health, PathAgent};
use crate::path::{
    NoticeCause, NoticeRejected, NoticeTransmit, PathId, PathNotice, Role, SwitchReason,
};

/// Copies of each path notice: the first at once, the second a fast interval later on the
/// then active path, in case the first was lost (the receiver acts on one of them).
const NOTICE_COPIES: u8 = 2;

/// Sequence numbers of the notices this end sends, and the copy still to send.
#[derive(Debug, Clone, Copy)]
pub(super) struct NoticeSender {
    epoch: u32,
    counter: u32,
    /// The last notice, when to send its next copy, and how many copies are left.
    repeat: Option<(PathNotice, Instant, u8)>,
}

impl NoticeSender {
    pub(super) fn new(epoch: u32) -> Self {
        Self {
            epoch,
            counter: 0,
            repeat: None,
        }
    }

    /// When the next copy of the last notice is due.
    pub(super) fn repeat_at(&self) -> Option<Instant> {
        self.repeat.map(|(_, at, _)| at)
    }
}

impl PathAgent {
    /// A path notice from the peer (decrypted by WireGuard, see the module documentation)
    /// arrived on `path`: the peer left the path the pair was on. This end moves to `path` at
    /// once, whatever its role; if the peer left because of a link-down or distress, the paths
    /// that shared the failed path's remote endpoint (and, for distress, its local uplink) are
    /// marked failed, so traffic does not fail back to them before they are proven again.
    /// Stale notices (not newer than the last one acted on) change nothing.
    pub fn handle_path_notice(
        &mut self,
        path: PathId,
        notice: PathNotice,
        now: Instant,
    ) -> Result<(), NoticeRejected> {
        let Some(i) = self.index(path) else {
            return Err(NoticeRejected::UnknownPath);
        };
        if !self.uplink_of(i).up {
            return Err(NoticeRejected::LinkDown);
        }
        if let Some(last) = self.notice_in {
            let same_epoch = last >> 32 == notice.seq >> 32;
            if same_epoch && notice.seq & 0xffff_ffff <= last & 0xffff_ffff {
                return Err(NoticeRejected::Stale);
            }
        }
        self.notice_in = Some(notice.seq);
        self.handle_authenticated_rx(path, now);
        if let Some(a) = self.active.filter(|&a| a != i) {
            let dead = self.paths[a].id;
            for (j, p) in self.paths.iter_mut().enumerate() {
                let suspect = match notice.cause {
                    NoticeCause::LinkDown => p.id.remote == dead.remote,
                    NoticeCause::Distress => {
                        p.id.remote == dead.remote || p.id.uplink == dead.uplink
                    }
                    NoticeCause::Choice => false,
                };
                if j != i && suspect && !matches!(p.health, Health::Failed { .. }) {
                    p.health = Health::Failed { at: now };
                    p.better_since = None;
                }
            }
        }
        let p = &mut self.paths[i];
        if matches!(p.health, Health::Failed { .. }) {
            // The peer just proved this path (it only moves to proven paths); give it its
            // chance instead of leaving it at once.
            p.health = Health::Unproven;
            p.clear_unanswered();
        }
        self.switch(Some(i), SwitchReason::PeerNotice, now);
        self.evaluate(now);
        Ok(())
    }

    /// Next path notice to send, like a probe, on its path (see [`NoticeTransmit`]).
    pub fn poll_notice(&mut self) -> Option<NoticeTransmit> {
        self.notices.pop_front()
    }

    /// Sends the next copy of the last notice on the active path, when due.
    pub(super) fn repeat_notice(&mut self, now: Instant) {
        let Some((notice, at, left)) = self.notice_out.repeat else {
            return;
        };
        if at > now {
            return;
        }
        self.notice_out.repeat = None;
        if let Some(a) = self.active {
            let path = self.paths[a].id;
            self.notices.push_back(NoticeTransmit { path, notice });
            if left > 1 {
                let fast = self.uplink_of(a).probe.fast_interval;
                self.notice_out.repeat = Some((notice, now + fast, left - 1));
            }
        }
    }

    /// Whether a switch for `reason` is announced to the peer, and as what. A move that
    /// follows the peer is never announced back; upgrades are the chooser's alone.
    pub(super) fn notice_cause(&self, reason: SwitchReason) -> Option<NoticeCause> {
        match reason {
            SwitchReason::LinkDown => Some(NoticeCause::LinkDown),
            SwitchReason::Distress => Some(NoticeCause::Distress),
            SwitchReason::Recovered | SwitchReason::EndpointRemoved => Some(NoticeCause::Choice),
            SwitchReason::Failback | SwitchReason::LowerRtt if self.role == Role::Chooser => {
                Some(NoticeCause::Choice)
            }
            SwitchReason::Failback
            | SwitchReason::LowerRtt
            | SwitchReason::Initial
            | SwitchReason::PeerChoice
            | SwitchReason::PeerNotice => None,
        }
    }

    pub(super) fn send_notice(&mut self, path: PathId, cause: NoticeCause, now: Instant) {
        let out = &mut self.notice_out;
        out.counter = out.counter.wrapping_add(1);
        let notice = PathNotice {
            seq: (u64::from(out.epoch) << 32) | u64::from(out.counter),
            cause,
        };
        self.notices.push_back(NoticeTransmit { path, notice });
        let fast = self
            .uplinks
            .get(usize::from(path.uplink.0))
            .map_or(Duration::from_millis(200), |u| u.probe.fast_interval);
        self.notice_out.repeat =
            (NOTICE_COPIES > 1).then_some((notice, now + fast, NOTICE_COPIES - 1));
    }
}
