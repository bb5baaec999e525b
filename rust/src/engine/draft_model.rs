//! Draft-model speculation: a second, smaller model with the target's vocabulary guesses the
//! next tokens of every speculating sequence, which the target then verifies in its ordinary
//! batched decode (`batcher.rs`).
//!
//! The draft model has a KV cache of its own, one sequence per slot, like the target's. It is
//! brought up to date lazily: when a sequence next drafts, whatever of its history the draft's
//! cache lacks (the prompt the first time, then the tokens the target accepted) is decoded in
//! one batch with every other drafting sequence's, then each draft step decodes one token per
//! sequence still drafting, greedily, until `max` tokens or a guess less likely than `min_p`,
//! or, in draft mode, where the costs say the next guess would not pay (`DraftBudget`; the
//! batcher asks for no draft at all where none may pay for this first decode). Tokens
//! the target rejects leave the draft's cache as they leave the target's (`trim`), and what it
//! took of each guess teaches how far the draft model's probabilities are to be trusted
//! (`verified`).

use std::time::{Duration, Instant};

use super::batcher::BatchItem;
use super::costs::{padding_starts, ubatch_count, Calibration, DraftBudget, StepCosts};

/// What drafting needs from the draft model's context.
pub trait DraftModel: Send {
    fn decode(&mut self, items: &[BatchItem]) -> Result<(), String>;
    /// The most likely token at output row `index` of the last decode, with its probability
    /// when `with_p` (else 1.0: a softmax over the vocabulary costs a little).
    fn top(&mut self, index: i32, with_p: bool) -> (i32, f32);
    /// Drop positions `from..` of a sequence.
    fn seq_rm(&mut self, seq: i32, from: i32) -> bool;
}

/// A request for a draft: sequence, its every token so far (the last one not decoded by the
/// target yet), the most tokens to guess, and the least probability of a guess worth verifying.
pub struct Ask<'a> {
    pub seq: i32,
    pub history: &'a [i32],
    pub max: usize,
    pub min_p: f32,
}

pub struct ModelDrafts {
    model: Box<dyn DraftModel>,
    /// Tokens in the draft model's cache, per sequence.
    cached: Vec<Vec<i32>>,
    /// Rows one decode takes.
    capacity: usize,
    /// Time spent in draft decodes of one token per sequence, and how many (what a drafted
    /// token costs; catching up a prompt is not counted).
    pub stepped: Duration,
    pub steps: u32,
    /// The draft model's decode times, fitted to pad uneven catch-ups (`StepCosts::padding`).
    costs: StepCosts,
    /// Positions per sequence.
    ctx_size: usize,
    /// The probability of each guess of every sequence's last draft, and how often guesses
    /// of such probabilities were taken.
    odds: Vec<Vec<f32>>,
    calibration: Calibration,
}

impl ModelDrafts {
    pub fn new(
        model: Box<dyn DraftModel>,
        parallel: usize,
        capacity: usize,
        ctx_size: usize,
    ) -> Self {
        let capacity = capacity.max(parallel).max(1);
        Self {
            model,
            cached: vec![Vec::new(); parallel],
            capacity,
            stepped: Duration::ZERO,
            steps: 0,
            costs: StepCosts::new(capacity),
            ctx_size,
            odds: vec![Vec::new(); parallel],
            calibration: Calibration::default(),
        }
    }

