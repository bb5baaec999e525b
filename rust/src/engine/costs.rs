//! The auto mode's cost model: whether a draft pays, measured while serving.
//!
//! On a CPU a decode step's time grows with its rows almost linearly, so a draft pays only when
//! enough of it is taken; on a GPU extra rows are nearly free. Neither is assumed: the batcher
//! times every decode by its row count (`StepCosts`), keeps each sequence's acceptance rate
//! (`Acceptance`), and before each step cuts the drafts to the lengths that maximize the tokens per
//! second the step is expected to yield, which are 0 when drafting does not pay: the lookup's
//! guesses of all sequences together (`joint_lens`), then each draft model's draft (`best_len`). A
//! lookup guess not verified is watched: the tokens that follow say how much of it would have been
//! taken. Costs between two measured row counts are interpolated. Above the largest, up to twice
//! its rows, a decode is taken to cost what the largest did: a longer draft that might pay is then
//! tried once, and measured (on a CPU a weight-bound decode of a few more rows costs little more;
//! guessing along the last two would never find out). Further up costs go on along the last two;
//! with too few known a 4-token draft measures one more.
//!
//! The same measurements decide padding (`StepCosts::padding`): libllama decodes uneven rows of
//! several sequences in several ubatches (`ubatches`), so a decode's time is also fitted to its
//! ubatches and rows, and shorter rows are padded where one ubatch is priced below many.

use std::time::Duration;

use super::batcher::BatchItem;

/// Moving averages of a decode's time by its number of rows.
#[derive(Debug, Clone)]
pub struct StepCosts {
    /// Seconds by rows (index), 0.0 where never measured.
    by_rows: Vec<f64>,
    /// The draft model's time per draft decode (0.0: none yet).
    draft_step: f64,
    /// A decode's time as a floor per ubatch plus a cost per row, fitted (`padding_pays`).
    fit: Fit,
}

/// Sums for the least-squares fit of decode times `t` to `floor * ubatches + per_row * rows`,
/// older decodes weighing less (`FIT_DECAY` each).
#[derive(Debug, Clone, Default)]
struct Fit {
    uu: f64,
    ur: f64,
    rr: f64,
    ut: f64,
    rt: f64,
}

