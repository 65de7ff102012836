//! Generated tokens to text: incremental decoding that never splits a character, and stop
//! sequences that end the answer before the text that matched them is sent.

use loraops_model::tokenizer::Tokenizer;

/// Decodes a growing list of token ids into text deltas. A byte-level tokenizer can end a
/// token mid-character; such a tail is held back until the next tokens complete it. The text
/// is decoded from a short window of recent tokens (as text-generation-inference does), so
/// each token costs the same however long the answer is.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// Add a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tok
            .decode_text(&self.ids[self.prefix_offset..self.read_offset])
            .unwrap_or_default();
        let text = tok
            .decode_text(&self.ids[self.prefix_offset..])
            .unwrap_or_default();
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&prefix) {
            let delta = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// Whatever is still held back, at the end of the answer (an incomplete character is
    /// dropped, as OpenAI-style servers do).
    pub fn finish(&mut self, tok: &Tokenizer) -> String {
        let prefix = tok
            .decode_text(&self.ids[self.prefix_offset..self.read_offset])
            .unwrap_or_default();
        let text = tok
            .decode_text(&self.ids[self.prefix_offset..])
            .unwrap_or_default();
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        match text.strip_prefix(&prefix) {
            Some(rest) => rest.trim_end_matches('\u{FFFD}').to_string(),
            None => String::new(),
        }
    }
}

/// Finds stop sequences in the generated text. Text that could still become a stop sequence
/// is held back; once a sequence matches, the text before it is the rest of the answer.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received and not yet released.
    pending: String,
}

/// What the matcher lets through.
#[derive(Debug, PartialEq, Eq)]
pub enum Released {
    Text(String),
    /// A stop sequence matched; this is the text before it.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> Released {
        self.pending.push_str(delta);
        if self.stops.is_empty() {
            return Released::Text(std::mem::take(&mut self.pending));
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return Released::Stopped(before);
        }
        // Hold back the longest tail that is the start of some stop sequence.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len() + 1))
                    .rev()
                    .find(|&n| {
                        s.is_char_boundary(n)
                            && self.pending.is_char_boundary(self.pending.len() - n)
                            && self.pending.ends_with(&s[..n])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let release = self.pending.len() - hold;
        let out = self.pending[..release].to_string();
        self.pending.drain(..release);
        Released::Text(out)
    }

    /// The held-back text, when the answer ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_split_across_deltas_are_found_and_not_sent() {
        let mut m = StopMatcher::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(m.push("Hello E"), Released::Text("Hello ".into()));
        assert_eq!(m.push("N"), Released::Text(String::new()));
        assert_eq!(m.push("x"), Released::Text("ENx".into()));
        assert_eq!(m.push(" and\n"), Released::Text(" and".into()));
        assert_eq!(m.push("\nmore"), Released::Stopped("".into()));
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.push("xa"), Released::Text("x".into()));
        assert_eq!(m.finish(), "a");
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("é"), Released::Text("é".into()));
    }
}
