//! WebSocket frames: parse (and unmask in place) what a client sends, encode what the server
//! sends. Header parsing and formatting are tungstenite's `FrameHeader`; the checks a server
//! owes RFC 6455 (mask required, no RSV bits, short final control frames, size limit) are here.

use std::io::Cursor;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use super::close_code;

/// The opcodes a server acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
    Continuation,
    Close,
    Ping,
    Pong,
}

/// One parsed client frame; `payload` is already unmasked.
#[derive(Debug)]
pub struct Frame<'a> {
    pub kind: Kind,
    pub fin: bool,
    pub payload: &'a [u8],
}

/// A frame that must end the connection with `code`.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: u16,
    pub reason: &'static str,
}

fn protocol_error(reason: &'static str) -> FrameError {
    FrameError { code: close_code::PROTOCOL_ERROR, reason }
}

/// Parses the frame at the start of `buf`, unmasking its payload in place.
/// `Ok(None)`: not all of it has arrived yet. `max_payload` is checked against the header, so
/// an oversized frame is refused before its bytes are buffered.
pub fn parse(buf: &mut [u8], max_payload: usize) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let mut cursor = Cursor::new(&*buf);
    let (header, len) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Ok(None),
        Err(_) => return Err(protocol_error("reserved opcode")),
    };
    let head_len = cursor.position() as usize;
    let kind = match header.opcode {
        OpCode::Data(Data::Text) => Kind::Text,
        OpCode::Data(Data::Binary) => Kind::Binary,
        OpCode::Data(Data::Continue) => Kind::Continuation,
        OpCode::Control(Control::Close) => Kind::Close,
        OpCode::Control(Control::Ping) => Kind::Ping,
        OpCode::Control(Control::Pong) => Kind::Pong,
        _ => return Err(protocol_error("reserved opcode")),
    };
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(protocol_error("reserved bits set (no extension was negotiated)"));
    }
    let Some(mask) = header.mask else {
        return Err(protocol_error("client frames must be masked"));
    };
    let is_control = matches!(kind, Kind::Close | Kind::Ping | Kind::Pong);
    if is_control && (len > 125 || !header.is_final) {
        return Err(protocol_error("control frames must be final and at most 125 bytes"));
    }
    if len > max_payload as u64 {
        return Err(FrameError { code: close_code::MESSAGE_TOO_BIG, reason: "frame larger than the message limit" });
    }
    let len = len as usize;
    let total = head_len + len;
    if buf.len() < total {
        return Ok(None);
    }
    let payload = &mut buf[head_len..total];
    unmask(payload, mask);
    Ok(Some((Frame { kind, fin: header.is_final, payload }, total)))
}

/// XORs `data` with the 4-byte `mask`, eight bytes at a time where it can.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v =
            u64::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7]]) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Appends an unmasked server frame with `payload` to `out`.
pub fn encode(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) {
    let opcode = match kind {
        Kind::Text => OpCode::Data(Data::Text),
        Kind::Binary => OpCode::Data(Data::Binary),
        Kind::Continuation => OpCode::Data(Data::Continue),
        Kind::Close => OpCode::Control(Control::Close),
        Kind::Ping => OpCode::Control(Control::Ping),
        Kind::Pong => OpCode::Control(Control::Pong),
    };
    let header = FrameHeader { is_final: true, rsv1: false, rsv2: false, rsv3: false, opcode, mask: None };
    out.reserve(header.len(payload.len() as u64) + payload.len());
    // Writing into a Vec cannot fail.
    let _ = header.format(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// A complete text frame.
pub fn text(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&mut out, Kind::Text, payload);
    out
}

/// A close frame without a body (the answer to one without a code).
pub fn close_empty() -> Vec<u8> {
    let mut out = Vec::with_capacity(2);
    encode(&mut out, Kind::Close, &[]);
    out
}

/// A close frame with `code` and a reason (cut to fit the 125-byte control frame limit).
pub fn close(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    let mut out = Vec::new();
    encode(&mut out, Kind::Close, &payload);
    out
}

/// Appends a client frame as it goes on the wire: `first` is the FIN/RSV/opcode byte, taken as
/// is (so a test can send reserved bits or opcodes), and the payload is masked with `mask`
/// (RFC 6455 5.3), or left unmasked with `None`, which a server must refuse. The server never
/// masks; this is the one encoder for what plays the client: the tests, the load generator.
pub fn encode_client(out: &mut Vec<u8>, first: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.reserve(14 + payload.len());
    out.push(first);
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = out.len();
    if let Some(mask) = mask {
        out.extend_from_slice(&mask);
    }
    out.extend_from_slice(payload);
    if let Some(mask) = mask.filter(|m| *m != [0; 4]) {
        // Masking is the same XOR as unmasking; a zero key (cheap floods) changes nothing.
        unmask(&mut out[start + 4..], mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_client(&mut out, first, payload, Some([1, 2, 3, 4]));
        out
    }

    #[test]
    fn parses_masked_text_and_waits_for_more() {
        let mut f = masked(0x81, b"hello world, unmasked");
        let n = f.len();
        let (frame, used) = parse(&mut f, 1024).unwrap().unwrap();
        assert_eq!((frame.kind, frame.payload, used), (Kind::Text, &b"hello world, unmasked"[..], n));
        let mut part = masked(0x81, b"hello")[..5].to_vec();
        assert!(parse(&mut part, 1024).unwrap().is_none());
    }

    #[test]
    fn refuses_what_rfc6455_forbids() {
        let mut unmasked = vec![0x81, 0x02, b'h', b'i'];
        assert_eq!(parse(&mut unmasked, 1024).unwrap_err().code, close_code::PROTOCOL_ERROR);
        let mut fragmented_ping = masked(0x09, b"x");
        assert_eq!(parse(&mut fragmented_ping, 1024).unwrap_err().code, close_code::PROTOCOL_ERROR);
        let mut big = masked(0x81, &[b'a'; 100]);
        assert_eq!(parse(&mut big, 10).unwrap_err().code, close_code::MESSAGE_TOO_BIG);
        let mut rsv = masked(0xC1, b"x");
        assert_eq!(parse(&mut rsv, 1024).unwrap_err().code, close_code::PROTOCOL_ERROR);
    }

    #[test]
    fn encodes_lengths() {
        assert_eq!(text(b"hi"), vec![0x81, 2, b'h', b'i']);
        assert_eq!(text(&[0; 300])[..4], [0x81, 126, 1, 44]);
        assert_eq!(close(1003, "binary")[..4], [0x88, 8, 0x03, 0xEB]);
    }
}
