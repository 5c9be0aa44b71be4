//! The text side of a generated stream: incremental detokenization plus stop sequences, holding back
//! only the tokens whose text could still turn out to start a stop sequence.

/// A generated token with the text it completes.
#[derive(Debug, Clone, PartialEq)]
pub struct TextToken {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    /// The most likely tokens at this position, when asked.
    pub top: Vec<(u32, f32)>,
}

/// Decides which tokens can be sent and whether a stop sequence has appeared.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: Vec<TextToken>,
}

/// What one new token led to.
#[derive(Debug, PartialEq)]
pub enum Matched {
    /// These tokens can be sent now (maybe none).
    Emit(Vec<TextToken>),
    /// A stop sequence appeared: send these tokens (the last one cut before the stop), then end.
    Stop { emit: Vec<TextToken>, stop: String },
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, pending: Vec::new() }
    }

    pub fn push(&mut self, token: TextToken) -> Matched {
        self.pending.push(token);
        if self.stops.is_empty() {
            return Matched::Emit(std::mem::take(&mut self.pending));
        }
        let text: String = self.pending.iter().map(|t| t.text.as_str()).collect();
        // The earliest stop sequence in the held text wins.
        if let Some((at, stop)) =
            self.stops.iter().filter_map(|s| text.find(s.as_str()).map(|i| (i, s))).min_by_key(|(i, _)| *i)
        {
            let stop = stop.clone();
            let mut emit = Vec::new();
            let mut offset = 0;
            for mut t in self.pending.drain(..) {
                if offset >= at {
                    break;
                }
                let end = offset + t.text.len();
                if end > at {
                    t.text.truncate(at - offset);
                }
                offset = end;
                emit.push(t);
            }
            return Matched::Stop { emit, stop };
        }
        // Hold back the shortest tail of tokens covering the longest suffix that starts a stop sequence.
        let held = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|prefix| text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let keep_from = text.len() - held;
        let mut offset = 0;
        let mut split = 0;
        for (i, t) in self.pending.iter().enumerate() {
            if offset + t.text.len() > keep_from {
                break;
            }
            offset += t.text.len();
            split = i + 1;
        }
        let rest = self.pending.split_off(split);
        Matched::Emit(std::mem::replace(&mut self.pending, rest))
    }

    /// At the end of generation, whatever is still held is sent.
    pub fn flush(&mut self) -> Vec<TextToken> {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: u32, text: &str) -> TextToken {
        TextToken { id, text: text.into(), logprob: 0.0, top: Vec::new() }
    }

    fn ids(v: &[TextToken]) -> Vec<u32> {
        v.iter().map(|t| t.id).collect()
    }

    #[test]
    fn without_stops_everything_goes_out_at_once() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push(t(1, "hi")), Matched::Emit(vec![t(1, "hi")]));
    }

    #[test]
    fn a_stop_across_tokens_is_held_then_cut() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert!(matches!(m.push(t(1, "go ")), Matched::Emit(ref v) if ids(v) == vec![1]));
        // "E" might start "END": held.
        assert!(matches!(m.push(t(2, "xE")), Matched::Emit(ref v) if v.is_empty()));
        match m.push(t(3, "ND!")) {
            Matched::Stop { emit, stop } => {
                assert_eq!(stop, "END");
                assert_eq!(emit, vec![t(2, "x")]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_false_start_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert!(matches!(m.push(t(1, "E")), Matched::Emit(ref v) if v.is_empty()));
        assert!(matches!(m.push(t(2, "X")), Matched::Emit(ref v) if ids(v) == vec![1, 2]));
        assert!(m.flush().is_empty());
    }
}