    /// Drafts for `asks`, in order, priced by `budget` where given; None when a draft decode
    /// failed (the draft's cache of these sequences is then forgotten, and the target decodes
    /// as if no one drafted).
    pub fn draft(
        &mut self,
        asks: &[Ask<'_>],
        budget: Option<DraftBudget<'_>>,
    ) -> Option<Vec<Vec<i32>>> {
        let mut drafts = vec![Vec::new(); asks.len()];
        if self.try_draft(asks, &mut drafts, budget).is_ok() {
            return Some(drafts);
        }
        for a in asks {
            self.model.seq_rm(a.seq, 0);
            self.cached[a.seq as usize].clear();
            self.odds[a.seq as usize].clear();
        }
        None
    }

    fn try_draft(
        &mut self,
        asks: &[Ask<'_>],
        drafts: &mut [Vec<i32>],
        mut budget: Option<DraftBudget<'_>>,
    ) -> Result<(), String> {
        let priced = budget.is_some();
        let with_p = |a: &Ask<'_>| a.min_p > 0.0 || priced;
        // catch up: what each sequence's draft cache lacks, the last token always (its logits
        // give the first guess)
        let mut rows = Vec::new();
        let mut owner = Vec::new();
        // rows by sequence id: libllama makes one ubatch per run of consecutive ids
        let mut by_seq: Vec<usize> = (0..asks.len()).collect();
        by_seq.sort_by_key(|&i| asks[i].seq);
        for &i in &by_seq {
            let a = &asks[i];
            let cached = &mut self.cached[a.seq as usize];
            let keep = common_prefix(cached, a.history).min(a.history.len() - 1);
            if keep < cached.len() {
                self.model.seq_rm(a.seq, keep as i32);
                cached.truncate(keep);
            }
            for (pos, &token) in a.history.iter().enumerate().skip(keep) {
                rows.push(BatchItem {
                    token,
                    pos: pos as i32,
                    seq: a.seq,
                    output: pos + 1 == a.history.len(),
                });
                owner.push(i);
            }
            cached.extend_from_slice(&a.history[keep..]);
        }
        // what the target accepted differs by sequence: uneven rows, as the target's drafts
        let padding = self.costs.padding(&rows, self.capacity, self.ctx_size);
        rows.extend(padding); // past `owner`'s end: dropped after the decode
        let mut last = vec![(0, 0.0f32); asks.len()];
        for (chunk, owners) in rows.chunks(self.capacity).zip(owner.chunks(self.capacity)) {
            let started = Instant::now();
            self.model.decode(chunk)?;
            let took = started.elapsed();
            let ubatches = ubatch_count(chunk, self.capacity);
            self.costs.record_ubatches(ubatches, chunk.len(), took);
            if let Some(b) = budget.as_mut() {
                b.spent(took);
            }
            for (index, (row, &i)) in chunk.iter().zip(owners).enumerate() {
                if row.output {
                    last[i] = self.model.top(index as i32, with_p(&asks[i]));
                }
            }
        }
        for (seq, pos) in padding_starts(&rows[owner.len()..]) {
            self.model.seq_rm(seq, pos);
        }
        // then one token per still drafting sequence and step
        for a in asks {
            self.odds[a.seq as usize].clear();
        }
        let mut going = by_seq;
        // each sequence's chance that its draft so far is taken whole
        let mut whole = vec![1.0f64; asks.len()];
        loop {
            going.retain(|&i| drafts[i].len() < asks[i].max && last[i].1 >= asks[i].min_p);
            // each guess at hand's chance of being taken, where the draft before it was
            let odds: Vec<f64> = (last.iter())
                .map(|&(_, p)| self.calibration.odds(p))
                .collect();
            if let Some(b) = budget.as_mut() {
                let chances: Vec<f64> = going.iter().map(|&i| whole[i] * odds[i]).collect();
                let mut keep = b.take(&chances).into_iter();
                let calibration = &mut self.calibration;
                going.retain(|&i| {
                    let kept = keep.next() == Some(true);
                    if !kept && drafts[i].is_empty() {
                        calibration.declined(last[i].1);
                    }
                    kept
                });
            }
            for &i in &going {
                whole[i] *= odds[i];
                drafts[i].push(last[i].0);
                self.odds[asks[i].seq as usize].push(last[i].1);
            }
            going.retain(|&i| drafts[i].len() < asks[i].max);
            // the next guesses, expected as likely as these
            if let Some(b) = budget.as_ref() {
                let on: Vec<(f64, f64)> = going.iter().map(|&i| (whole[i], odds[i])).collect();
                let left = going.iter().map(|&i| asks[i].max - drafts[i].len()).max();
                if !b.another(&on, left.unwrap_or(0)) {
                    return Ok(());
                }
            }
            if going.is_empty() {
                return Ok(());
            }
            let rows: Vec<BatchItem> = going
                .iter()
                .map(|&i| BatchItem {
                    token: last[i].0,
                    pos: (asks[i].history.len() + drafts[i].len() - 1) as i32,
                    seq: asks[i].seq,
                    output: true,
                })
                .collect();
            let started = Instant::now();
            self.model.decode(&rows)?;
            let took = started.elapsed();
            let ubatches = ubatch_count(&rows, self.capacity);
            self.costs.record_ubatches(ubatches, rows.len(), took);
            if let Some(b) = budget.as_mut() {
                b.spent(took);
            }
            self.stepped += took;
            self.steps += 1;
            for (index, &i) in going.iter().enumerate() {
                self.cached[asks[i].seq as usize].push(last[i].0);
                last[i] = self.model.top(index as i32, with_p(&asks[i]));
            }
        }
    }

    /// The target took the first `taken` guesses of a sequence's last draft; the next one it
    /// `rejected`, or never reached (the request finished).
    pub fn verified(&mut self, seq: i32, taken: usize, rejected: bool) {
        let odds = std::mem::take(&mut self.odds[seq as usize]);
        for (k, &p) in odds.iter().enumerate().take(taken + usize::from(rejected)) {
            self.calibration.record(p, k < taken);
        }
    }

    /// The target kept `keep` tokens of a sequence: the draft's cache keeps no more.
    pub fn trim(&mut self, seq: i32, keep: usize) {
        let cached = &mut self.cached[seq as usize];
        if cached.len() > keep {
            self.model.seq_rm(seq, keep as i32);
            cached.truncate(keep);
        }
    }
}

fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a fake draft model did: each decode's rows (token, pos, seq), and cuts (seq, from).
    #[derive(Default)]
    pub struct Log {
        pub decodes: Vec<Vec<(i32, i32, i32)>>,
        pub removed: Vec<(i32, i32)>,
    }

    /// Guesses "last token + 1" (as the batcher's fake target computes), except after a token
    /// in `wrong_after`, where it guesses 0, with probability `p` each; fails when `fail`; each
    /// ubatch of a decode (as libllama would make them) takes `delay`.
    pub struct FakeDraft {
        pub log: Arc<Mutex<Log>>,
        pub last: Vec<i32>,
        pub wrong_after: Vec<i32>,
        pub p: f32,
        pub fail: bool,
        pub delay: Duration,
    }

    impl FakeDraft {
        pub fn new(log: Arc<Mutex<Log>>) -> Self {
            Self {
                log,
                last: Vec::new(),
                wrong_after: Vec::new(),
                p: 0.9,
                fail: false,
                delay: Duration::ZERO,
            }
        }
    }

    impl DraftModel for FakeDraft {
        fn decode(&mut self, items: &[BatchItem]) -> Result<(), String> {
            if self.fail {
                return Err("boom".into());
            }
            let ubatches = ubatch_count(items, items.len().max(1)) as u32;
            std::thread::sleep(self.delay * ubatches);
            let rows = items.iter().map(|i| (i.token, i.pos, i.seq)).collect();
            self.log.lock().unwrap().decodes.push(rows);
            self.last = items.iter().map(|i| i.token).collect();
            Ok(())
        }
        fn top(&mut self, index: i32, _: bool) -> (i32, f32) {
            let t = self.last[index as usize];
            let guess = if self.wrong_after.contains(&t) {
                0
            } else {
                (t + 1) % 100
            };
            (guess, self.p)
        }
        fn seq_rm(&mut self, seq: i32, from: i32) -> bool {
            self.log.lock().unwrap().removed.push((seq, from));
            true
        }
    }

    fn ask(seq: i32, history: &[i32], max: usize) -> Ask<'_> {
        Ask {
            seq,
            history,
            max,
            min_p: 0.0,
        }
    }

