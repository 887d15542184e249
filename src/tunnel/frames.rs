//! The frame layer of one direction of a tunnel (RFC 6455 §5.2): a [`Scanner`] that sees
//! the raw bytes as they pass, in chunks of any size, and the edge's own control frames
//! ([`Control`]).
//!
//! The scanner keeps only the few bytes of a header that straddles two chunks; payloads are
//! skipped by arithmetic, never copied or unmasked, except the 2-byte code of a Close and
//! the 8 bytes of a Pong that may carry the edge's heartbeat token. It hands on what is to
//! be forwarded as maximal contiguous slices of the chunk (one per chunk, almost always),
//! so a tunnel writes as it did before it read frames. It knows where frames end, so the
//! edge can write a frame of its own between two frames and never inside one; and it can
//! stop a direction before the header of a frame that breaks a limit, so nothing of that
//! frame is forwarded.
//!
//! If the bytes stop looking like WebSocket (a reserved opcode, a control frame over 125
//! bytes), the scanner is lost: without limits it forwards everything as it comes and the
//! edge no longer writes into that direction; with limits it stops the direction, since a
//! limit that a reserved opcode could switch off would be no limit.

use tokio::time::Instant;

/// The length of the token in the edge's heartbeat pings.
pub const TOKEN_LEN: usize = 8;

/// Why a direction stopped forwarding, at a frame boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A data message over `max_message_size`, all its fragments together (§5.4).
    TooBig,
    /// A message over `message_rate`.
    Rate,
    /// Bytes that are not WebSocket frames, under limits.
    NotWebSocket,
}

/// Where a call to [`Scanner::feed`] stopped before the end of its chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// At a frame boundary, as asked: the edge may write a frame of its own here.
    Boundary,
    /// Before the header of a frame that breaks a limit; the rest of the chunk was read
    /// and dropped, and so is everything after it.
    Violation(Violation),
}

/// What one call to [`Scanner::feed`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of the chunk consumed (all of them unless it stopped at a boundary).
    pub consumed: usize,
    /// Why it stopped early, if it did.
    pub stop: Option<Stop>,
    /// Bytes handed on to be written.
    pub forwarded: usize,
    /// Complete data messages forwarded (final frames of text, binary or continuation).
    pub messages: u32,
    /// The source's first Close frame ended here.
    pub close: bool,
    /// A Pong with the expected token was taken out of the stream.
    pub pong: bool,
}

/// The limits a direction enforces, once per tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rules {
    /// A data message larger than this stops the direction.
    pub max_message: Option<u64>,
    /// Messages per second and burst: a message beyond them stops the direction.
    pub rate: Option<(f64, u32)>,
    /// The edge takes its heartbeat Pongs out of this direction.
    pub pongs: bool,
}

impl Rules {
    fn any(&self) -> bool {
        self.max_message.is_some() || self.rate.is_some() || self.pongs
    }
}

/// A token bucket per tunnel: no allocation, no clock read per message (one per chunk).
#[derive(Debug)]
struct Bucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What only a direction under rules needs, boxed so a tunnel without them carries none.
#[derive(Debug)]
struct Limits {
    max_message: Option<u64>,
    bucket: Option<Bucket>,
    /// Payload bytes of the data message in progress.
    message_len: u64,
    /// A data message is in progress (its last frame is yet to come).
    in_message: bool,
    /// Under a limit: bytes that are not well-formed WebSocket stop the direction.
    strict: bool,
    /// The token of the edge's outstanding Ping, whose Pong is taken out.
    expect: Option<[u8; TOKEN_LEN]>,
    /// The payload of a Pong that may carry the token, held until it is whole.
    pong: [u8; TOKEN_LEN],
    pong_len: u8,
}

/// Per-direction parser state.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Header bytes collected so far (a header is at most 14 bytes).
    head: [u8; 14],
    head_len: u8,
    /// Payload bytes still to pass for the current frame.
    skip: u64,
    /// The current frame is a Pong held back (it may carry the token).
    holding_pong: bool,
    /// The current frame is the first Close: collect the first two payload bytes.
    in_close: bool,
    close_bytes: [u8; 2],
    close_len: u8,
    /// Nothing is handed on any more (a limit was broken, or the edge wrote its Close):
    /// the destination's stream ends at a frame boundary.
    dropping: bool,
    /// The bytes stopped parsing as WebSocket.
    lost: bool,
    /// The source's first Close frame was seen (forwarded, or dropped while `dropping`).
    close_seen: bool,
    /// Whether that Close was forwarded to the destination.
    close_forwarded: bool,
    /// The status code of the source's first Close frame, once read (§7.4).
    close_code: Option<u16>,
    limits: Option<Box<Limits>>,
}

