//! The auto mode's cost model: whether a draft pays, measured while serving.
//!
//! On a CPU a decode step's time grows with its rows almost linearly, so a draft pays only when
//! enough of it is taken; on a GPU extra rows are nearly free. Neither is assumed: the batcher
//! times every decode by its row count (`StepCosts`), keeps each sequence's acceptance rate
//! (`Acceptance`), and before each step cuts a sequence's draft to the length that maximizes
//! the tokens per second the step is expected to yield (`best_len`), which is 0 when drafting
//! does not pay. Costs between two measured row counts are interpolated. Above the largest,
//! up to twice its rows, a decode is taken to cost what the largest did: a longer draft that
//! might pay is then tried once, and measured (on a CPU a weight-bound decode of a few more
//! rows costs little more; guessing along the last two would never find out). Further up
//! costs go on along the last two; with too few known a 4-token draft measures one more.

use std::time::Duration;

/// Moving averages of a decode's time by its number of rows.
#[derive(Debug, Clone)]
pub struct StepCosts {
    /// Seconds by rows (index), 0.0 where never measured.
    by_rows: Vec<f64>,
    /// The draft model's time per draft decode (0.0: none yet).
    draft_step: f64,
}

/// Weight of the newest measurement in the moving averages.
const NEW: f64 = 0.25;
/// How much better than not drafting a draft must look to be taken (measurements are noisy).
const MARGIN: f64 = 1.05;

fn average(old: f64, new: f64) -> f64 {
    if old == 0.0 {
        new
    } else {
        old + NEW * (new - old)
    }
}

impl StepCosts {
    pub fn new(capacity: usize) -> Self {
        Self {
            by_rows: vec![0.0; capacity + 1],
            draft_step: 0.0,
        }
    }

    /// A target decode of `rows` rows took `took`.
    pub fn record(&mut self, rows: usize, took: Duration) {
        if let Some(c) = self.by_rows.get_mut(rows) {
            *c = average(*c, took.as_secs_f64());
        }
    }

    /// A draft-model decode took `took`.
    pub fn record_draft(&mut self, took: Duration) {
        self.draft_step = average(self.draft_step, took.as_secs_f64());
    }

    /// The expected time of a decode of `rows` rows: measured, between two measured counts, as
    /// the largest measured up to twice its rows, or on the line through the two largest
    /// measured; None when that is not known.
    fn cost(&self, rows: usize) -> Option<f64> {
        let at = *self.by_rows.get(rows)?;
        if at > 0.0 {
            return Some(at);
        }
        let known = |r: &usize| self.by_rows[*r] > 0.0;
        let below = (1..rows).rev().find(known);
        match (1..self.by_rows.len()).skip(rows).find(known) {
            Some(above) => {
                let (below, low) = below.map_or((0, 0.0), |r| (r, self.by_rows[r]));
                let high = self.by_rows[above];
                Some(low + (high - low) * (rows - below) as f64 / (above - below) as f64)
            }
            None => {
                let last = below?;
                if rows <= 2 * last {
                    return Some(self.by_rows[last]);
                }
                let before = (1..last).rev().find(known)?;
                let (high, low) = (self.by_rows[last], self.by_rows[before]);
                // noise can make a larger decode look quicker: never cheaper than the largest
                let slope = ((high - low) / (last - before) as f64).max(0.0);
                Some(high + slope * (rows - last) as f64)
            }
        }
    }

    /// How many of up to `max` draft tokens a sequence should verify in a step that already
    /// holds `rows` rows (its own next token among them) from `generating` sequences, given
    /// its acceptance rate and whether the draft model makes its drafts.
    pub fn best_len(
        &self,
        max: usize,
        rows: usize,
        generating: usize,
        accept: f64,
        model: bool,
    ) -> usize {
        self.best(max, (rows, generating), accept, model, MARGIN)
    }

    /// `best_len`, where a draft must look `margin` times better than none.
    fn best(
        &self,
        max: usize,
        (rows, generating): (usize, usize),
        accept: f64,
        model: bool,
        margin: f64,
    ) -> usize {
        if max == 0 {
            return 0;
        }
        let Some(base) = self.cost(rows) else {
            return max.min(PROBE_LEN); // too little known yet: measure a short draft's size
        };
        let others = generating.saturating_sub(1) as f64;
        let plain = (others + 1.0) / base;
        let mut best = (0, plain * margin);
        for k in 1..=max {
            let Some(step) = self.cost(rows + k) else {
                return max.min(PROBE_LEN);
            };
            let drafting = if model {
                k as f64 * self.draft_step
            } else {
                0.0
            };
            let rate = (others + expected_tokens(accept, k)) / (step + drafting);
            if rate > best.1 {
                best = (k, rate);
            }
        }
        best.0
    }