    #[test]
    fn drafts_catch_up_once_then_go_token_by_token_for_all_sequences_at_once() {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut d = ModelDrafts::new(Box::new(FakeDraft::new(log.clone())), 2, 8, 64);
        let (h0, h1) = (vec![1, 2, 3], vec![50, 51]);
        let drafts = d.draft(&[ask(0, &h0, 3), ask(1, &h1, 2)], None);
        assert_eq!(drafts, Some(vec![vec![4, 5, 6], vec![52, 53]]));
        let l = log.lock().unwrap();
        // both prompts in one decode, then a row per drafting sequence per step
        assert_eq!(
            l.decodes,
            vec![
                vec![(1, 0, 0), (2, 1, 0), (3, 2, 0), (50, 0, 1), (51, 1, 1)],
                vec![(4, 3, 0), (52, 2, 1)],
                vec![(5, 4, 0)],
            ]
        );
        drop(l);
        // the target took 4 5 and then sampled 9: the draft's cache is cut after 1 2 3 4 5
        // (6 was never decoded), and the next draft decodes only the new token
        d.trim(0, 5);
        assert_eq!(log.lock().unwrap().removed, vec![]);
        let h0 = vec![1, 2, 3, 4, 5, 9];
        assert_eq!(d.draft(&[ask(0, &h0, 1)], None), Some(vec![vec![10]]));
        assert_eq!(log.lock().unwrap().decodes[3], vec![(9, 5, 0)]);
        // a rejected tail inside the draft's cache is removed from it
        d.trim(0, 3);
        assert_eq!(log.lock().unwrap().removed, vec![(0, 3)]);
    }

