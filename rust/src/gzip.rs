//! gzip for responses: one-shot for bodies, and a stream that flushes per event so a compressed
//! token stream is never held back waiting for more input.

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;

/// Compresses a whole body.
pub fn compress(data: &[u8], level: u32) -> Vec<u8> {
    let mut enc = GzEncoder::new(
        Vec::with_capacity(data.len() / 3 + 64),
        Compression::new(level),
    );
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// A gzip member produced piece by piece; each `write` returns bytes the client can decode now.
pub struct GzipStream {
    enc: Option<GzEncoder<Vec<u8>>>,
}

impl GzipStream {
    pub fn new(level: u32) -> Self {
        Self {
            enc: Some(GzEncoder::new(Vec::new(), Compression::new(level))),
        }
    }

    /// Compress `data` and sync-flush, returning everything produced so far.
    pub fn write(&mut self, data: &[u8]) -> Vec<u8> {
        match self.enc.as_mut() {
            Some(enc) => {
                enc.write_all(data).expect("writing to a Vec cannot fail");
                enc.flush().expect("writing to a Vec cannot fail");
                std::mem::take(enc.get_mut())
            }
            None => Vec::new(),
        }
    }

    /// The gzip trailer; later writes return nothing.
    pub fn finish(&mut self) -> Vec<u8> {
        self.enc
            .take()
            .map(|enc| enc.finish().expect("writing to a Vec cannot fail"))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use flate2::write::GzDecoder as GzWriteDecoder;
    use std::io::Read;

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        GzDecoder::new(data).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn one_shot_round_trip() {
        let body = b"{\"a\":1}".repeat(5000);
        let z = compress(&body, 6);
        assert!(z.len() < body.len() / 10);
        assert_eq!(gunzip(&z), body);
    }

    #[test]
    fn each_flush_is_decodable_at_once() {
        let mut s = GzipStream::new(1);
        let mut dec = GzWriteDecoder::new(Vec::new());
        let mut seen = 0;
        for i in 0..50 {
            let event = format!("data: {{\"token\":{i}}}\n\n");
            dec.write_all(&s.write(event.as_bytes())).unwrap();
            dec.flush().unwrap();
            // everything written so far is already decodable: nothing is held back
            seen += event.len();
            assert_eq!(dec.get_ref().len(), seen);
        }
        dec.write_all(&s.finish()).unwrap();
        let all = dec.finish().unwrap();
        assert_eq!(all.len(), seen);
        assert!(s.write(b"late").is_empty());
        assert!(s.finish().is_empty());
    }
}