const FIT_DECAY: f64 = 0.98;

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
            fit: Fit::default(),
        }
    }

    /// A target decode of `rows` rows took `took`.
    pub fn record(&mut self, rows: usize, took: Duration) {
        if let Some(c) = self.by_rows.get_mut(rows) {
            *c = average(*c, took.as_secs_f64());
        }
    }

    /// A decode of `rows` rows that libllama made into `ubatches` ubatches took `took`.
    pub fn record_ubatches(&mut self, ubatches: usize, rows: usize, took: Duration) {
        let (u, r, t) = (ubatches as f64, rows as f64, took.as_secs_f64());
        let f = &mut self.fit;
        for (sum, add) in [
            (&mut f.uu, u * u),
            (&mut f.ur, u * r),
            (&mut f.rr, r * r),
            (&mut f.ut, u * t),
            (&mut f.rt, r * t),
        ] {
            *sum = *sum * FIT_DECAY + add;
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

    /// How many of up to `max` draft-model tokens a sequence should verify in a step that
    /// already holds `rows` rows (its own next token among them) from `generating` sequences,
    /// given its acceptance rate; each token costs a draft decode too (the lookup's guesses,
    /// free to make, are cut by `joint_lens`).
    pub fn best_len(&self, max: usize, rows: usize, generating: usize, accept: f64) -> usize {
        self.best(max, (rows, generating), accept, MARGIN)
    }

    /// `best_len`, where a draft must look `margin` times better than none.
    fn best(
        &self,
        max: usize,
        (rows, generating): (usize, usize),
        accept: f64,
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
            let drafting = k as f64 * self.draft_step;
            let rate = (others + expected_tokens(accept, k)) / (step + drafting);
            if rate > best.1 {
                best = (k, rate);
            }
        }
        best.0
    }

    /// How many of their guessed tokens each of several sequences should verify in one step
    /// that holds `rows` rows (every generating sequence's next token) from `generating`
    /// sequences, `spare` more at most; `offers`: each sequence's guessed tokens and rate of
    /// taken guesses. The j-th token of a guess taken with rate a adds a^j tokens to the step's
    /// expected yield and a row to its cost; the likeliest are taken first, as many as
    /// maximize the expected tokens per second, by `MARGIN` over none. Chosen together, as one
    /// sequence alone would price its rows against a smaller decode, where each row looks
    /// dearer than it is once others draft too.
    pub fn joint_lens(
        &self,
        offers: &[(usize, f64)],
        (rows, generating): (usize, usize),
        spare: usize,
    ) -> Vec<usize> {
        let mut lens = vec![0; offers.len()];
        let explore = |lens: &mut Vec<usize>| {
            // too little known yet: measure short drafts' size
            let mut left = spare;
            for (len, &(n, _)) in lens.iter_mut().zip(offers) {
                *len = n.min(PROBE_LEN).min(left);
                left -= *len;
            }
        };
        let Some(base) = self.cost(rows) else {
            explore(&mut lens);
            return lens;
        };
        // (chance of being taken, whose): a sequence's own stay in order (a stable sort)
        let mut tokens: Vec<(f64, usize)> = offers
            .iter()
            .enumerate()
            .flat_map(|(i, &(n, a))| (1..=n).map(move |j| (a.powi(j as i32), i)))
            .collect();
        tokens.sort_by(|x, y| y.0.total_cmp(&x.0));
        tokens.truncate(spare);
        let mut expected = generating as f64;
        let mut best = (0, expected / base * MARGIN);
        for (k, &(chance, _)) in tokens.iter().enumerate() {
            let Some(step) = self.cost(rows + k + 1) else {
                explore(&mut lens);
                return lens;
            };
            expected += chance;
            if expected / step > best.1 {
                best = (k + 1, expected / step);
            }
        }
        for &(_, i) in &tokens[..best.0] {
            lens[i] += 1;
        }
        lens
    }

    /// Rows that even out the rows of the sequences of a decode (`decoding`, a sequence's rows in
    /// position order) where that costs less than the ubatches libllama makes of uneven ones
    /// (`padding_pays`): a sequence with fewer rows than another (a shorter draft, or none) gets
    /// rows after its own, to be decoded without output and then removed. None that would not
    /// fit one ubatch of `n_ubatch` rows or would reach past `ctx_size`.
    pub fn padding(
        &self,
        decoding: &[BatchItem],
        n_ubatch: usize,
        ctx_size: usize,
    ) -> Vec<BatchItem> {
        let rows = by_seq(decoding);
        let longest = rows.iter().map(|r| r.1).max().unwrap_or(0);
        let counts: Vec<(i32, usize)> = rows.iter().map(|r| (r.0, r.1)).collect();
        if longest * rows.len() > n_ubatch
            || rows.iter().any(|r| r.2 as usize + longest - r.1 > ctx_size)
            || !self.padding_pays(&counts, n_ubatch)
        {
            return Vec::new();
        }
        let mut padding = Vec::new();
        for &(seq, n, pos, token) in &rows {
            for k in 0..longest - n {
                padding.push(BatchItem {
                    token,
                    pos: pos + k as i32,
                    seq,
                    output: false,
                });
            }
        }
        padding
    }

    /// Whether padding the sequences of a step to the same number of rows (`rows`: each one's,
    /// by ascending sequence id; the padding decoded and dropped) is expected to cost less than
    /// the ubatches libllama makes of the uneven rows (`ubatches`). Each ubatch is priced on a
    /// line fitted to the measured decodes: a floor (reading the weights) plus a cost per row.
    /// Until that is known, no padding.
    pub fn padding_pays(&self, rows: &[(i32, usize)], n_ubatch: usize) -> bool {
        let longest = rows.iter().map(|r| r.1).max().unwrap_or(0);
        let even: Vec<(i32, usize)> = rows.iter().map(|&(seq, _)| (seq, longest)).collect();
        let (split, padded) = (ubatches(rows, n_ubatch), ubatches(&even, n_ubatch));
        if split.len() <= padded.len() {
            return false;
        }
        let Some((floor, per_row)) = self.line() else {
            return false;
        };
        let price = |u: &[usize]| u.len() as f64 * floor + u.iter().sum::<usize>() as f64 * per_row;
        price(&padded) < price(&split)
    }

    /// The fitted (floor per ubatch, cost per row), neither below 0; None until decodes of
    /// different shapes tell them apart.
    fn line(&self) -> Option<(f64, f64)> {
        let f = &self.fit;
        let det = f.uu * f.rr - f.ur * f.ur;
        if det <= 1e-9 * f.uu * f.rr {
            return None;
        }
        let floor = (f.ut * f.rr - f.ur * f.rt) / det;
        let per_row = (f.uu * f.rt - f.ur * f.ut) / det;
        Some((floor.max(0.0), per_row.max(0.0)))
    }

    /// Whether the draft model may pay in such a step at all, were its guesses taken as often
    /// as a good draft model's are, by a margin: what the costs leave out (the draft model's
    /// reading of the prompt before its first guess and after every stretch without drafts,
    /// sampling each verified row) must be paid too. If not, a sequence need not even try it.
    pub fn model_may_pay(&self, max: usize, rows: usize, generating: usize) -> bool {
        self.draft_step == 0.0
            || self.best(max, (rows, generating), GOOD_ACCEPTANCE, MODEL_MARGIN) > 0
    }
}