    /// Whether the draft model may pay in such a step at all, were its guesses taken as often
    /// as a good draft model's are, by a margin: what the costs leave out (the draft model's
    /// reading of the prompt before its first guess and after every stretch without drafts,
    /// sampling each verified row) must be paid too. If not, a sequence need not even try it.
    pub fn model_may_pay(&self, max: usize, rows: usize, generating: usize) -> bool {
        self.draft_step == 0.0
            || self.best(max, (rows, generating), GOOD_ACCEPTANCE, true, MODEL_MARGIN) > 0
    }
}

/// The share of guesses a draft model of the target's family gets taken at best (llama.cpp's
/// and our runs: 0.6-0.98 on code).
const GOOD_ACCEPTANCE: f64 = 0.9;
/// How much better than not drafting the draft model must look to be tried. Measured on 2
/// cores, Qwen2.5-Coder 1.5B with its 0.5B (a draft step 0.48 of a target's): the costs
/// promised 1.17x at the 98 % acceptance it had, and it gave 0.84x.
const MODEL_MARGIN: f64 = 1.4;

/// Tokens a step yields for a sequence verifying `k` draft tokens, each taken with probability
/// `accept` while the ones before it were: 1 + a + a^2 + ... + a^k.
fn expected_tokens(accept: f64, k: usize) -> f64 {
    (0..=k).map(|i| accept.powi(i as i32)).sum()
}

/// A sequence's rate of taken draft tokens, recent verifies weighing most; it drifts back
/// towards even odds while the sequence does not draft. Nothing is known of a sequence until
/// it drafts, so its first draft is a probe, and so is one after a long time without drafts
/// (its text may have turned repetitive).
#[derive(Debug, Clone)]
pub struct Acceptance {
    taken: f64,
    drafted: f64,
    observed: bool,
    /// Steps since the last draft.
    idle: u32,
}

const DECAY: f64 = 0.8;
const IDLE_DECAY: f64 = 0.97;
/// Steps without a draft (where one was refused) before a probe: on a CPU a missed probe of 4
/// rows costs 1.3-3 single-row steps (1.5B and 135M models here), under 10 % of the steps
/// between two; a sequence whose first probe missed (a preamble before the quoted code) finds
/// its lookup again soon enough to pay on the rest.
const PROBE_AFTER: u32 = 32;
/// The longest probe.
pub const PROBE_LEN: usize = 4;

impl Default for Acceptance {
    fn default() -> Self {
        Self {
            taken: 1.0,
            drafted: 2.0,
            observed: false,
            idle: 0,
        }
    }
}

impl Acceptance {
    pub fn rate(&self) -> f64 {
        self.taken / self.drafted
    }

    /// Whether the next draft should be tried whatever the costs say.
    pub fn probing(&self) -> bool {
        !self.observed || self.idle >= PROBE_AFTER
    }

