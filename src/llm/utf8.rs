//! Turning a stream of token bytes into text pieces that are each valid UTF-8.
//!
//! A token can end in the middle of a character (emoji and CJK characters are
//! often split over two or three byte-level tokens). The stream holds such a
//! tail back until the bytes that complete it arrive.

/// Accumulates bytes and releases the longest complete UTF-8 text.
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes` and returns the text that is now complete (possibly empty).
    /// Bytes that can never become valid UTF-8 are replaced by U+FFFD.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The first `valid` bytes were just checked, so this is never lossy.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: whatever is still held back is released, an
    /// unfinished character as U+FFFD.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn split_emoji_is_held_back_until_complete() {
        let bytes = "a🦀b".as_bytes();
        let mut stream = Utf8Stream::new();
        assert_eq!(stream.push(&bytes[..2]), "a");
        assert_eq!(stream.push(&bytes[2..4]), "");
        assert_eq!(stream.push(&bytes[4..]), "🦀b");
        assert_eq!(stream.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut stream = Utf8Stream::new();
        assert_eq!(stream.push(&[b'x', 0xff, b'y']), "x\u{fffd}y");
        assert_eq!(stream.push(&[0xe4, 0xb8]), "");
        assert_eq!(stream.finish(), "\u{fffd}");
    }

    proptest! {
        #[test]
        fn any_split_concatenates_to_the_original(text in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..200, 0..8)) {
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut stream = Utf8Stream::new();
            let mut joined = String::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                let piece = stream.push(&bytes[start..cut]);
                joined.push_str(&piece);
                start = cut;
            }
            joined.push_str(&stream.finish());
            prop_assert_eq!(joined, text);
        }
    }
}