/// A decode's sequences, ascending: (sequence, its rows, the position after its last, its last
/// token).
fn by_seq(items: &[BatchItem]) -> Vec<(i32, usize, i32, i32)> {
    let mut rows: Vec<(i32, usize, i32, i32)> = Vec::new();
    for item in items {
        match rows.iter_mut().find(|r| r.0 == item.seq) {
            Some(r) => *r = (r.0, r.1 + 1, r.2.max(item.pos + 1), item.token),
            None => rows.push((item.seq, 1, item.pos + 1, item.token)),
        }
    }
    rows.sort_unstable_by_key(|r| r.0);
    rows
}

/// Where each sequence's rows in `padding` (from `StepCosts::padding`) start: (sequence,
/// position), what to remove from the KV cache after the decode.
pub fn padding_starts(padding: &[BatchItem]) -> impl Iterator<Item = (i32, i32)> + '_ {
    (padding.iter().enumerate())
        .filter(|&(k, pad)| k == 0 || padding[k - 1].seq != pad.seq)
        .map(|(_, pad)| (pad.seq, pad.pos))
}

/// How many ubatches libllama makes of `items` (`ubatches`).
pub fn ubatch_count(items: &[BatchItem], n_ubatch: usize) -> usize {
    let rows: Vec<(i32, usize)> = by_seq(items).iter().map(|r| (r.0, r.1)).collect();
    ubatches(&rows, n_ubatch).len()
}

/// The rows of each ubatch libllama makes of a batch whose sequences (`rows`: ascending ids,
/// each with its rows; one KV stream per sequence) are decoded together: a ubatch takes a run of
/// consecutive sequence ids that all have rows left, and as many rows from each as the one
/// with the fewest has (`llama_batch_allocr::split_equal`, sequential). So rows of 4, 2, 4 and 3
/// make ubatches of 8, 2, 2 and 1 rows, each reading all the weights (measured on Qwen2.5-Coder
/// 1.5B on 2 cores: 400 ms, where 4 rows each took 190).
pub fn ubatches(rows: &[(i32, usize)], n_ubatch: usize) -> Vec<usize> {
    let mut left = rows.to_vec();
    let mut made = Vec::new();
    while let Some(first) = left.iter().position(|r| r.1 > 0) {
        let mut end = first + 1;
        while end < left.len()
            && left[end].1 > 0
            && left[end].0 == left[end - 1].0 + 1
            && end - first < n_ubatch.max(1)
        {
            end += 1;
        }
        let run = &mut left[first..end];
        let each = (run.iter().map(|r| r.1).min().unwrap_or(0)).min((n_ubatch / run.len()).max(1));
        for r in run.iter_mut() {
            r.1 -= each;
        }
        made.push(each * (end - first));
    }
    made
}