    #[test]
    fn draft_decodes_list_their_rows_by_sequence_and_drafts_come_back_in_asking_order() {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut d = ModelDrafts::new(Box::new(FakeDraft::new(log.clone())), 2, 8, 64);
        let (h0, h1) = (vec![1, 2], vec![50, 51]);
        let drafts = d.draft(&[ask(1, &h1, 2), ask(0, &h0, 2)], None);
        assert_eq!(drafts, Some(vec![vec![52, 53], vec![3, 4]]));
        let l = log.lock().unwrap();
        assert_eq!(
            l.decodes,
            vec![
                vec![(1, 0, 0), (2, 1, 0), (50, 0, 1), (51, 1, 1)],
                vec![(3, 2, 0), (52, 2, 1)],
            ]
        );
    }

    #[test]
    fn an_uneven_catch_up_is_padded_where_a_ubatch_costs_more_than_rows() {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut fake = FakeDraft::new(log.clone());
        fake.delay = Duration::from_millis(10);
        let mut d = ModelDrafts::new(Box::new(fake), 2, 16, 64);
        // prompts of 5 and 1 (two ubatches), then steps of a row each (one): the times tell a
        // ubatch from a row, and a ubatch is what costs
        let (h0, h1) = (vec![1, 2, 3, 4, 5], vec![50]);
        assert_eq!(
            d.draft(&[ask(0, &h0, 2), ask(1, &h1, 2)], None),
            Some(vec![vec![6, 7], vec![51, 52]])
        );
        // the target took 6 7 then 8 for sequence 0, and for 1 nothing then 9: two rows to catch
        // up for 0 (7, 8: 6 is in), one for 1 (9, its 51 cut), and one more for 1 as padding
        let (h0, h1) = (vec![1, 2, 3, 4, 5, 6, 7, 8], vec![50, 9]);
        assert_eq!(
            d.draft(&[ask(0, &h0, 1), ask(1, &h1, 1)], None),
            Some(vec![vec![9], vec![10]])
        );
        let l = log.lock().unwrap();
        let catch_up = &l.decodes[l.decodes.len() - 1];
        assert_eq!(catch_up, &vec![(7, 6, 0), (8, 7, 0), (9, 1, 1), (9, 2, 1)]);
        // the padding is dropped from the draft's cache right after
        assert_eq!(l.removed, vec![(1, 1), (1, 2)]);
    }