impl Scanner {
    /// A scanner that enforces `rules`; with none it only reads (and never holds a byte).
    pub fn new(rules: Rules) -> Scanner {
        let limits = rules.any().then(|| {
            Box::new(Limits {
                max_message: rules.max_message,
                bucket: rules.rate.map(|(per_second, burst)| Bucket {
                    per_second,
                    burst: f64::from(burst),
                    tokens: f64::from(burst),
                    last: Instant::now(),
                }),
                message_len: 0,
                in_message: false,
                strict: rules.max_message.is_some() || rules.rate.is_some(),
                expect: None,
                pong: [0; TOKEN_LEN],
                pong_len: 0,
            })
        });
        Scanner {
            limits,
            ..Scanner::default()
        }
    }

    /// Whether the bytes handed on so far end at a frame boundary, so a frame of the
    /// edge's own may be written now.
    pub fn at_boundary(&self) -> bool {
        if self.dropping {
            return true;
        }
        // Under rules a header is held until it is whole, and so is a Pong that may carry
        // the token: what was handed on ends before them.
        let held = self.limits.is_some();
        !self.lost && ((self.skip == 0 && (self.head_len == 0 || held)) || self.holding_pong)
    }

    /// Whether the stream still parses as WebSocket.
    pub fn lost(&self) -> bool {
        self.lost
    }

    /// Whether the stream stopped parsing while its bytes still pass: the edge can never
    /// write into it again.
    pub fn stuck(&self) -> bool {
        self.lost && !self.dropping
    }

    /// Whether the source sent a Close frame.
    pub fn close_seen(&self) -> bool {
        self.close_seen
    }

    /// Whether a Close frame from the source went on to the destination.
    pub fn close_forwarded(&self) -> bool {
        self.close_forwarded
    }

    /// The code of the source's first Close frame.
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    /// From now on nothing is handed on (the edge wrote its Close to the destination);
    /// the source is still read, for its own Close.
    pub fn seal(&mut self) {
        self.dropping = true;
        // A held Pong goes nowhere now.
        self.holding_pong = false;
    }

    /// Takes the next Pong carrying `token` out of the stream.
    pub fn expect_pong(&mut self, token: [u8; TOKEN_LEN]) {
        if let Some(l) = self.limits.as_mut() {
            l.expect = Some(token);
        }
    }