/// One step's draft-model drafts in draft mode, priced as they are made: the guesses at hand
/// are verified, the likeliest first, where they bring more tokens per second of their cost
/// than the step's rate so far or plain decoding's, whichever is better (`bar`; `take`), and
/// another draft decode is made where the guesses it is expected to bring would (`another`).
/// A guess's chance of being taken is the chance of the one before it times its own
/// (`Calibration`); the step's time is its target decode's (`StepCosts`) and its draft
/// decodes' so far. So a sure draft runs to its longest, and one whose next guess would cost
/// a step more than it brings stops there: on a CPU with several streams, where a row costs
/// almost what a token brings, drafts stay short.
pub struct DraftBudget<'a> {
    costs: &'a StepCosts,
    /// Rows of the step so far, and the tokens it is expected to yield.
    rows: usize,
    expected: f64,
    /// Seconds of draft decodes so far.
    drafting: f64,
    /// Plain decoding's rate: the generating sequences' tokens over a step of their rows.
    plain: f64,
}

impl<'a> DraftBudget<'a> {
    /// A step of `rows` rows from `generating` sequences before the draft model's drafts; None
    /// while the costs do not tell yet what a step or a draft decode costs (drafts are then
    /// made in full, and measured).
    pub fn new(costs: &'a StepCosts, rows: usize, generating: usize) -> Option<Self> {
        if costs.draft_step == 0.0 {
            return None;
        }
        let step = costs.cost(rows)?;
        Some(Self {
            costs,
            rows,
            expected: generating as f64,
            drafting: 0.0,
            plain: generating as f64 / step,
        })
    }

    /// What a guess must bring per second of its cost: the step's rate so far, or plain
    /// decoding's where that is better (the draft decodes made are spent whatever comes next:
    /// against the step's rate alone, a step that paid for them takes guesses worth less
    /// than not drafting would yield); and the step's `net` at that bar as it stands.
    fn bar(&self) -> Option<(f64, f64)> {
        let time = self.costs.cost(self.rows)? + self.drafting;
        let bar = (self.expected / time).max(self.plain);
        Some((bar, self.expected - bar * time))
    }

    /// The expected tokens minus `bar` times the time, at `rows` rows (the Dinkelbach form of
    /// a rate: positive where a change raises the rate above `bar`).
    fn net(&self, bar: f64, rows: usize, expected: f64, drafting: f64) -> Option<f64> {
        Some(expected - bar * (self.costs.cost(rows)? + drafting))
    }

    /// A draft decode took `took`.
    pub fn spent(&mut self, took: Duration) {
        self.drafting += took.as_secs_f64();
    }

    /// Which of the guesses at hand to verify, given each one's chance of being taken: the
    /// likeliest first, as many as bring the most over `bar`.
    pub fn take(&mut self, chances: &[f64]) -> Vec<bool> {
        let mut order: Vec<usize> = (0..chances.len()).collect();
        order.sort_by(|&x, &y| chances[y].total_cmp(&chances[x]));
        let Some((bar, now)) = self.bar() else {
            return vec![false; chances.len()];
        };
        let (mut best, mut expected) = ((0, now, self.expected), self.expected);
        for (k, &i) in order.iter().enumerate() {
            expected += chances[i];
            let Some(value) = self.net(bar, self.rows + k + 1, expected, self.drafting) else {
                break;
            };
            if value > best.1 {
                best = (k + 1, value, expected);
            }
        }
        self.rows += best.0;
        self.expected = best.2;
        let mut keep = vec![false; chances.len()];
        for &i in &order[..best.0] {
            keep[i] = true;
        }
        keep
    }

    /// Whether drafting on pays: each of the drafts going on (its chance of being taken whole
    /// so far, and the chance of each guess after, as likely as its last) makes up to `left`
    /// more guesses, a draft decode and a row each, and some number of them is expected to
    /// bring more than `bar`. Not only the next one: on a CPU a decode's rows may cost little
    /// more from one ubatch shape to the next, and then more at once.
    pub fn another(&self, going: &[(f64, f64)], left: usize) -> bool {
        let Some((bar, now)) = self.bar() else {
            return false;
        };
        let mut expected = self.expected;
        let mut whole: Vec<f64> = going.iter().map(|g| g.0).collect();
        for h in 1..=left {
            for (w, &(_, q)) in whole.iter_mut().zip(going) {
                *w *= q;
                expected += *w;
            }
            let drafting = self.drafting + h as f64 * self.costs.draft_step;
            match self.net(bar, self.rows + h * going.len(), expected, drafting) {
                Some(value) if value > now => return true,
                Some(_) => {}
                None => return false,
            }
        }
        false
    }
}

