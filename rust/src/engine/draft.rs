//! Draft-free speculation: guesses of the tokens a sequence will generate next, which the
//! batcher verifies in the same decode as everything else (see `batcher.rs`).
//!
//! `Ngram` looks the sequence's latest tokens up earlier in its own prompt and output (prompt
//! lookup): edits, rewrites and quotes repeat long runs. `Prediction` follows a text the
//! client expects (OpenAI's predicted outputs). A `Pacer` decides how many of the guessed
//! tokens a step verifies: on a CPU each extra row of a decode costs most of a token, so a
//! rejected draft is paid in full, and drafting backs off quickly when guesses miss.

/// Proposes tokens likely to follow a sequence.
pub trait Drafter: Send {
    /// Up to `max` tokens to follow `history` (every token of the sequence so far: the prompt,
    /// the generated tokens, the last one about to be decoded).
    fn draft(&mut self, history: &[i32], max: usize) -> Vec<i32>;
}

/// Prompt lookup: the longest suffix of the history (of `MIN_MATCH..=MAX_MATCH` tokens) seen
/// before, and the tokens that followed its latest earlier occurrence.
pub struct Ngram;

/// Shorter matches guess too often wrong to pay for their rows (measured: 3-token matches on
/// a write-new-code prompt were taken under half and cost 0.92x).
const MIN_MATCH: usize = 4;
const MAX_MATCH: usize = 8;

impl Drafter for Ngram {
    fn draft(&mut self, history: &[i32], max: usize) -> Vec<i32> {
        (MIN_MATCH..=MAX_MATCH.min(history.len().saturating_sub(1)))
            .rev()
            .find_map(|n| follow(history, &history[history.len() - n..], max))
            .unwrap_or_default()
    }
}

/// The tokens after the latest occurrence of `key` in `history` that ends before the
/// history does (its own suffix excluded), up to `max` and never an image placeholder.
fn follow(history: &[i32], key: &[i32], max: usize) -> Option<Vec<i32>> {
    let n = key.len();
    let last = history.len().checked_sub(n + 1)?;
    let at = (0..=last).rev().find(|&i| &history[i..i + n] == key)?;
    let after = &history[at + n..];
    let draft: Vec<i32> = after
        .iter()
        .take(max)
        .take_while(|&&t| t >= 0)
        .copied()
        .collect();
    (!draft.is_empty()).then_some(draft)
}

/// OpenAI's predicted output: the expected text's tokens, followed where the generated text
/// agrees with them, and found again (by the generated text's latest tokens) after it departs.
pub struct Prediction {
    tokens: Vec<i32>,
    /// Where in `tokens` the next generated token is expected; None when lost.
    cursor: Option<usize>,
    /// History tokens already followed (the prompt's are never compared).
    seen: usize,
    prompt_len: usize,
}

/// Tokens of generated text that must match the prediction to find the place again.
const REALIGN: usize = 2;

impl Prediction {
    pub fn new(tokens: Vec<i32>, prompt_len: usize) -> Self {
        Self {
            tokens,
            cursor: Some(0),
            seen: prompt_len,
            prompt_len,
        }
    }
}

impl Drafter for Prediction {
    fn draft(&mut self, history: &[i32], max: usize) -> Vec<i32> {
        for i in self.seen.min(history.len())..history.len() {
            let t = history[i];
            self.cursor = match self.cursor {
                Some(c) if self.tokens.get(c) == Some(&t) => Some(c + 1),
                _ => {
                    // the generated text so far (at least `REALIGN` tokens of it) found again
                    let generated = &history[self.prompt_len.min(i)..=i];
                    let n = REALIGN.min(generated.len());
                    let key = &generated[generated.len() - n..];
                    (n == REALIGN)
                        .then(|| self.tokens.windows(n).rposition(|w| w == key))
                        .flatten()
                        .map(|at| at + n)
                }
            };
        }
        self.seen = history.len();
        match self.cursor {
            Some(c) => self.tokens[c.min(self.tokens.len())..]
                .iter()
                .take(max)
                .copied()
                .collect(),
            None => Vec::new(),
        }
    }
}

/// How many drafted tokens a sequence verifies each step.
///
/// A draft that was taken whole doubles the next one (up to `max`); one taken at least half is
/// cut to what was taken plus one. A draft taken less than half is a miss: the length drops to
/// what was taken (at least 1) and drafting pauses for a number of steps that doubles with
/// every miss in a row, so a sequence whose guesses do not pay soon decodes as if it never
/// drafted (measured: with 4 streams, drafts taken under half cost more rows than they save).
#[derive(Debug, Clone)]
pub struct Pacer {
    max: usize,
    len: usize,
    /// Steps left without drafting.
    wait: u32,
    /// The pause after the next miss.
    backoff: u32,
}