    /// Reads one chunk of this direction's bytes, handing what is to be forwarded to `out`
    /// in order. With `stop_at_boundary` it returns at the first frame boundary (which may
    /// be where it starts), having consumed the bytes before it.
    #[inline(always)]
    pub fn feed(
        &mut self,
        data: &[u8],
        stop_at_boundary: bool,
        out: &mut impl FnMut(&[u8]),
    ) -> Fed {
        let mut fed = Fed::default();
        // Without rules, nothing held and no boundary asked for, the frames that begin and
        // end in this chunk are walked first with their headers read in place; the loop
        // below takes over at the first that does not (or that is a Close).
        let mut pos = match self.limits.is_none()
            && !stop_at_boundary
            && self.skip == 0
            && self.head_len == 0
            && !self.dropping
            && !self.lost
        {
            true => whole_frames(data, &mut fed),
            false => 0,
        };
        // data[run..pos] is to be handed on and has not been yet.
        let mut run = 0;
        let mut now = None;
        while !self.lost {
            if self.skip > 0 {
                let n = self.skip.min((data.len() - pos) as u64) as usize;
                if n == 0 {
                    break;
                }
                if self.in_close || self.holding_pong {
                    self.payload(&data[pos..pos + n]);
                }
                if self.holding_pong || self.dropping {
                    run = pos + n;
                }
                pos += n;
                self.skip -= n as u64;
                if self.skip == 0 {
                    match self.holding_pong {
                        true => self.resolve_pong(&mut fed, out),
                        false => self.frame_end(&mut fed),
                    }
                }
                continue;
            }
            if stop_at_boundary && fed.stop.is_none() && self.at_boundary() {
                fed.stop = Some(Stop::Boundary);
                break;
            }
            if pos == data.len() {
                break;
            }
            // Collect a header: 2 bytes, then what they say follows. Bytes carried over
            // from the last chunk are the start of this one's first header.
            let carried = self.head_len as usize;
            let start = pos;
            loop {
                let have = self.head_len as usize;
                let take = (self.header_len() - have).min(data.len() - pos);
                self.head[have..have + take].copy_from_slice(&data[pos..pos + take]);
                self.head_len += take as u8;
                pos += take;
                if self.head_len as usize == self.header_len() || pos == data.len() {
                    break;
                }
            }
            let held = self.limits.is_some() && !self.dropping;
            if (self.head_len as usize) < self.header_len() {
                // The chunk ends inside a header: under rules it is held until it is whole
                // (nothing of a frame that may break a limit is handed on).
                if held {
                    emit(&mut fed, out, &data[run..start]);
                    run = pos;
                }
                break;
            }
            match self.frame(&mut now) {
                Ok(Disposition::Forward) if held && carried > 0 => {
                    // The header began in the last chunk and was held: it goes first.
                    let head = self.head;
                    emit(&mut fed, out, &head[..carried]);
                }
                Ok(Disposition::Forward) => {}
                Ok(Disposition::HoldPong) => {
                    emit(&mut fed, out, &data[run..start]);
                    run = pos;
                }
                Err(v) => {
                    emit(&mut fed, out, &data[run..start]);
                    fed.stop = Some(Stop::Violation(v));
                    self.dropping = true;
                }
            }
            if self.dropping {
                run = pos;
            }
            if self.skip == 0 && !self.lost {
                // A frame without payload ends with its header.
                self.frame_end(&mut fed);
            }
        }
        if self.lost {
            // Nothing parses any more: the rest passes as it comes (or is dropped).
            pos = data.len();
            if self.dropping {
                run = pos;
            }
        }
        if !self.dropping {
            emit(&mut fed, out, &data[run..pos]);
        }
        fed.consumed = pos;
        fed
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

    /// A whole header was collected: what becomes of its frame.
    fn frame(&mut self, now: &mut Option<Instant>) -> Result<Disposition, Violation> {
        let h = &self.head;
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        let (len, _) = payload_len(h);
        // Reserved opcodes, oversized or fragmented control frames, or a 64-bit length
        // with the top bit set: not WebSocket any more (§5.2, §5.5).
        let control = opcode & 0x8 != 0;
        if matches!(opcode, 3..=7 | 11..=15) || (control && (len > 125 || !fin)) || len >> 63 != 0 {
            self.lost = true;
            // Under limits, the direction stops here; otherwise what follows is forwarded
            // as it comes.
            let strict = self.limits.as_ref().is_some_and(|l| l.strict);
            return match strict && !self.dropping {
                true => Err(Violation::NotWebSocket),
                false => Ok(Disposition::Forward),
            };
        }
        // The payload passes (or, once dropping, is skipped) whatever becomes of it.
        self.skip = len;
        self.in_close = false;
        if let (Some(l), false) = (self.limits.as_mut(), self.dropping) {
            // A continuation with no message open, or a new message before the last one
            // ended (§5.4): an origin should refuse it, but a lenient one would take it
            // for a new message or part of one, around the limits.
            if l.strict && !control && (opcode == 0) != l.in_message {
                return Err(Violation::NotWebSocket);
            }
            if !control {
                l.in_message = !fin;
            }
            if matches!(opcode, 1 | 2) {
                if let Some(b) = l.bucket.as_mut() {
                    if !b.take(*now.get_or_insert_with(Instant::now)) {
                        return Err(Violation::Rate);
                    }
                }
                l.message_len = len;
            } else if opcode == 0 {
                l.message_len = l.message_len.saturating_add(len);
            }
            if !control && l.max_message.is_some_and(|max| l.message_len > max) {
                return Err(Violation::TooBig);
            }
        }
        if opcode == 8 && !self.close_seen {
            self.close_seen = true;
            self.close_forwarded = !self.dropping;
            self.in_close = true;
            self.close_len = 0;
        }
        // A Pong that can carry the token: 7-bit length 8, the only form a token takes.
        let candidate = opcode == 0xA
            && h[1] & 0x7f == TOKEN_LEN as u8
            && !self.dropping
            && self.limits.as_ref().is_some_and(|l| l.expect.is_some());
        if candidate {
            self.holding_pong = true;
            if let Some(l) = self.limits.as_mut() {
                l.pong_len = 0;
            }
            return Ok(Disposition::HoldPong);
        }
        Ok(Disposition::Forward)
    }

    /// Payload bytes of the current frame pass: the Close code and a held Pong are read.
    fn payload(&mut self, bytes: &[u8]) {
        let (_, key) = payload_len(&self.head);
        if self.in_close && self.close_len < 2 {
            for &b in &bytes[..bytes.len().min(2 - self.close_len as usize)] {
                let i = self.close_len as usize;
                self.close_bytes[i] = b ^ key.map_or(0, |k| k[i]);
                self.close_len += 1;
            }
            if self.close_len == 2 {
                self.close_code = Some(u16::from_be_bytes(self.close_bytes));
            }
        }
        if self.holding_pong {
            if let Some(l) = self.limits.as_mut() {
                for &b in bytes {
                    let i = l.pong_len as usize;
                    l.pong[i] = b;
                    l.pong_len += 1;
                }
            }
        }
    }

    /// A held Pong is whole: taken out if it carries the token, else handed on as it came.
    fn resolve_pong(&mut self, fed: &mut Fed, out: &mut impl FnMut(&[u8])) {
        self.holding_pong = false;
        let header = self.header_len();
        let (_, key) = payload_len(&self.head);
        self.head_len = 0;
        let Some(l) = self.limits.as_mut() else {
            return;
        };
        let mut plain = l.pong;
        if let Some(k) = key {
            for (i, b) in plain.iter_mut().enumerate() {
                *b ^= k[i % 4];
            }
        }
        if l.expect == Some(plain) {
            l.expect = None;
            fed.pong = true;
            return;
        }
        let (head, pong) = (self.head, l.pong);
        emit(fed, out, &head[..header]);
        emit(fed, out, &pong);
    }

    /// The current frame ended (with its header, when it has no payload).
    fn frame_end(&mut self, fed: &mut Fed) {
        let h = self.head;
        self.head_len = 0;
        if self.in_close && !self.dropping {
            fed.close = true;
        }
        if h[0] & 0x80 != 0 && matches!(h[0] & 0x0f, 0..=2) && !self.dropping {
            fed.messages += 1;
        }
    }
}

/// What becomes of a frame whose header was read.
enum Disposition {
    Forward,
    HoldPong,
}

/// The payload length of a whole header and its masking key.
fn payload_len(h: &[u8; 14]) -> (u64, Option<[u8; 4]>) {
    let (len, at) = match h[1] & 0x7f {
        126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
        127 => (
            u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            10,
        ),
        n => (u64::from(n), 2),
    };
    let key = (h[1] & 0x80 != 0).then(|| [h[at], h[at + 1], h[at + 2], h[at + 3]]);
    (len, key)
}

/// How far the frames at the start of `data` that are whole in it, well-formed and not a
/// Close reach (their complete data messages counted in `fed`): what the scanner's
/// state would be after them is its state before them, so they need no bookkeeping.
#[inline(always)]
fn whole_frames(data: &[u8], fed: &mut Fed) -> usize {
    let mut pos = 0;
    while let [b0, b1, rest @ ..] = &data[pos..] {
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
        let control = opcode & 0x8 != 0;
        let len7 = u64::from(b1 & 0x7f);
        // Reserved opcodes, a Close (its code is read), a fragmented or long control
        // frame: the loop decides.
        if matches!(opcode, 3..=8 | 11..=15) || (control && (!fin || len7 > 125)) {
            break;
        }
        let (len, ext) = match len7 {
            126 if rest.len() >= 2 => (u64::from(u16::from_be_bytes([rest[0], rest[1]])), 2),
            127 if rest.len() >= 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[..8]);
                (u64::from_be_bytes(b), 8)
            }
            126 | 127 => break,
            n => (n, 0),
        };
        let header = 2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 };
        match (rest.len() + 2).checked_sub(header) {
            Some(payload) if len <= payload as u64 => {}
            _ => break,
        }
        if fin && opcode <= 2 {
            fed.messages += 1;
        }
        pos += header + len as usize;
    }
    pos
}

