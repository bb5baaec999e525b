//! gzip for responses: one-shot for bodies, and a stream that flushes per event so a compressed
//! token stream is never held back waiting for more input.
//!
//! A deflate state is about 300 KB. Allocated per response, 16 concurrent streams made glibc
//! map and fault that memory in afresh each time (a quarter of a millisecond per stream, ten
//! times the compressing), so finished states go back to a small pool and are reset for the
//! next response.

use std::sync::Mutex;

use flate2::{Compress, Compression, Crc, FlushCompress, Status};

/// gzip's member header: deflate, no name or time, unknown OS.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// States kept for reuse, at most (the concurrent streams of a busy server).
const POOL_MAX: usize = 64;

static POOL: Mutex<Vec<(u32, Compress)>> = Mutex::new(Vec::new());

/// A raw deflate state at `level`, reused when one is free.
fn take(level: u32) -> Compress {
    let mut pool = POOL.lock().expect("poisoned");
    match pool.iter().rposition(|(l, _)| *l == level) {
        Some(i) => pool.swap_remove(i).1,
        None => Compress::new(Compression::new(level), false),
    }
}

fn give_back(level: u32, mut c: Compress) {
    c.reset();
    let mut pool = POOL.lock().expect("poisoned");
    if pool.len() < POOL_MAX {
        pool.push((level, c));
    }
}

/// Deflate all of `input` into `out` with `flush`, until the flush is complete.
fn deflate(c: &mut Compress, mut input: &[u8], out: &mut Vec<u8>, flush: FlushCompress) {
    loop {
        out.reserve(input.len() / 2 + 64);
        let before = c.total_in();
        let status = c
            .compress_vec(input, out, flush)
            .expect("deflate of in-memory data cannot fail");
        input = &input[(c.total_in() - before) as usize..];
        let done = match flush {
            FlushCompress::Finish => status == Status::StreamEnd,
            // a flush is complete once it leaves output space unused
            _ => input.is_empty() && out.len() < out.capacity(),
        };
        if done {
            return;
        }
    }
}

/// Compresses a whole body.
pub fn compress(data: &[u8], level: u32) -> Vec<u8> {
    GzipStream::new(level).end(data, Vec::with_capacity(data.len() / 3 + 64))
}

/// A gzip member produced piece by piece; each `write` returns bytes the client can decode now.
pub struct GzipStream {
    level: u32,
    state: Option<(Compress, Crc)>,
    started: bool,
}

impl GzipStream {
    pub fn new(level: u32) -> Self {
        Self {
            level,
            state: Some((take(level), Crc::new())),
            started: false,
        }
    }

    /// Compress `data` and sync-flush, returning everything produced so far.
    pub fn write(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let Some((c, crc)) = self.state.as_mut() else {
            return out;
        };
        header_once(&mut self.started, &mut out);
        crc.update(data);
        deflate(c, data, &mut out, FlushCompress::Sync);
        out
    }

    /// The gzip trailer; later writes return nothing.
    pub fn finish(&mut self) -> Vec<u8> {
        self.end(&[], Vec::new())
    }

    /// `data` as the member's last bytes, appended to `out` with the trailer; the state goes
    /// back to the pool.
    fn end(&mut self, data: &[u8], mut out: Vec<u8>) -> Vec<u8> {
        let Some((mut c, mut crc)) = self.state.take() else {
            return out;
        };
        header_once(&mut self.started, &mut out);
        crc.update(data);
        deflate(&mut c, data, &mut out, FlushCompress::Finish);
        out.extend_from_slice(&crc.sum().to_le_bytes());
        out.extend_from_slice(&crc.amount().to_le_bytes());
        give_back(self.level, c);
        out
    }
}

fn header_once(started: &mut bool, out: &mut Vec<u8>) {
    if !std::mem::replace(started, true) {
        out.extend_from_slice(&HEADER);
    }
}

impl Drop for GzipStream {
    fn drop(&mut self) {
        // a client that went away mid-stream: its state serves the next response
        if let Some((c, _)) = self.state.take() {
            give_back(self.level, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use flate2::write::GzDecoder as GzWriteDecoder;
    use std::io::{Read, Write};

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

    #[test]
    fn reused_states_start_clean() {
        // a stream dropped mid-way and a finished one: both states go back to the pool, and
        // members made after from them decode on their own
        let mut cut = GzipStream::new(1);
        cut.write(b"half of a stream that the client left");
        drop(cut);
        let mut whole = GzipStream::new(1);
        let mut z = whole.write(b"first ");
        z.extend(whole.finish());
        assert_eq!(gunzip(&z), b"first ");
        for round in 0..3 {
            let body = format!("{{\"round\":{round}}}").repeat(3000);
            assert_eq!(gunzip(&compress(body.as_bytes(), 6)), body.as_bytes());
            let mut s = GzipStream::new(1);
            let mut z = s.write(body.as_bytes());
            z.extend(s.finish());
            assert_eq!(gunzip(&z), body.as_bytes());
        }
    }

    #[test]
    fn an_empty_stream_is_a_valid_member() {
        let mut s = GzipStream::new(1);
        assert_eq!(gunzip(&s.finish()), b"");
    }
}