    pub fn record(&mut self, drafted: usize, taken: usize) {
        if drafted == 0 {
            self.idle += 1;
            self.taken = 1.0 + (self.taken - 1.0) * IDLE_DECAY;
            self.drafted = 2.0 + (self.drafted - 2.0) * IDLE_DECAY;
            return;
        }
        self.observed = true;
        self.idle = 0;
        self.taken = self.taken * DECAY + taken as f64;
        self.drafted = self.drafted * DECAY + drafted as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(per_row: &[(usize, f64)]) -> StepCosts {
        let mut c = StepCosts::new(64);
        for &(rows, ms) in per_row {
            c.record(rows, Duration::from_secs_f64(ms / 1000.0));
        }
        c
    }

    #[test]
    fn unknown_sizes_are_explored_then_known_ones_decide() {
        let c = StepCosts::new(64);
        assert_eq!(c.best_len(8, 1, 1, 0.5, false), PROBE_LEN);
        assert_eq!(
            costs(&[(1, 100.0)]).best_len(8, 1, 1, 0.5, false),
            PROBE_LEN
        );
        // a CPU (the 1.5B's measured costs): only a likely draft pays, and not a long one
        let cpu = costs(&[
            (1, 100.0),
            (2, 158.0),
            (3, 226.0),
            (5, 304.0),
            (9, 597.0),
            (17, 1080.0),
        ]);
        assert_eq!(cpu.best_len(8, 1, 1, 0.3, false), 0);
        assert_eq!(cpu.best_len(8, 1, 1, 0.95, false), 4);
        // a GPU: rows are nearly free; drafting pays even at modest acceptance
        let gpu = costs(&[(1, 10.0), (5, 10.5), (9, 11.0), (17, 12.0), (33, 14.0)]);
        assert_eq!(gpu.best_len(8, 1, 1, 0.9, false), 8);
        // four streams on a CPU: the same draft pays less than alone
        let alone = cpu.best_len(8, 1, 1, 0.7, false);
        let shared = cpu.best_len(8, 4, 4, 0.7, false);
        assert!(shared <= alone, "{shared} > {alone}");
        // a draft model's own steps count against its drafts
        let mut drafting = gpu.clone();
        drafting.record_draft(Duration::from_millis(8));
        assert!(drafting.best_len(8, 1, 1, 0.9, true) < 8);
        // a draft model costing 0.8 (on a GPU) or 0.65 (on a CPU) of a target step never pays,
        // not even at its best; one of a tenth may on a GPU, where rows are nearly free, but
        // not by enough on a CPU; one never measured is tried
        assert!(!drafting.model_may_pay(8, 1, 1));
        drafting.record_draft(Duration::from_millis(1));
        drafting.record_draft(Duration::from_millis(1));
        drafting.record_draft(Duration::from_millis(1));
        assert!(drafting.model_may_pay(8, 1, 1));
        let mut slow = cpu.clone();
        assert!(slow.model_may_pay(8, 1, 1));
        slow.record_draft(Duration::from_millis(65));
        assert!(!slow.model_may_pay(8, 1, 1));
        let mut quick = cpu.clone();
        quick.record_draft(Duration::from_millis(10));
        assert!(!quick.model_may_pay(8, 1, 1));
    }

    #[test]
    fn costs_between_measured_sizes_are_interpolated() {
        let near = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        let c = costs(&[(1, 100.0), (5, 500.0)]);
        assert!(near(c.cost(3), 0.3));
        // above the largest: as dear as it up to twice its rows, then on along the last two
        assert!(near(c.cost(9), 0.5));
        assert!(near(c.cost(11), 1.1));
        let c = costs(&[(4, 400.0)]);
        assert!(near(c.cost(2), 0.2));
        assert!(near(c.cost(6), 0.4));
        assert_eq!(c.cost(9), None);
        // a larger decode measured quicker does not make longer ones cheaper still
        let c = costs(&[(1, 100.0), (3, 90.0)]);
        assert!(near(c.cost(8), 0.09));
        // a longer draft is tried where it might pay, and measured: a CPU whose decode of 10
        // rows costs as much as the 5 it measured (weight-bound) drafts long from then on
        let mut c = costs(&[(1, 100.0), (5, 180.0)]);
        assert_eq!(c.best_len(16, 1, 1, 0.9, false), 9);
        c.record(10, Duration::from_millis(190));
        assert_eq!(c.best_len(16, 1, 1, 0.9, false), 16);
        // where it costs twice as much, the next size up is tried once more, then not
        let mut c = costs(&[(1, 100.0), (5, 180.0)]);
        c.record(10, Duration::from_millis(360));
        assert_eq!(c.best_len(16, 1, 1, 0.9, false), 16);
        c.record(17, Duration::from_millis(680));
        assert!(c.best_len(16, 1, 1, 0.9, false) <= 4);
    }

    #[test]
    fn acceptance_follows_recent_drafts_and_drifts_back_when_idle() {
        let mut a = Acceptance::default();
        assert_eq!(a.rate(), 0.5);
        assert!(a.probing());
        a.record(4, 1);
        assert!(!a.probing());
        for _ in 0..10 {
            a.record(4, 0);
        }
        assert!(a.rate() < 0.1);
        for _ in 0..200 {
            a.record(0, 0);
        }
        assert!(a.rate() > 0.4);
        assert!(a.probing());
        a.record(8, 8);
        a.record(8, 8);
        assert!(a.rate() > 0.6);
    }
}
