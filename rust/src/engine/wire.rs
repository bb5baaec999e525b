//! Events on the wire between a runner's batching loop and the server.
//!
//! The loop sends each step's events itself, as packets on a `SOCK_SEQPACKET` socket the
//! server reads, so a token crosses from the decode thread to the server with no Python in
//! the runner in between. A packet holds whole events, little-endian, and is at most `PACKET`
//! bytes: the receiver's buffer of that size always holds one.

use super::types::{Event, Finish, TokenLogprob, Usage};

/// The largest packet; an event is kept well below it (`MAX_ERROR` bounds the only field that
/// is not bounded by the request's own limits).
pub const PACKET: usize = 64 * 1024;
const MAX_ERROR: usize = 8 * 1024;

/// Packets holding `events` in order.
pub fn encode(events: &[Event]) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    let mut out = Vec::with_capacity(256);
    let mut one = Vec::with_capacity(256);
    for e in events {
        one.clear();
        put_event(&mut one, e);
        if !out.is_empty() && out.len() + one.len() > PACKET {
            packets.push(std::mem::take(&mut out));
        }
        out.extend_from_slice(&one);
    }
    if !out.is_empty() {
        packets.push(out);
    }
    packets
}

/// The events of one packet.
pub fn decode(mut buf: &[u8]) -> Result<Vec<Event>, String> {
    let mut events = Vec::new();
    while !buf.is_empty() {
        events.push(get_event(&mut buf).ok_or("a truncated event packet")?);
    }
    Ok(events)
}