/// The longest pause: a sequence whose text turns repetitive later still gets to draft.
const MAX_BACKOFF: u32 = 64;

impl Pacer {
    /// Drafts of at most `max` tokens, the first of `start`.
    pub fn new(max: usize, start: usize) -> Self {
        Self {
            max,
            len: start.clamp(1, max.max(1)),
            wait: 0,
            backoff: 1,
        }
    }

    /// The draft length for this step (0: decode one token only).
    pub fn next_len(&mut self) -> usize {
        if self.max == 0 {
            return 0;
        }
        if self.wait > 0 {
            self.wait -= 1;
            return 0;
        }
        self.len
    }

    /// What became of a draft of `drafted` tokens.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        if accepted == drafted {
            self.len = (self.len * 2).min(self.max);
            self.backoff = 1;
        } else if accepted * 2 < drafted {
            self.len = accepted.max(1);
            self.wait = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        } else {
            self.len = (accepted + 1).min(self.max);
            self.backoff = 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_proposes_what_followed_the_longest_recent_match() {
        // "0 1 2 3 4 5 ... 0 1 2 3" -> "4 5 ..."
        let history = [0, 1, 2, 3, 4, 5, 6, 9, 0, 1, 2, 3];
        assert_eq!(Ngram.draft(&history, 3), vec![4, 5, 6]);
        // the latest occurrence wins
        let history = [0, 1, 2, 3, 7, 0, 0, 1, 2, 3, 8, 0, 0, 1, 2, 3];
        assert_eq!(Ngram.draft(&history, 2), vec![8, 0]);
        // a 3-token match is too short to draft on
        assert!(Ngram.draft(&[5, 6, 7, 8, 0, 6, 7, 8], 4).is_empty());
        // nothing repeats
        assert!(Ngram.draft(&[1, 2, 3, 4], 4).is_empty());
        // the longest match decides: "1 2 3 4" alone would point at 9
        let history = [7, 1, 2, 3, 4, 5, 1, 2, 3, 4, 9, 7, 1, 2, 3, 4];
        assert_eq!(Ngram.draft(&history, 1), vec![5]);
        // image placeholders are never proposed
        assert_eq!(Ngram.draft(&[0, 1, 2, 3, 5, -1, 0, 1, 2, 3], 4), vec![5]);
    }

    #[test]
    fn prediction_follows_and_finds_its_place_again() {
        let mut p = Prediction::new(vec![10, 11, 12, 13, 14, 15, 16], 2);
        // prompt [1, 2], first generated token 10: the rest of the prediction
        assert_eq!(p.draft(&[1, 2, 10], 3), vec![11, 12, 13]);
        assert_eq!(p.draft(&[1, 2, 10, 11, 12], 8), vec![13, 14, 15, 16]);
        // the output departs (99): lost until two tokens match the prediction again
        assert!(p.draft(&[1, 2, 10, 11, 12, 99], 8).is_empty());
        assert!(p.draft(&[1, 2, 10, 11, 12, 99, 14], 8).is_empty());
        assert_eq!(p.draft(&[1, 2, 10, 11, 12, 99, 14, 15], 8), vec![16]);
        // a first token that is not the prediction's
        let mut p = Prediction::new(vec![10, 11, 12, 13], 1);
        assert!(p.draft(&[1, 5], 4).is_empty());
        assert_eq!(p.draft(&[1, 5, 11, 12], 4), vec![13]);
    }

    #[test]
    fn pacer_grows_on_hits_and_backs_off_on_misses() {
        let mut p = Pacer::new(16, 4);
        assert_eq!(p.next_len(), 4);
        p.record(4, 4);
        assert_eq!(p.next_len(), 8);
        p.record(8, 8);
        p.record(16, 16);
        assert_eq!(p.next_len(), 16); // capped
        p.record(16, 9);
        assert_eq!(p.next_len(), 10);
        // taken less than half: a miss, paused one step, then as long as what was taken
        p.record(10, 3);
        assert_eq!((p.next_len(), p.next_len()), (0, 3));
        p.record(3, 3);
        // misses in a row: 1, then 2, then 4 steps without drafting
        let mut pauses = Vec::new();
        for _ in 0..3 {
            p.record(p.len, 0);
            let mut n = 0;
            while p.next_len() == 0 {
                n += 1;
            }
            pauses.push(n);
        }
        assert_eq!(pauses, vec![1, 2, 4]);
        assert_eq!(p.len, 1);
        // a hit resets the pause
        p.record(1, 1);
        p.record(2, 0);
        assert_eq!((p.next_len(), p.next_len()), (0, 1));
        assert_eq!(Pacer::new(0, 4).next_len(), 0);
    }
}
