//! A streaming reader of WebSocket frame headers (RFC 6455 §5.2) over one direction of a
//! tunnel. It sees the raw bytes as they pass, in chunks of any size, and keeps only the
//! few bytes of a header that straddles two chunks: payloads are skipped by arithmetic,
//! never copied or unmasked. It yields message counts and the first Close frame's code.
//! If the bytes stop looking like WebSocket (an extension that reframes, say), it stops
//! reading and the tunnel is relayed as before.

/// What the reader learned from one chunk.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Complete data messages (final frames of text/binary messages) in this chunk.
    pub messages: u32,
    /// A Close frame began in this chunk (the first one of this direction).
    pub close: bool,
}

/// Per-direction parser state.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// Header bytes collected so far (a header is at most 14 bytes).
    head: [u8; 14],
    head_len: u8,
    /// Payload bytes still to skip for the current frame.
    skip: u64,
    /// The current frame is a Close: collect its first two payload bytes for the code.
    in_close: bool,
    close_mask: [u8; 4],
    masked: bool,
    close_bytes: [u8; 2],
    close_len: u8,
    /// Set once the stream stops parsing as WebSocket.
    lost: bool,
    closed: bool,
    /// The status code of the first Close frame, once read (RFC 6455 §7.4).
    pub close_code: Option<u16>,
}

impl FrameReader {
    /// Feeds one chunk of this direction's bytes.
    pub fn feed(&mut self, mut data: &[u8]) -> Seen {
        let mut seen = Seen::default();
        while !data.is_empty() && !self.lost {
            if self.skip > 0 {
                let n = self.skip.min(data.len() as u64) as usize;
                if self.in_close && self.close_len < 2 {
                    for &b in &data[..n.min(2 - self.close_len as usize)] {
                        let i = self.close_len as usize;
                        let key = if self.masked { self.close_mask[i] } else { 0 };
                        self.close_bytes[i] = b ^ key;
                        self.close_len += 1;
                    }
                    if self.close_len == 2 {
                        self.close_code = Some(u16::from_be_bytes(self.close_bytes));
                    }
                }
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            // Collect a header: 2 bytes, then what they say follows.
            let need = self.header_len();
            let take = (need - self.head_len as usize).min(data.len());
            self.head[self.head_len as usize..self.head_len as usize + take]
                .copy_from_slice(&data[..take]);
            self.head_len += take as u8;
            data = &data[take..];
            if (self.head_len as usize) < self.header_len() {
                continue; // more header bytes to come (header_len grows after byte 2)
            }
            self.frame_complete(&mut seen);
        }
        seen
    }

    /// Header length as far as it is known from the bytes collected.
    fn header_len(&self) -> usize {
        if self.head_len < 2 {
            return 2;
        }
        let masked = self.head[1] & 0x80 != 0;
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if masked { 4 } else { 0 }
    }

    fn frame_complete(&mut self, seen: &mut Seen) {
        let h = &self.head;
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        let masked = h[1] & 0x80 != 0;
        let (len, at) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => (
                u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                10,
            ),
            n => (u64::from(n), 2),
        };
        // Reserved opcodes, oversized control frames, or a 64-bit length with the top bit
        // set: not WebSocket any more (§5.2, §5.5).
        let control = opcode & 0x8 != 0;
        if matches!(opcode, 3..=7 | 11..=15) || (control && (len > 125 || !fin)) || len >> 63 != 0 {
            self.lost = true;
            return;
        }
        if fin && matches!(opcode, 0..=2) {
            seen.messages += 1;
        }
        self.in_close = false;
        if opcode == 8 && !self.closed {
            self.closed = true;
            seen.close = true;
            self.in_close = true;
            self.masked = masked;
            if masked {
                self.close_mask.copy_from_slice(&h[at..at + 4]);
            }
            self.close_len = 0;
        }
        self.skip = len;
        self.head_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n < 65536 => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(frame(true, 1, b"hello", None));
        s.extend(frame(false, 2, &[7u8; 300], Some([1, 2, 3, 4])));
        s.extend(frame(true, 9, b"ping", None)); // control frame inside a fragmented message
        s.extend(frame(true, 0, &[9u8; 70_000], Some([5, 6, 7, 8])));
        s.extend(frame(true, 2, b"", None));
        s.extend(frame(
            true,
            8,
            &[0x0f, 0xa1, b'b', b'y', b'e'],
            Some([9, 9, 9, 9]),
        ));
        s
    }

    #[test]
    fn counts_messages_and_reads_the_close_code_whatever_the_chunking() {
        let s = stream();
        for chunk in [1, 2, 3, 7, 13, 100, 4096, s.len()] {
            let mut r = FrameReader::default();
            let (mut messages, mut closes) = (0, 0);
            for c in s.chunks(chunk) {
                let seen = r.feed(c);
                messages += seen.messages;
                closes += u32::from(seen.close);
            }
            assert_eq!(messages, 3, "chunk {chunk}");
            assert_eq!(closes, 1, "chunk {chunk}");
            assert_eq!(r.close_code, Some(4001), "chunk {chunk}");
        }
    }

    #[test]
    fn close_without_code_and_garbage_stop_cleanly() {
        let mut r = FrameReader::default();
        assert_eq!(
            r.feed(&frame(true, 8, b"", None)),
            Seen {
                messages: 0,
                close: true
            }
        );
        assert_eq!(r.close_code, None);
        let mut r = FrameReader::default();
        assert_eq!(r.feed(b"GET / HTTP/1.1\r\n\r\n").messages, 0);
        assert!(r.lost);
    }
}