fn emit(fed: &mut Fed, out: &mut impl FnMut(&[u8]), bytes: &[u8]) {
    if !bytes.is_empty() {
        fed.forwarded += bytes.len();
        out(bytes);
    }
}

/// Why the edge ends a tunnel, as said in its Close frames (the reason text, §5.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Say {
    IdleTimeout,
    MaxLifetime,
    GoingAway,
    /// The old process of a graceful upgrade.
    Restarting,
    /// A drain from the admin listener.
    Draining,
    BadGateway,
    HeartbeatTimeout,
    MessageTooBig,
    MessageRate,
    ProtocolError,
    /// The other side (the client when `client`) broke a limit.
    PeerBroke {
        client: bool,
        broke: Violation,
    },
}

impl Say {
    /// The reason text of the Close frame.
    pub fn reason(self) -> &'static str {
        match self {
            Say::IdleTimeout => "idle timeout",
            Say::MaxLifetime => "max lifetime",
            Say::GoingAway => "going away",
            Say::Restarting => "edge restarting",
            Say::Draining => "edge draining",
            Say::BadGateway => "bad gateway",
            Say::HeartbeatTimeout => "heartbeat timeout",
            Say::MessageTooBig => "message too big",
            Say::MessageRate => "message rate exceeded",
            Say::ProtocolError => "protocol error",
            Say::PeerBroke { client, broke } => match (client, broke) {
                (true, Violation::TooBig) => "client message too big",
                (false, Violation::TooBig) => "origin message too big",
                (_, Violation::Rate) => "client message rate exceeded",
                (true, Violation::NotWebSocket) => "client protocol error",
                (false, Violation::NotWebSocket) => "origin protocol error",
            },
        }
    }
}

