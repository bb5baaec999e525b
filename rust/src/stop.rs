//! Streaming stop-sequence matcher.
//!
//! Generated text arrives as byte pieces (one per token) that may split both UTF-8 characters and
//! stop strings. The matcher releases text as soon as it can no longer be part of a stop string,
//! holding back only the longest tail that is still a prefix of some stop string, plus any
//! incomplete UTF-8 sequence.

/// What one `push` released.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    /// Text that is final and safe to send to the client.
    pub text: String,
    /// True once a stop string matched; `text` then ends right before it.
    pub stopped: bool,
}

#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Decoded text not yet released (could still begin a stop string).
    held: String,
    /// Trailing bytes of an incomplete UTF-8 character.
    partial: Vec<u8>,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for the given stop strings; empty strings are ignored.
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let stops = stops
            .into_iter()
            .map(Into::into)
            .filter(|s: &String| !s.is_empty())
            .collect();
        Self {
            stops,
            held: String::new(),
            partial: Vec::new(),
            stopped: false,
        }
    }

    /// Feed the bytes of the next token piece.
    pub fn push(&mut self, bytes: &[u8]) -> Step {
        if self.stopped {
            return Step {
                text: String::new(),
                stopped: true,
            };
        }
        self.partial.extend_from_slice(bytes);
        let complete = match std::str::from_utf8(&self.partial) {
            Ok(_) => self.partial.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // An invalid sequence (not merely truncated) will never complete: replace it.
            Err(_) => {
                let text = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                return self.push_str(&text);
            }
        };
        let rest = self.partial.split_off(complete);
        let text = String::from_utf8(std::mem::replace(&mut self.partial, rest))
            .expect("prefix checked as valid UTF-8");
        self.push_str(&text)
    }

    /// Feed already-decoded text.
    pub fn push_str(&mut self, text: &str) -> Step {
        if self.stopped {
            return Step {
                text: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(text);
        // A stop string that began earlier but is still incomplete takes precedence over a
        // complete later match, so the result does not depend on how the text was split.
        let pending = self.earliest_partial_start();
        match self.earliest_match() {
            Some(pos) if pending.is_none_or(|q| q >= pos) => {
                self.held.truncate(pos);
                self.stopped = true;
                Step {
                    text: std::mem::take(&mut self.held),
                    stopped: true,
                }
            }
            _ => {
                let tail = self.held.split_off(pending.unwrap_or(self.held.len()));
                Step {
                    text: std::mem::replace(&mut self.held, tail),
                    stopped: false,
                }
            }
        }
    }

    /// End of generation: release whatever was held back (an incomplete character becomes U+FFFD).
    pub fn flush(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let partial = std::mem::take(&mut self.partial);
        self.held.push_str(&String::from_utf8_lossy(&partial));
        if let Some(pos) = self.earliest_match() {
            self.held.truncate(pos);
            self.stopped = true;
        }
        std::mem::take(&mut self.held)
    }

    fn earliest_match(&self) -> Option<usize> {
        self.stops.iter().filter_map(|s| self.held.find(s)).min()
    }

    /// Start of the longest suffix of `held` that is a proper prefix of some stop string.
    fn earliest_partial_start(&self) -> Option<usize> {
        let held = self.held.as_str();
        held.char_indices().map(|(i, _)| i).find(|&i| {
            let tail = &held[i..];
            self.stops
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` and returns (all released text, stopped).
    fn run(stops: &[&str], pieces: &[&[u8]]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().copied());
        let mut out = String::new();
        for p in pieces {
            let step = m.push(p);
            out.push_str(&step.text);
            if step.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    /// Every way of cutting `text` into two or three pieces gives the same result.
    fn all_splits(stops: &[&str], text: &str, want: (&str, bool)) {
        let b = text.as_bytes();
        for i in 0..=b.len() {
            for j in i..=b.len() {
                let got = run(stops, &[&b[..i], &b[i..j], &b[j..]]);
                assert_eq!(
                    (got.0.as_str(), got.1),
                    want,
                    "split at {i},{j} of {text:?}"
                );
            }
        }
    }

    #[test]
    fn no_stops_passes_everything() {
        all_splits(&[], "hello world", ("hello world", false));
    }

    #[test]
    fn stop_split_across_pieces() {
        all_splits(&["</s>"], "abc</s>def", ("abc", true));
        all_splits(&["\n\nUser:"], "Sure.\n\nUser: hi", ("Sure.", true));
    }

    #[test]
    fn partial_stop_released_when_it_diverges() {
        all_splits(&["STOP"], "a STO b ST", ("a STO b ST", false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        all_splits(&["world", "lo w"], "hello world", ("hel", true));
        all_splits(&["bc", "abcd"], "xabcd", ("x", true));
    }

    #[test]
    fn overlapping_stop_prefixes() {
        // "aab" must still be found when the held tail "aa" first looked like a prefix of it.
        all_splits(&["aab"], "xaaab", ("xa", true));
        all_splits(&["abab"], "ababab", ("", true));
    }

    #[test]
    fn multibyte_utf8_is_never_split() {
        // Each Japanese character is 3 bytes; cuts fall inside them.
        all_splits(&["終"], "日本語終わり", ("日本語", true));
        all_splits(&[], "日本語🙂", ("日本語🙂", false));
        let mut m = StopMatcher::new(Vec::<String>::new());
        let smile = "🙂".as_bytes();
        assert_eq!(m.push(&smile[..2]).text, "");
        assert_eq!(m.push(&smile[2..]).text, "🙂");
    }

    #[test]
    fn held_text_is_minimal() {
        let mut m = StopMatcher::new(["</s>"]);
        assert_eq!(m.push(b"abc<").text, "abc");
        assert_eq!(m.push(b"/").text, "");
        assert_eq!(m.push(b"x").text, "</x");
    }

    #[test]
    fn invalid_utf8_is_replaced_not_held_forever() {
        let (out, stopped) = run(&[], &[b"a\xffb"]);
        assert_eq!((out.as_str(), stopped), ("a\u{fffd}b", false));
        let (out, _) = run(&[], &[b"a\xe6\x97"]);
        assert_eq!(out, "a\u{fffd}");
    }

    #[test]
    fn nothing_after_stop() {
        let mut m = StopMatcher::new(["x"]);
        assert!(m.push(b"axb").stopped);
        assert_eq!(
            m.push(b"more"),
            Step {
                text: String::new(),
                stopped: true
            }
        );
        assert_eq!(m.flush(), "");
    }
}
