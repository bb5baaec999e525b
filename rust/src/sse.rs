//! Server-Sent Events framing.
//!
//! A streamed completion sends one event per token whose JSON differs only in the text, so the
//! JSON around the text is prepared once per request (`DeltaFramer`) and each token costs one
//! string escape and one buffer copy.

/// The terminator OpenAI clients wait for.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// One event: optional `event:` line, each line of `data` on its own `data:` line, blank line.
pub fn event(data: &str, name: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        // A newline in the name would end the field early and forge another one.
        out.extend(name.bytes().filter(|b| *b != b'\n' && *b != b'\r'));
        out.push(b'\n');
    }
    // SSE treats CRLF, LF and CR alike as line ends.
    for line in data.split("\r\n").flat_map(|l| l.split(['\n', '\r'])) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// Appends `text` as a JSON string literal (quotes included).
pub fn push_json_string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Frames `data: <prefix><json string of text><suffix>\n\n` for one request's stream.
#[derive(Debug, Clone)]
pub struct DeltaFramer {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
}

impl DeltaFramer {
    /// `prefix` and `suffix` are the JSON around the text, without newlines.
    pub fn new(prefix: &[u8], suffix: &[u8]) -> Self {
        let mut p = b"data: ".to_vec();
        p.extend_from_slice(prefix);
        let mut s = suffix.to_vec();
        s.extend_from_slice(b"\n\n");
        Self {
            prefix: p,
            suffix: s,
        }
    }

    pub fn frame(&self, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.prefix.len() + text.len() + self.suffix.len() + 8);
        out.extend_from_slice(&self.prefix);
        push_json_string(&mut out, text);
        out.extend_from_slice(&self.suffix);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> String {
        let mut out = Vec::new();
        push_json_string(&mut out, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn event_frames_each_line() {
        assert_eq!(event("{\"a\":1}", None), b"data: {\"a\":1}\n\n");
        assert_eq!(
            event("x\ny\r\nz\rw", Some("response.created")),
            b"event: response.created\ndata: x\ndata: y\ndata: z\ndata: w\n\n"
        );
        assert_eq!(event("", None), b"data: \n\n");
    }

    #[test]
    fn event_name_cannot_inject_fields() {
        assert_eq!(event("1", Some("a\nid: 2")), b"event: aid: 2\ndata: 1\n\n");
    }

    #[test]
    fn json_escapes_what_json_requires() {
        assert_eq!(json("plain"), "\"plain\"");
        assert_eq!(json("q\"b\\n\nt\t"), r#""q\"b\\n\nt\t""#);
        assert_eq!(json("\u{1}\u{1f}"), r#""\u0001\u001f""#);
        assert_eq!(json("日本🙂"), "\"日本🙂\"");
    }

    #[test]
    fn framer_wraps_text() {
        let f = DeltaFramer::new(br#"{"choices":[{"delta":{"content":"#, b"}}]}");
        assert_eq!(
            f.frame("a\"b\n"),
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\\\"b\\n\"}}]}\n\n"
        );
    }
}