/// A control frame of the edge's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// A heartbeat Ping with its token.
    Ping([u8; TOKEN_LEN]),
    /// A Close with its status code (§7.4) and reason.
    Close(u16, Say),
}

/// The longest control frame: a 2-byte header, a mask, 125 bytes of payload.
pub const MAX_CONTROL: usize = 2 + 4 + 125;

impl Control {
    /// The frame's bytes: final, unmasked toward a client, masked with `mask` toward an
    /// origin (§5.3). Control frames are never compressed (RFC 7692 §6.1), so they are the
    /// same with permessage-deflate.
    pub fn encode(&self, mask: Option<[u8; 4]>) -> ([u8; MAX_CONTROL], usize) {
        let mut payload = [0u8; 125];
        let (opcode, len) = match *self {
            Control::Ping(token) => {
                payload[..TOKEN_LEN].copy_from_slice(&token);
                (0x9, TOKEN_LEN)
            }
            Control::Close(code, say) => {
                let reason = say.reason().as_bytes();
                payload[..2].copy_from_slice(&code.to_be_bytes());
                payload[2..2 + reason.len()].copy_from_slice(reason);
                (0x8, 2 + reason.len())
            }
        };
        let mut f = [0u8; MAX_CONTROL];
        f[0] = 0x80 | opcode;
        f[1] = len as u8 | if mask.is_some() { 0x80 } else { 0 };
        let mut at = 2;
        if let Some(k) = mask {
            f[2..6].copy_from_slice(&k);
            at = 6;
            for (i, b) in payload[..len].iter_mut().enumerate() {
                *b ^= k[i % 4];
            }
        }
        f[at..at + len].copy_from_slice(&payload[..len]);
        (f, at + len)
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

    /// Feeds `s` in chunks of `chunk` bytes; returns what was handed on, how many slices
    /// per chunk at most, and the totals.
    fn run(scanner: &mut Scanner, s: &[u8], chunk: usize) -> (Vec<u8>, usize, Fed) {
        let mut got = Vec::new();
        let mut most = 0;
        let mut total = Fed::default();
        for c in s.chunks(chunk) {
            let mut slices = 0;
            let fed = scanner.feed(c, false, &mut |b: &[u8]| {
                got.extend_from_slice(b);
                slices += 1;
            });
            assert_eq!(fed.consumed, c.len());
            most = most.max(slices);
            total.messages += fed.messages;
            total.close |= fed.close;
            total.pong |= fed.pong;
            total.forwarded += fed.forwarded;
            if fed.stop.is_some() {
                total.stop = fed.stop;
            }
        }
        (got, most, total)
    }

    #[test]
    fn counts_messages_and_reads_the_close_code_whatever_the_chunking() {
        let s = stream();
        for rules in [
            Rules::default(),
            Rules {
                max_message: Some(1 << 20),
                ..Rules::default()
            },
        ] {
            for chunk in [1, 2, 3, 7, 13, 100, 4096, s.len()] {
                let mut r = Scanner::new(rules);
                let (got, most, fed) = run(&mut r, &s, chunk);
                assert_eq!(got, s, "chunk {chunk}: bytes handed on unchanged");
                // One slice per chunk, two when a held header goes first.
                assert!(most <= 2, "chunk {chunk}: {most} slices");
                if rules.max_message.is_none() {
                    assert_eq!(most, 1, "without rules nothing is held");
                }
                assert_eq!(fed.messages, 3, "chunk {chunk}");
                assert!(fed.close, "chunk {chunk}");
                assert_eq!(r.close_code(), Some(4001), "chunk {chunk}");
                assert!(r.at_boundary());
            }
        }
    }

    /// The walk over whole frames (no rules) and the byte-at-a-time path agree on random
    /// streams in random chunks: the same bytes, messages, Close and state.
    #[test]
    fn whole_frames_at_once_or_a_byte_at_a_time_are_the_same() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        for round in 0..300 {
            let mut s = Vec::new();
            for _ in 0..rng.gen_range(1..30) {
                let opcode = [0u8, 1, 2, 9, 10, 8][rng.gen_range(0..6)];
                let control = opcode >= 8;
                let len = match (control, rng.gen_range(0..10)) {
                    (true, _) => rng.gen_range(0..=125),
                    (false, 0) => rng.gen_range(126..70_000),
                    (false, _) => rng.gen_range(0..126),
                };
                let payload: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let mask = rng.gen_bool(0.5).then(|| rng.gen());
                s.extend(frame(control || rng.gen_bool(0.7), opcode, &payload, mask));
            }
            if round % 7 == 0 {
                s.extend(frame(true, 5, b"reserved", None)); // not WebSocket: lost
                s.extend(b"anything after");
            }
            let mut one = Scanner::default();
            let (by_byte, _, a) = run(&mut one, &s, 1);
            let mut other = Scanner::default();
            let mut got = Vec::new();
            let mut b = Fed::default();
            let mut at = 0;
            while at < s.len() {
                let n = rng.gen_range(1..=(s.len() - at).min(100_000));
                let fed = other.feed(&s[at..at + n], false, &mut |x: &[u8]| {
                    got.extend_from_slice(x)
                });
                assert_eq!(fed.consumed, n);
                b.messages += fed.messages;
                b.close |= fed.close;
                b.forwarded += fed.forwarded;
                at += n;
            }
            assert_eq!(by_byte, s, "round {round}");
            assert_eq!(got, s, "round {round}");
            assert_eq!(
                (a.messages, a.close, a.forwarded),
                (b.messages, b.close, b.forwarded)
            );
            assert_eq!(one.close_code(), other.close_code(), "round {round}");
            assert_eq!(one.close_seen(), other.close_seen(), "round {round}");
            assert_eq!(one.lost(), other.lost(), "round {round}");
            assert_eq!(one.at_boundary(), other.at_boundary(), "round {round}");
        }
    }