fn put_event(out: &mut Vec<u8>, e: &Event) {
    out.extend_from_slice(&e.request.to_le_bytes());
    out.extend_from_slice(&e.choice.to_le_bytes());
    put_bytes(out, e.text.as_bytes());
    put_len(out, e.tokens.len());
    for t in &e.tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    match &e.finish {
        None => out.push(0),
        Some(Finish::Stop) => out.push(1),
        Some(Finish::Length) => out.push(2),
        Some(Finish::Cancelled) => out.push(3),
        Some(Finish::Error(msg)) => {
            out.push(4);
            let mut end = msg.len().min(MAX_ERROR);
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            put_bytes(out, &msg.as_bytes()[..end]);
        }
    }
    put_len(out, e.logprobs.len());
    for lp in &e.logprobs {
        put_bytes(out, lp.text.as_bytes());
        put_bytes(out, &lp.bytes);
        out.extend_from_slice(&lp.logprob.to_le_bytes());
        put_len(out, lp.top.len());
        for (text, bytes, logprob) in &lp.top {
            put_bytes(out, text.as_bytes());
            put_bytes(out, bytes);
            out.extend_from_slice(&logprob.to_le_bytes());
        }
    }
    match &e.usage {
        None => out.push(0),
        Some(u) => {
            out.push(1);
            out.extend_from_slice(&u.prompt_tokens.to_le_bytes());
            out.extend_from_slice(&u.cached_tokens.to_le_bytes());
            out.extend_from_slice(&u.completion_tokens.to_le_bytes());
            out.extend_from_slice(&u.ttft_ms.to_le_bytes());
            out.extend_from_slice(&u.gen_ms.to_le_bytes());
            out.extend_from_slice(&u.accepted_prediction_tokens.to_le_bytes());
            out.extend_from_slice(&u.rejected_prediction_tokens.to_le_bytes());
        }
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Some(head)
}

fn array<const N: usize>(buf: &mut &[u8]) -> Option<[u8; N]> {
    take(buf, N)?.try_into().ok()
}

fn get_u32(buf: &mut &[u8]) -> Option<u32> {
    array(buf).map(u32::from_le_bytes)
}

fn get_f32(buf: &mut &[u8]) -> Option<f32> {
    array(buf).map(f32::from_le_bytes)
}

fn get_f64(buf: &mut &[u8]) -> Option<f64> {
    array(buf).map(f64::from_le_bytes)
}

fn get_bytes(buf: &mut &[u8]) -> Option<Vec<u8>> {
    let n = get_u32(buf)? as usize;
    take(buf, n).map(<[u8]>::to_vec)
}

fn get_string(buf: &mut &[u8]) -> Option<String> {
    String::from_utf8(get_bytes(buf)?).ok()
}

fn get_event(buf: &mut &[u8]) -> Option<Event> {
    let request = array(buf).map(u64::from_le_bytes)?;
    let choice = get_u32(buf)?;
    let text = get_string(buf)?;
    let n = get_u32(buf)? as usize;
    let mut tokens = Vec::with_capacity(n.min(buf.len() / 4));
    for _ in 0..n {
        tokens.push(array(buf).map(i32::from_le_bytes)?);
    }
    let finish = match take(buf, 1)?[0] {
        0 => None,
        1 => Some(Finish::Stop),
        2 => Some(Finish::Length),
        3 => Some(Finish::Cancelled),
        4 => Some(Finish::Error(get_string(buf)?)),
        _ => return None,
    };
    let n = get_u32(buf)? as usize;
    let mut logprobs = Vec::with_capacity(n.min(buf.len()));
    for _ in 0..n {
        let text = get_string(buf)?;
        let bytes = get_bytes(buf)?;
        let logprob = get_f32(buf)?;
        let k = get_u32(buf)? as usize;
        let mut top = Vec::with_capacity(k.min(buf.len()));
        for _ in 0..k {
            top.push((get_string(buf)?, get_bytes(buf)?, get_f32(buf)?));
        }
        logprobs.push(TokenLogprob {
            text,
            bytes,
            logprob,
            top,
        });
    }
    let usage = match take(buf, 1)?[0] {
        0 => None,
        1 => Some(Usage {
            prompt_tokens: get_u32(buf)?,
            cached_tokens: get_u32(buf)?,
            completion_tokens: get_u32(buf)?,
            ttft_ms: get_f64(buf)?,
            gen_ms: get_f64(buf)?,
            accepted_prediction_tokens: get_u32(buf)?,
            rejected_prediction_tokens: get_u32(buf)?,
        }),
        _ => return None,
    };
    Some(Event {
        request,
        choice,
        text,
        tokens,
        finish,
        logprobs,
        usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(request: u64, text: &str) -> Event {
        Event {
            request,
            choice: 1,
            text: text.into(),
            tokens: vec![7, -1, i32::MAX],
            finish: None,
            logprobs: vec![],
            usage: None,
        }
    }

    #[test]
    fn events_round_trip() {
        let mut full = event(3, "é ✓");
        full.finish = Some(Finish::Error("bad\nthing".into()));
        full.logprobs = vec![TokenLogprob {
            text: "a".into(),
            bytes: vec![0xff, 0],
            logprob: -0.5,
            top: vec![("a".into(), vec![97], -0.5), ("b".into(), vec![], -2.0)],
        }];
        full.usage = Some(Usage {
            prompt_tokens: 5,
            cached_tokens: 2,
            completion_tokens: 9,
            ttft_ms: 1.25,
            gen_ms: 30.5,
            accepted_prediction_tokens: 7,
            rejected_prediction_tokens: 3,
        });
        let mut done = event(u64::MAX, "");
        done.finish = Some(Finish::Length);
        let events = vec![event(1, "x"), full, done];
        let packets = encode(&events);
        assert_eq!(packets.len(), 1);
        assert_eq!(decode(&packets[0]).unwrap(), events);
    }

    #[test]
    fn many_events_split_into_packets_of_whole_events() {
        let events: Vec<Event> = (0..5000).map(|i| event(i, "some text")).collect();
        let packets = encode(&events);
        assert!(packets.len() > 1);
        assert!(packets.iter().all(|p| p.len() <= PACKET));
        let back: Vec<Event> = packets.iter().flat_map(|p| decode(p).unwrap()).collect();
        assert_eq!(back, events);
    }

    #[test]
    fn a_long_error_is_cut_at_a_char_boundary() {
        let mut e = event(1, "");
        e.finish = Some(Finish::Error("é".repeat(MAX_ERROR)));
        let back = decode(&encode(&[e])[0]).unwrap();
        match &back[0].finish {
            Some(Finish::Error(msg)) => assert!(msg.len() <= MAX_ERROR && msg.starts_with('é')),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_packets_are_refused() {
        let packet = &encode(&[event(1, "hello")])[0];
        for cut in 1..packet.len() {
            assert!(decode(&packet[..cut]).is_err(), "cut at {cut}");
        }
    }
}