    #[test]
    fn a_priced_draft_stops_where_its_next_guess_would_not_pay_and_learns_from_verifies() {
        // Qwen2.5-Coder 1.5B on 2 cores, its 0.5B drafting at 56 ms a decode, 20 times quicker
        let mut cpu = StepCosts::new(64);
        for (rows, ms) in [(1, 100), (2, 163), (5, 231), (8, 330), (17, 580)] {
            cpu.record(rows, Duration::from_millis(ms) / 20);
        }
        let step = Duration::from_micros(2800);
        cpu.record_draft(step);
        let log = Arc::new(Mutex::new(Log::default()));
        let mut fake = FakeDraft::new(log.clone());
        fake.p = 0.95;
        fake.delay = step;
        let mut d = ModelDrafts::new(Box::new(fake), 1, 64, 256);
        let h = [1, 2, 3];
        let draft = |d: &mut ModelDrafts| {
            let budget = DraftBudget::new(&cpu, 1, 1);
            d.draft(&[ask(0, &h, 16)], budget).expect("drafts")[0].len()
        };
        // believed at 0.95 a guess, a draft stops after a few: each costs 80 ms (a row and a
        // draft decode) for 0.95 token, against 100 ms a token without drafting
        let believed = draft(&mut d);
        assert!((1..8).contains(&believed), "{believed}");
        // every guess taken: such guesses are learned to be sure, and drafts run to the longest
        for _ in 0..30 {
            let len = draft(&mut d);
            d.verified(0, len, false);
        }
        assert_eq!(draft(&mut d), 16);
        // every first guess rejected: once that outweighs the many taken before, drafting
        // stops paying, but for a probe after enough guesses declined in a row
        let mut declined = 0;
        for _ in 0..300 {
            let len = draft(&mut d);
            d.verified(0, 0, len > 0);
            declined += usize::from(len == 0);
        }
        assert!(declined > 150, "{declined}");
        let tried = (0..100).position(|_| draft(&mut d) > 0);
        assert!(tried.is_some_and(|n| n < 40), "{tried:?}");
    }

    #[test]
    fn a_history_that_departs_from_the_cache_cuts_it_there() {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut d = ModelDrafts::new(Box::new(FakeDraft::new(log.clone())), 1, 8, 64);
        d.draft(&[ask(0, &[1, 2, 3, 4], 2)], None);
        // another request in the slot, sharing "1 2"
        assert_eq!(d.draft(&[ask(0, &[1, 2, 7], 1)], None), Some(vec![vec![8]]));
        let l = log.lock().unwrap();
        assert_eq!(l.removed, vec![(0, 2)]);
        assert_eq!(l.decodes.last().unwrap(), &vec![(7, 2, 0)]);
    }

    #[test]
    fn unlikely_guesses_end_a_draft_and_a_failure_drafts_nothing() {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut fake = FakeDraft::new(log.clone());
        fake.p = 0.3;
        let mut d = ModelDrafts::new(Box::new(fake), 1, 2, 64);
        let h = [1, 2, 3];
        let sure = Ask {
            min_p: 0.5,
            ..ask(0, &h, 4)
        };
        assert_eq!(d.draft(&[sure], None), Some(vec![Vec::<i32>::new()]));
        // the catch-up went in chunks of the capacity
        assert_eq!(log.lock().unwrap().decodes.len(), 2);
        let mut failing = FakeDraft::new(log.clone());
        failing.fail = true;
        let mut d = ModelDrafts::new(Box::new(failing), 1, 8, 64);
        assert_eq!(d.draft(&[ask(0, &h, 4)], None), None);
        assert!(log.lock().unwrap().removed.contains(&(0, 0)));
    }
}