    /// Hostile headers: a 64-bit length with its top bit set, a control frame over 125
    /// bytes, a fragmented control frame. Without rules the stream is lost (relayed as it
    /// comes, never written into); under a limit the direction stops before them. A Close
    /// with a 1-byte payload has no code.
    #[test]
    fn hostile_headers_lose_the_stream_or_stop_it_under_a_limit() {
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        let long_ping = frame(true, 9, &[0u8; 126], None);
        let fragmented_ping = frame(false, 9, b"p", None);
        for bad in [huge, long_ping, fragmented_ping] {
            let mut free = Scanner::default();
            let mut got = Vec::new();
            free.feed(&bad, false, &mut |b: &[u8]| got.extend_from_slice(b));
            assert!(free.lost() && got == bad, "{bad:?}");
            let mut limited = Scanner::new(Rules {
                max_message: Some(1 << 20),
                ..Rules::default()
            });
            let mut got = Vec::new();
            let fed = limited.feed(&bad, false, &mut |b: &[u8]| got.extend_from_slice(b));
            assert_eq!(
                fed.stop,
                Some(Stop::Violation(Violation::NotWebSocket)),
                "{bad:?}"
            );
            assert!(got.is_empty(), "nothing of {bad:?} passes");
        }
        let mut r = Scanner::default();
        let fed = r.feed(&frame(true, 8, &[0x03], None), false, &mut |_: &[u8]| {});
        assert!(fed.close && r.close_seen());
        assert_eq!(r.close_code(), None);
    }

    #[test]
    fn close_without_code_and_garbage_stop_cleanly() {
        let mut r = Scanner::default();
        let fed = r.feed(&frame(true, 8, b"", None), false, &mut |_: &[u8]| {});
        assert!(fed.close);
        assert_eq!(r.close_code(), None);
        let mut r = Scanner::default();
        let mut got = Vec::new();
        let fed = r.feed(b"GET / HTTP/1.1\r\n\r\n", false, &mut |b: &[u8]| {
            got.extend_from_slice(b)
        });
        assert_eq!(fed.messages, 0);
        assert!(r.lost());
        assert!(!r.at_boundary());
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n", "lost: everything passes");
    }

