//! Per-path measurements: smoothed RTT (RFC 6298 estimator) and probe loss over a window.

use std::time::Duration;

/// RFC 6298 smoothed RTT and RTT variation (alpha = 1/8, beta = 1/4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    latest: Option<Duration>,
}

impl RttEstimator {
    pub(crate) fn update(&mut self, sample: Duration) {
        self.latest = Some(sample);
        match self.srtt {
            None => {
                self.srtt = Some(sample);
                self.rttvar = sample / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(sample);
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + sample) / 8);
            }
        }
    }

    /// Smoothed RTT, `None` until the first sample.
    pub(crate) fn smoothed(&self) -> Option<Duration> {
        self.srtt
    }

    pub(crate) fn var(&self) -> Duration {
        self.rttvar
    }

    pub(crate) fn latest(&self) -> Option<Duration> {
        self.latest
    }

    /// Retransmission-timeout style bound: how long a reply may plausibly take.
    pub(crate) fn rto(&self) -> Option<Duration> {
        self.srtt.map(|s| s + self.rttvar * 4)
    }
}

/// Outcome of the last [`LossWindow::LEN`] probes, one bit each (1 = lost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LossWindow {
    lost: u64,
    len: u32,
}

impl LossWindow {
    pub(crate) const LEN: u32 = 64;

    pub(crate) fn record(&mut self, lost: bool) {
        self.lost = (self.lost << 1) | u64::from(lost);
        self.len = (self.len + 1).min(Self::LEN);
    }

    /// Probes recorded in the window.
    pub(crate) fn samples(&self) -> u32 {
        self.len
    }

    /// Lost fraction of the recorded probes, 0.0 when none were recorded.
    pub(crate) fn ratio(&self) -> f32 {
        if self.len == 0 {
            return 0.0;
        }
        let mask = if self.len == 64 {
            u64::MAX
        } else {
            (1u64 << self.len) - 1
        };
        (self.lost & mask).count_ones() as f32 / self.len as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn first_sample_sets_srtt_and_half_var() {
        let mut r = RttEstimator::default();
        assert_eq!(r.smoothed(), None);
        r.update(ms(40));
        assert_eq!(r.smoothed(), Some(ms(40)));
        assert_eq!(r.var(), ms(20));
        assert_eq!(r.rto(), Some(ms(120)));
    }

    #[test]
    fn one_spike_moves_srtt_by_an_eighth() {
        let mut r = RttEstimator::default();
        for _ in 0..50 {
            r.update(ms(40));
        }
        r.update(ms(180));
        assert_eq!(r.smoothed(), Some(ms(40) + ms(140) / 8));
        assert_eq!(r.latest(), Some(ms(180)));
    }

    #[test]
    fn loss_window_counts_only_recorded_probes_and_forgets_old_ones() {
        let mut w = LossWindow::default();
        assert_eq!(w.ratio(), 0.0);
        w.record(true);
        w.record(false);
        w.record(false);
        w.record(false);
        assert_eq!(w.ratio(), 0.25);
        for _ in 0..64 {
            w.record(false);
        }
        assert_eq!(w.ratio(), 0.0);
        for _ in 0..64 {
            w.record(true);
        }
        assert_eq!(w.ratio(), 1.0);
    }
}