/// How often the target takes a draft model's guess, by the draft model's own probability of
/// it, learned while serving: its confidence is not the target's odds (Qwen2.5-Coder 0.5B's
/// guesses at 0.75 and above were taken 98-100 % of the time by its 1.5B, on code). Counted in
/// bins of that probability; a guess counts only where every one before it was taken. Until
/// guesses are seen, a bin believes the draft model, and so it does again for one guess after
/// `PROBE_AFTER` guesses of it in a row that the costs declined: a bin learned low would
/// otherwise never be tried again, as its guesses would never be verified.
#[derive(Debug, Clone)]
pub struct Calibration {
    taken: [f64; BINS],
    seen: [f64; BINS],
    declined: [u32; BINS],
}

const BINS: usize = 10;
/// Guesses' worth of belief in the draft model's own probability, before any is seen.
const PRIOR: f64 = 4.0;
/// The weight each seen guess leaves the ones before it in its bin.
const BIN_DECAY: f64 = 0.99;

impl Default for Calibration {
    fn default() -> Self {
        Self {
            taken: std::array::from_fn(|b| Self::believed(b) * PRIOR),
            seen: [PRIOR; BINS],
            declined: [0; BINS],
        }
    }
}

impl Calibration {
    fn bin(p: f32) -> usize {
        ((p.max(0.0) * BINS as f32) as usize).min(BINS - 1)
    }

    /// The draft model's own belief in a guess of bin `b`: its middle.
    fn believed(b: usize) -> f64 {
        (b as f64 + 0.5) / BINS as f64
    }

    /// The chance that a guess of probability `p` is taken, where the ones before it were.
    pub fn odds(&self, p: f32) -> f64 {
        let b = Self::bin(p);
        if self.declined[b] >= PROBE_AFTER {
            return Self::believed(b);
        }
        self.taken[b] / self.seen[b]
    }

    /// A guess of probability `p` was verified: `taken` or not.
    pub fn record(&mut self, p: f32, taken: bool) {
        let b = Self::bin(p);
        self.taken[b] = self.taken[b] * BIN_DECAY + f64::from(u8::from(taken));
        self.seen[b] = self.seen[b] * BIN_DECAY + 1.0;
        self.declined[b] = 0;
    }