    #[test]
    fn a_message_over_the_limit_stops_before_its_header_whatever_the_chunking() {
        // 600 + 500 bytes in two fragments against 1000: the second fragment breaks it.
        let mut s = frame(true, 1, b"small", Some([1, 1, 1, 1]));
        let first = frame(false, 2, &[1u8; 600], Some([2, 2, 2, 2]));
        s.extend(&first);
        let kept = s.len();
        s.extend(frame(true, 0, &[3u8; 500], Some([3, 3, 3, 3])));
        s.extend(frame(true, 8, &[0x03, 0xe8], Some([4, 4, 4, 4])));
        for chunk in [1, 5, 64, 700, s.len()] {
            let mut r = Scanner::new(Rules {
                max_message: Some(1000),
                ..Rules::default()
            });
            let (got, _, fed) = run(&mut r, &s, chunk);
            assert_eq!(got, &s[..kept], "chunk {chunk}");
            assert_eq!(fed.stop, Some(Stop::Violation(Violation::TooBig)));
            assert!(r.at_boundary());
            // The sender's Close after it is still seen (not forwarded).
            assert!(r.close_seen() && !r.close_forwarded(), "chunk {chunk}");
            assert_eq!(fed.messages, 1);
        }
        // One frame bigger than the limit: not a byte of it.
        let mut r = Scanner::new(Rules {
            max_message: Some(1000),
            ..Rules::default()
        });
        let big = frame(true, 2, &[0u8; 5000], None);
        let (got, _, fed) = run(&mut r, &big, 3);
        assert!(got.is_empty());
        assert_eq!(fed.stop, Some(Stop::Violation(Violation::TooBig)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_message_rate_is_a_token_bucket() {
        let mut r = Scanner::new(Rules {
            rate: Some((10.0, 20)),
            ..Rules::default()
        });
        let one = frame(true, 1, b"m", Some([0; 4]));
        let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 20).collect();
        let (got, _, fed) = run(&mut r, &burst, 4096);
        assert_eq!((got.len(), fed.messages, fed.stop), (burst.len(), 20, None));
        // Control frames and continuations are not messages.
        let (_, _, fed) = run(&mut r, &frame(true, 9, b"", Some([0; 4])), 64);
        assert_eq!(fed.stop, None);
        // The 21st at once is over; 0.1 s later one more would pass.
        let (got, _, fed) = run(&mut r, &one, 64);
        assert_eq!(fed.stop, Some(Stop::Violation(Violation::Rate)));
        assert!(got.is_empty());
        let mut r = Scanner::new(Rules {
            rate: Some((10.0, 1)),
            ..Rules::default()
        });
        assert_eq!(run(&mut r, &one, 64).2.stop, None);
        tokio::time::advance(std::time::Duration::from_millis(100)).await;
        assert_eq!(run(&mut r, &one, 64).2.stop, None);
    }

    #[test]
    fn the_pong_with_the_token_is_taken_out_and_others_pass() {
        let token = *b"12345678";
        let mut s = frame(true, 1, b"a", Some([1, 2, 3, 4]));
        let other = frame(true, 0xA, b"87654321", Some([5, 5, 5, 5]));
        s.extend(&other);
        let ours = frame(true, 0xA, &token, Some([6, 7, 8, 9]));
        let at = s.len();
        s.extend(&ours);
        s.extend(frame(true, 1, b"b", Some([1, 2, 3, 4])));
        s.extend(&ours); // a second copy: the token was used up, it passes
        let mut want = s.clone();
        want.drain(at..at + ours.len());
        for chunk in [1, 2, 7, 11, s.len()] {
            let mut r = Scanner::new(Rules {
                pongs: true,
                ..Rules::default()
            });
            r.expect_pong(token);
            let (got, _, fed) = run(&mut r, &s, chunk);
            assert_eq!(got, want, "chunk {chunk}");
            assert!(fed.pong);
            assert_eq!(fed.forwarded, want.len());
        }
        // Unmasked (an origin's Pong) works the same.
        let mut r = Scanner::new(Rules {
            pongs: true,
            ..Rules::default()
        });
        r.expect_pong(token);
        let (got, _, fed) = run(&mut r, &frame(true, 0xA, &token, None), 3);
        assert!(got.is_empty() && fed.pong);
    }

    #[test]
    fn it_stops_at_a_boundary_when_asked() {
        let s = stream();
        let mut r = Scanner::new(Rules::default());
        // Mid-way through the 70 000-byte frame, the next boundary is its end.
        let mut got = Vec::new();
        let fed = r.feed(&s[..1000], true, &mut |b: &[u8]| got.extend_from_slice(b));
        assert_eq!(fed.stop, Some(Stop::Boundary));
        assert_eq!(fed.consumed, 0, "at a boundary already");
        let fed = r.feed(&s[..1000], false, &mut |b: &[u8]| got.extend_from_slice(b));
        assert_eq!(fed.consumed, 1000);
        let fed = r.feed(&s[1000..], true, &mut |b: &[u8]| got.extend_from_slice(b));
        assert_eq!(fed.stop, Some(Stop::Boundary));
        let end_of_big = s.len() - frame(true, 2, b"", None).len() - 11;
        assert_eq!(1000 + fed.consumed, end_of_big);
        assert!(r.at_boundary());
        assert_eq!(got, &s[..end_of_big]);
    }

    #[test]
    fn under_limits_a_stream_that_is_not_websocket_stops() {
        let mut r = Scanner::new(Rules {
            max_message: Some(10),
            ..Rules::default()
        });
        let mut s = frame(true, 1, b"ok", None);
        let ok = s.len();
        s.extend(frame(true, 3, b"reserved", None));
        let (got, _, fed) = run(&mut r, &s, 4);
        assert_eq!(got, &s[..ok]);
        assert_eq!(fed.stop, Some(Stop::Violation(Violation::NotWebSocket)));
    }

    #[test]
    fn a_violation_is_reported_even_when_a_frame_of_the_edge_waits() {
        // The header of a too-big frame split over two reads, with a Ping waiting for a
        // boundary: the violation wins, nothing of the frame is handed on.
        let rules = Rules {
            max_message: Some(1000),
            pongs: true,
            ..Rules::default()
        };
        let big = frame(true, 2, &[0u8; 2000], None);
        let mut r = Scanner::new(rules);
        let mut got = Vec::new();
        let fed = r.feed(&big[..1], true, &mut |b: &[u8]| got.extend_from_slice(b));
        assert_eq!(
            fed.stop,
            Some(Stop::Boundary),
            "a held header is not handed on"
        );
        let fed = r.feed(&big[..1], false, &mut |b: &[u8]| got.extend_from_slice(b));
        assert_eq!(fed.consumed, 1);
        assert!(r.at_boundary(), "the held byte is not written");
        // The Ping may go before the held header; then the header breaks the limit.
        let fed = r.feed(&big[1..], true, &mut |b: &[u8]| got.extend_from_slice(b));
        assert_eq!((fed.stop, fed.consumed), (Some(Stop::Boundary), 0));
        let fed = r.feed(&big[1..], false, &mut |b: &[u8]| got.extend_from_slice(b));
        assert_eq!(fed.stop, Some(Stop::Violation(Violation::TooBig)));
        assert!(got.is_empty());
        // A boundary right after a violation in the same chunk does not hide it.
        let mut r = Scanner::new(rules);
        let mut s = frame(true, 1, b"ok", None);
        s.extend(&big);
        s.extend(frame(true, 1, b"after", None));
        let mut stops = Vec::new();
        let mut rest = &s[..];
        while !rest.is_empty() {
            let fed = r.feed(rest, true, &mut |b: &[u8]| got.extend_from_slice(b));
            stops.push(fed.stop);
            rest = &rest[fed.consumed..];
            if fed.stop == Some(Stop::Boundary) {
                let fed = r.feed(rest, false, &mut |b: &[u8]| got.extend_from_slice(b));
                stops.push(fed.stop);
                rest = &rest[fed.consumed..];
            }
        }
        assert!(
            stops.contains(&Some(Stop::Violation(Violation::TooBig))),
            "{stops:?}"
        );
        assert_eq!(got, frame(true, 1, b"ok", None));
    }

    #[test]
    fn under_limits_messages_must_be_framed_as_rfc_6455_says() {
        let strict = Rules {
            max_message: Some(1 << 20),
            ..Rules::default()
        };
        // A continuation with no message open.
        let mut r = Scanner::new(strict);
        let (got, _, fed) = run(&mut r, &frame(true, 0, b"orphan", None), 64);
        assert_eq!(fed.stop, Some(Stop::Violation(Violation::NotWebSocket)));
        assert!(got.is_empty());
        // A new message before the last one ended.
        let mut s = frame(false, 1, b"first ", None);
        let ok = s.len();
        s.extend(frame(true, 2, b"second", None));
        let mut r = Scanner::new(strict);
        let (got, _, fed) = run(&mut r, &s, 5);
        assert_eq!(got, &s[..ok]);
        assert_eq!(fed.stop, Some(Stop::Violation(Violation::NotWebSocket)));
        // With heartbeats only (no limit), a stream that is not WebSocket is relayed.
        let mut r = Scanner::new(Rules {
            pongs: true,
            ..Rules::default()
        });
        let mut s = frame(true, 3, b"reserved", None);
        s.extend(frame(true, 0, b"orphan", None));
        let (got, _, fed) = run(&mut r, &s, 3);
        assert_eq!((got, fed.stop), (s, None));
        assert!(r.stuck());
    }

    #[test]
    fn control_frames_encode_as_rfc_6455_says() {
        let (f, n) = Control::Close(1001, Say::IdleTimeout).encode(None);
        assert_eq!(&f[..n], b"\x88\x0e\x03\xe9idle timeout");
        let (f, n) = Control::Ping(*b"abcdefgh").encode(Some([1, 2, 3, 4]));
        let mut r = Scanner::default();
        let fed = r.feed(&f[..n], false, &mut |_: &[u8]| {});
        assert_eq!(fed.consumed, n);
        assert!(r.at_boundary());
        assert_eq!(&f[..6], &[0x89, 0x88, 1, 2, 3, 4]);
        let plain: Vec<u8> = f[6..n]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4])
            .collect();
        assert_eq!(plain, b"abcdefgh");
    }
}