    /// A draft's first guess, of probability `p`, was made and not verified.
    pub fn declined(&mut self, p: f32) {
        let b = Self::bin(p);
        self.declined[b] = self.declined[b].saturating_add(1);
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
    /// A guess not verified, and how much of it the tokens generated since have matched.
    watched: Vec<i32>,
    matched: usize,
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
            watched: Vec::new(),
            matched: 0,
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

    /// The rate a draft model's next guesses are expected to be taken at: this sequence's so
    /// far, or a good draft model's where that is not known (a probe).
    pub fn expected(&self) -> f64 {
        if self.probing() {
            GOOD_ACCEPTANCE
        } else {
            self.rate()
        }
    }

    /// A probe was made, whatever was verified of it: a draft model's guesses may all be
    /// declined by the costs once seen, which must not make every later step a probe.
    pub fn probed(&mut self) {
        self.observed = true;
        self.idle = 0;
    }

    /// Check `guess`, made for the tokens that the coming steps generate, against them as
    /// they come (`generated`) and count it as a draft verified: a guess costs nothing to
    /// check this way, where verifying it would cost its rows. One at a time.
    pub fn watch(&mut self, guess: Vec<i32>) {
        if self.watched.is_empty() {
            self.watched = guess;
            self.matched = 0;
        }
    }

    pub fn watching(&self) -> bool {
        !self.watched.is_empty()
    }

    /// The sequence generated `token`: a watched guess it departs from or completes counts.
    pub fn generated(&mut self, token: i32) {
        let Some(&guessed) = self.watched.get(self.matched) else {
            return;
        };
        if guessed == token {
            self.matched += 1;
            if self.matched < self.watched.len() {
                return;
            }
        }
        let guess = std::mem::take(&mut self.watched);
        self.record(guess.len(), self.matched);
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
        let mut c = StepCosts::new(128);
        for &(rows, ms) in per_row {
            c.record(rows, Duration::from_secs_f64(ms / 1000.0));
            c.record_ubatches(1, rows, Duration::from_secs_f64(ms / 1000.0));
        }
        c
    }

    #[test]
    fn unknown_sizes_are_explored_then_known_ones_decide() {
        let c = StepCosts::new(64);
        assert_eq!(c.best_len(8, 1, 1, 0.5), PROBE_LEN);
        assert_eq!(costs(&[(1, 100.0)]).best_len(8, 1, 1, 0.5), PROBE_LEN);
        // a CPU (the 1.5B's measured costs): only a likely draft pays, and not a long one
        let cpu = costs(&[
            (1, 100.0),
            (2, 158.0),
            (3, 226.0),
            (5, 304.0),
            (9, 597.0),
            (17, 1080.0),
        ]);
        assert_eq!(cpu.best_len(8, 1, 1, 0.3), 0);
        assert_eq!(cpu.best_len(8, 1, 1, 0.95), 4);
        // a GPU: rows are nearly free; drafting pays even at modest acceptance
        let gpu = costs(&[(1, 10.0), (5, 10.5), (9, 11.0), (17, 12.0), (33, 14.0)]);
        assert_eq!(gpu.best_len(8, 1, 1, 0.9), 8);
        // four streams on a CPU: the same draft pays less than alone
        let alone = cpu.best_len(8, 1, 1, 0.7);
        let shared = cpu.best_len(8, 4, 4, 0.7);
        assert!(shared <= alone, "{shared} > {alone}");
        // a draft model's own steps count against its drafts
        let mut drafting = gpu.clone();
        drafting.record_draft(Duration::from_millis(8));
        assert!(drafting.best_len(8, 1, 1, 0.9) < 8);
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

    /// How long drafts of guesses each taken with chance `q` get in a step of `streams`
    /// sequences all drafting, guess by guess as `ModelDrafts` asks the budget (at most 16).
    fn budget_len(costs: &StepCosts, streams: usize, q: f64) -> usize {
        let mut b = DraftBudget::new(costs, streams, streams).expect("costs known");
        b.spent(Duration::from_secs_f64(costs.draft_step)); // the catch-up
        let mut whole = 1.0;
        for len in 0..16 {
            let kept = b.take(&vec![whole * q; streams]);
            if kept.contains(&false) {
                assert!(!kept.contains(&true), "equal guesses are taken alike");
                return len;
            }
            whole *= q;
            if !b.another(&vec![(whole, q); streams], 16 - len - 1) {
                return len + 1;
            }
            b.spent(Duration::from_secs_f64(costs.draft_step));
        }
        16
    }

    #[test]
    fn a_draft_goes_on_while_its_next_guess_pays_for_its_row_and_its_draft_decode() {
        // Qwen2.5-Coder 1.5B on 2 cores, with its 0.5B drafting at 56 ms a decode
        let mut cpu = costs(&[
            (1, 100.0),
            (2, 163.0),
            (5, 231.0),
            (8, 330.0),
            (17, 580.0),
            (68, 2300.0),
        ]);
        assert!(
            DraftBudget::new(&cpu, 1, 1).is_none(),
            "a draft decode never timed"
        );
        cpu.record_draft(Duration::from_millis(56));
        // alone, a sure draft runs to its longest; a doubtful one stops early, or never starts
        assert_eq!(budget_len(&cpu, 1, 1.0), 16);
        let doubtful = budget_len(&cpu, 1, 0.9);
        assert!((2..6).contains(&doubtful), "{doubtful}");
        assert_eq!(budget_len(&cpu, 1, 0.3), 0);
        // four streams: a row costs nearly what a token brings, so drafts are shorter
        let shared = budget_len(&cpu, 4, 0.9);
        assert!(shared < doubtful, "{shared} >= {doubtful}");
        assert!(budget_len(&cpu, 4, 1.0) >= 3);
        // a GPU, where rows are nearly free and a draft decode is cheap: longer drafts pay
        let mut gpu = costs(&[(1, 10.0), (5, 10.5), (17, 12.0), (68, 16.0)]);
        gpu.record_draft(Duration::from_millis(2));
        let (on_gpu, on_cpu) = (budget_len(&gpu, 4, 0.95), budget_len(&cpu, 4, 0.95));
        assert!(on_gpu >= 2 * on_cpu, "{on_gpu} < 2 * {on_cpu}");
        assert_eq!(budget_len(&gpu, 4, 1.0), 16);
        // of uneven guesses, the likely ones are taken
        let mut b = DraftBudget::new(&cpu, 4, 4).expect("known");
        assert_eq!(
            b.take(&[0.2, 0.99, 0.1, 0.98]),
            vec![false, true, false, true]
        );
    }

    #[test]
    fn calibration_learns_how_often_guesses_of_a_probability_are_taken() {
        let mut c = Calibration::default();
        // before any is seen, the draft model is believed
        assert!((c.odds(0.82) - 0.85).abs() < 1e-9);
        assert!((c.odds(1.0) - 0.95).abs() < 1e-9);
        // a draft model too modest: its guesses at 0.8 were always taken
        for _ in 0..100 {
            c.record(0.8, true);
        }
        assert!(c.odds(0.85) > 0.95);
        // one too sure: at 0.95, taken half the time; other bins are untouched
        for k in 0..100 {
            c.record(0.97, k % 2 == 0);
        }
        assert!((c.odds(0.99) - 0.5).abs() < 0.05, "{}", c.odds(0.99));
        assert!((c.odds(0.3) - 0.35).abs() < 1e-9);
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
        assert_eq!(c.best_len(16, 1, 1, 0.9), 9);
        c.record(10, Duration::from_millis(190));
        assert_eq!(c.best_len(16, 1, 1, 0.9), 16);
        // where it costs twice as much, the next size up is tried once more, then not
        let mut c = costs(&[(1, 100.0), (5, 180.0)]);
        c.record(10, Duration::from_millis(360));
        assert_eq!(c.best_len(16, 1, 1, 0.9), 16);
        c.record(17, Duration::from_millis(680));
        assert!(c.best_len(16, 1, 1, 0.9) <= 4);
    }

    #[test]
    fn ubatches_take_as_many_rows_from_each_of_a_run_of_sequences() {
        assert_eq!(ubatches(&[(0, 4), (1, 4), (2, 4), (3, 4)], 64), vec![16]);
        // uneven drafts: the fewest rows from each, then runs of the ones with rows left
        assert_eq!(
            ubatches(&[(0, 4), (1, 2), (2, 4), (3, 3)], 64),
            vec![8, 2, 2, 1]
        );
        assert_eq!(ubatches(&[(0, 4), (1, 1), (2, 1), (3, 1)], 64), vec![4, 3]);
        // ids that are not consecutive never share a ubatch
        assert_eq!(ubatches(&[(0, 1), (2, 1)], 64), vec![1, 1]);
        // a long prompt beside tokens: the tokens with its first row, then the rest of it
        assert_eq!(ubatches(&[(0, 1), (1, 1), (2, 100)], 64), vec![3, 64, 35]);
        assert_eq!(ubatches(&[(0, 10), (1, 10)], 8), vec![8, 8, 4]);
        assert_eq!(ubatches(&[], 8), Vec::<usize>::new());
    }

    #[test]
    fn padding_pays_where_a_ubatch_costs_more_than_the_rows_it_saves() {
        let fitted = |decodes: &[(usize, usize, u64)]| {
            let mut c = StepCosts::new(128);
            for &(ubatches, rows, ms) in decodes {
                c.record_ubatches(ubatches, rows, Duration::from_millis(ms));
            }
            c
        };
        // decodes measured on this CPU (Qwen2.5-Coder 1.5B, 4 sequences; ubatches, rows, ms):
        // a ubatch costs ~76 ms (reading the weights), a row ~8.7 ms
        let weights = fitted(&[
            (1, 4, 90),
            (1, 16, 190),
            (1, 68, 650),
            (4, 13, 400),
            (2, 7, 199),
            (4, 48, 765),
        ]);
        assert!(weights.padding_pays(&[(0, 4), (1, 2), (2, 4), (3, 3)], 128));
        assert!(weights.padding_pays(&[(0, 17), (1, 5), (2, 17), (3, 9)], 128));
        // one long draft among tokens: 68 rows for 20 cost more than a second ubatch
        assert!(!weights.padding_pays(&[(0, 17), (1, 1), (2, 1), (3, 1)], 128));
        // even rows, or rows that would not fit one ubatch: nothing to gain
        assert!(!weights.padding_pays(&[(0, 4), (1, 4)], 128));
        assert!(!weights.padding_pays(&[(0, 40), (1, 2)], 64));
        // a CPU where every row costs (AMD, 2 cores: 1, 5 and 17 rows took 100, 304, 1080 ms)
        let rows = fitted(&[(1, 1, 100), (1, 5, 304), (1, 17, 1080)]);
        assert!(!rows.padding_pays(&[(0, 4), (1, 2), (2, 4), (3, 3)], 128));
        // a GPU: rows nearly free
        let gpu = costs(&[(4, 10.0), (16, 10.5), (64, 12.0)]);
        assert!(gpu.padding_pays(&[(0, 17), (1, 1), (2, 1), (3, 1)], 128));
        // nothing known: no padding; decodes of one shape do not tell a ubatch from its rows
        assert!(!StepCosts::new(64).padding_pays(&[(0, 4), (1, 2), (2, 4), (3, 3)], 64));
        assert!(!fitted(&[(2, 4, 90), (1, 2, 45)]).padding_pays(&[(0, 2), (1, 1)], 64));
    }

    #[test]
    fn guesses_are_cut_together_likeliest_first() {
        // four streams on a CPU where 20 rows cost twice what 4 do (the 1.5B's shape): each
        // sequence's guesses, priced alone against the 4 rows, do not pay; together they do
        let cpu = costs(&[(1, 100.0), (4, 160.0), (8, 250.0), (20, 320.0)]);
        assert_eq!(cpu.best_len(4, 4, 4, 0.77), 0);
        assert_eq!(cpu.joint_lens(&[(4, 0.77); 4], (4, 4), 60), vec![4; 4]);
        // a likely guess goes before an unlikely one, and a sequence's own in order
        let lens = cpu.joint_lens(&[(4, 0.2), (4, 0.95), (2, 0.77), (0, 0.9)], (4, 4), 60);
        assert_eq!(lens[3], 0);
        assert!(lens[1] == 4 && lens[0] < lens[2], "{lens:?}");
        // never more rows than are spare
        let lens = cpu.joint_lens(&[(4, 0.77); 4], (4, 4), 6);
        assert!(lens.iter().sum::<usize>() <= 6, "{lens:?}");
        // guesses seldom taken: none
        assert_eq!(cpu.joint_lens(&[(4, 0.1); 4], (4, 4), 60), vec![0; 4]);
        // nothing measured yet: short drafts are tried, to measure their size
        let none = StepCosts::new(64);
        assert_eq!(
            none.joint_lens(&[(8, 0.5), (2, 0.5)], (2, 2), 5),
            vec![4, 1]
        );
    }

    #[test]
    fn a_watched_guess_counts_as_far_as_the_generated_tokens_match_it() {
        let mut a = Acceptance::default();
        a.watch(vec![1, 2, 3, 4]);
        a.watch(vec![7, 7]); // one at a time: ignored
        a.generated(1);
        a.generated(2);
        assert!(a.watching() && a.probing());
        a.generated(9); // departs: 2 of 4 taken
        assert!(!a.watching() && !a.probing());
        assert_eq!(a.rate(), (0.8 + 2.0) / (1.6 + 4.0));
        a.watch(vec![5, 6]);
        a.generated(5);
        a.generated(6); // complete: 2 of 2
        assert!(!a.watching());
        assert_eq!(
            a.rate(),
            ((0.8 + 2.0) * 0.8 + 2.0) / ((1.6 + 4.0) * 0.8 + 2.0)
        );
        a.generated(5); // nothing watched: nothing counts
        assert_eq!(
            a.rate(),
            ((0.8 + 2.0) * 0.8 + 2.0) / ((1.6 + 4.0) * 0.8 + 2.0)
        );
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
